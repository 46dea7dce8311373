"""Tile sizes for the ragged paged attention kernel, keyed by (head_dim, page_size, dtype).

The defaults are starting points for an H100 (228 KiB of shared memory per SM, bf16 tensor cores),
chosen by the usual FlashAttention arithmetic, not measured here: a 64-row query tile against 16 KiB
K and V tiles (64 keys at head_dim 128 in bf16, 128 keys at head_dim 64) keeps Q, K, V and the
pipeline's extra K/V stages well inside shared memory, with 4 warps for a 64-row MMA. float32 (tests
and debugging, not serving) halves both tiles so registers and shared memory still fit.

`block_rows` counts rows of the query tile: query tokens times the query heads of one KV head packed
together (padded to a power of two), so with 8 query heads per KV head a 64-row tile holds 8 tokens.
`block_kv` counts keys per inner-loop tile; the kernel gathers whole pages, so a tile is never
smaller than one page. Retune with `scripts/bench_attention.py` on the target GPU.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class TileSizes:
    block_rows: int  # query tile rows: tokens x padded query-heads-per-KV-head
    block_kv: int  # keys per inner-loop tile (a whole number of pages)
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name in ("block_rows", "block_kv", "num_warps"):
            value = getattr(self, name)
            if not _is_power_of_two(value):
                raise ValueError(f"{name}={value} must be a positive power of two")
        if self.block_rows < 16 or self.block_kv < 16:
            raise ValueError(f"{self=}: Triton matmuls need at least 16 rows and 16 keys")
        if self.num_stages < 1:
            raise ValueError(f"{self.num_stages=} must be at least 1")

    def pages_per_block(self, page_size: int) -> int:
        """Pages gathered per KV tile: `block_kv` keys, but at least one whole page."""
        return max(1, self.block_kv // page_size)


# Same bytes per K/V tile at both head dims: 64 keys x 128 dims or 128 keys x 64 dims (16 KiB).
_HALF = {
    128: TileSizes(block_rows=64, block_kv=64, num_warps=4, num_stages=3),
    64: TileSizes(block_rows=64, block_kv=128, num_warps=4, num_stages=3),
}
_FLOAT32 = TileSizes(block_rows=32, block_kv=32, num_warps=4, num_stages=2)

# (head_dim, page_size, dtype name) -> tiles. Pages larger than block_kv make one-page tiles.
TILE_TABLE: dict[tuple[int, int, str], TileSizes] = {
    (head_dim, page_size, dtype): _FLOAT32 if dtype == "float32" else _HALF[head_dim]
    for head_dim in (64, 128)
    for page_size in (16, 32, 64)
    for dtype in ("bfloat16", "float16", "float32")
}
DEFAULT_TILES = _FLOAT32  # unknown shapes: the smallest tiles compile everywhere


def get_tile_sizes(head_dim: int, page_size: int, dtype) -> TileSizes:
    """The tile table's entry for this shape, or the conservative default."""
    return TILE_TABLE.get((head_dim, page_size, jnp.dtype(dtype).name), DEFAULT_TILES)
