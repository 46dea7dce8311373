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
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax

from fastgen_jax.config import ATTENTION_IMPLS, ConfigError
from pallas_kernels import ragged_paged_attention, reference

KERNEL_IMPLS = ("pallas", "pallas_interpret")


@dataclasses.dataclass(frozen=True)
class Attention:
    """A resolved attention implementation (hashable, so models can hold it as a static field).

    impl: "reference", "pallas" or "pallas_interpret".
    fallback: use the reference for shapes the kernel does not support instead of raising.
    """

    impl: str
    fallback: bool = False

    def __post_init__(self):
        if self.impl not in ("reference", *KERNEL_IMPLS):
            raise ConfigError(f"unresolved attention impl {self.impl!r}")

    @property
    def write_kv(self) -> Callable[..., tuple[jax.Array, jax.Array]]:
        return reference.write_kv_pages_reference

    @property
    def paged_attention(self) -> Callable[..., jax.Array]:
        if self.impl == "reference":
            return reference.ragged_paged_attention_reference
        kernel = functools.partial(
            ragged_paged_attention.ragged_paged_attention,
            interpret=self.impl == "pallas_interpret",
        )
        return _with_fallback(kernel) if self.fallback else kernel


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
