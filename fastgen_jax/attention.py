"""The one place that chooses how attention over the paged KV cache is computed.

Models call `Attention.write_kv` and `Attention.paged_attention` and never import kernels directly,
so a new kernel (the Pallas GPU one) plugs in here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax

from fastgen_jax.config import ATTENTION_IMPLS, ConfigError
from pallas_kernels import reference


@dataclasses.dataclass(frozen=True)
class Attention:
    """A resolved attention implementation (hashable, so models can hold it as a static field)."""

    impl: str

    @property
    def write_kv(self) -> Callable[..., tuple[jax.Array, jax.Array]]:
        return reference.write_kv_pages_reference

    @property
    def paged_attention(self) -> Callable[..., jax.Array]:
        return reference.ragged_paged_attention_reference


@functools.cache
def get_attention(impl: str = "auto") -> Attention:
    """Resolves `EngineConfig.attention_impl` for the current default backend."""
    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    return Attention(impl="reference")
