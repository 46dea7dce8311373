"""The one place that chooses how attention over the paged KV cache is computed.

Models call `Attention.write_kv` and `Attention.paged_attention` and never import kernels directly,
so a new kernel plugs in here and nowhere else.

- "reference": pure JAX (`pallas_kernels.reference`), any backend.
- "pallas": the Pallas ragged paged attention kernel, compiled through Triton; GPU only.
- "pallas_interpret": the same kernel run by the Pallas interpreter on any backend (slow; tests).
- "auto": "pallas" on a GPU, "reference" elsewhere. Shapes the kernel cannot take (a head_dim that
  is not a power of two, say) quietly use the reference instead; an explicit "pallas" raises.

The K/V write is the reference XLA scatter for every choice: it moves only the step's new rows, and
a fused write would race with the kernel's programs reading those rows.

Under tensor parallelism (`Attention.mesh` set, see `fastgen_jax.parallel`) both the write and the
attention run per device under `shard_map`: each device holds the query heads and KV pages of its own
KV heads, so either implementation runs unchanged on its slice and no device reads another's cache.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fastgen_jax.config import ATTENTION_IMPLS, ConfigError
from fastgen_jax.parallel import AXIS
from pallas_kernels import ragged_paged_attention, reference

KERNEL_IMPLS = ("pallas", "pallas_interpret")


@dataclasses.dataclass(frozen=True)
class Attention:
    """A resolved attention implementation (hashable, so models can hold it as a static field).

    impl: "reference", "pallas" or "pallas_interpret".
    fallback: use the reference for shapes the kernel does not support instead of raising.
    mesh: the tensor-parallel mesh the heads are split over (None: one device).
    """

    impl: str
    fallback: bool = False
    mesh: Mesh | None = None

    def __post_init__(self):
        if self.impl not in ("reference", *KERNEL_IMPLS):
            raise ConfigError(f"unresolved attention impl {self.impl!r}")

    def over(self, mesh: Mesh | None) -> Attention:
        """This implementation, run per shard over `mesh` when it has more than one device."""
        return dataclasses.replace(self, mesh=mesh if mesh is not None and mesh.size > 1 else None)

    @property
    def write_kv(self) -> Callable[..., tuple[jax.Array, jax.Array]]:
        write = reference.write_kv_pages_reference
        if self.mesh is None:
            return write
        # (k_pages, v_pages, k [T, KVH, D], v, slot_mapping) -> (k_pages, v_pages)
        return _per_shard(write, self.mesh, (_PAGES, _PAGES, _HEADS, _HEADS, P()), (_PAGES, _PAGES))

    @property
    def paged_attention(self) -> Callable[..., jax.Array]:
        if self.impl == "reference":
            attend = reference.ragged_paged_attention_reference
        else:
            attend = functools.partial(
                ragged_paged_attention.ragged_paged_attention,
                interpret=self.impl == "pallas_interpret",
            )
            attend = _with_fallback(attend) if self.fallback else attend
        if self.mesh is None:
            return attend
        # (q [T, H, D], k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs) -> [T, H, D]
        return _per_shard(attend, self.mesh, (_HEADS, _PAGES, _PAGES, P(), P(), P(), P()), _HEADS)


_HEADS = P(None, AXIS, None)  # [T, heads, head_dim]
_PAGES = P(AXIS)  # [kv_heads, pages, page_size, head_dim]


def _per_shard(fn: Callable, mesh: Mesh, in_specs: tuple, out_specs) -> Callable:
    """`fn` run on each device's slice of the heads. Keyword arguments are settings: Python values
    stay static, arrays (a layer's traced sliding window) enter replicated."""

    def call(*args, **kwargs):
        traced = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
        static = {k: v for k, v in kwargs.items() if k not in traced}

        def body(*a):
            return fn(*a[: len(args)], **dict(zip(traced, a[len(args) :], strict=True)), **static)

        specs = (*in_specs, *(P() for _ in traced))
        return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=out_specs, check_vma=False)(
            *args, *traced.values()
        )

    return call


def _with_fallback(kernel: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """The kernel where it supports the (static) shapes and dtype, the reference elsewhere."""

    def paged_attention(q, k_pages, v_pages, *args, **kwargs):
        if ragged_paged_attention.supports(q, k_pages):
            return kernel(q, k_pages, v_pages, *args, **kwargs)
        return reference.ragged_paged_attention_reference(q, k_pages, v_pages, *args, **kwargs)

    return paged_attention


@functools.cache
def get_attention(impl: str = "auto") -> Attention:
    """Resolves `EngineConfig.attention_impl` for the current default backend."""
    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    on_gpu = jax.default_backend() == "gpu"
    if impl == "auto":
        return Attention("pallas", fallback=True) if on_gpu else Attention("reference")
    if impl == "pallas" and not on_gpu:
        raise ConfigError(
            f"attention_impl='pallas' needs a GPU (backend is {jax.default_backend()!r}); "
            "use 'pallas_interpret' to run the kernel through the interpreter"
        )
    return Attention(impl)
