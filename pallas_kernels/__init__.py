"""Attention kernels over a paged KV cache. Only jax: nothing here knows about sequences or configs.

- `ragged_paged_attention`: the Pallas kernel (Triton lowering) for mixed prompt-chunk and decode
  slabs, `ragged_paged_attention.ragged_paged_attention(...)`.
- `reference`: the pure-JAX oracle with the same contract, and the K/V page write.
- `tiles`: the tile table the kernel reads its default block sizes from.
"""

from pallas_kernels import ragged_paged_attention, reference, tiles

__all__ = ["ragged_paged_attention", "reference", "tiles"]
