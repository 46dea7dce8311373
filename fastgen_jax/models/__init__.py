"""Model registry: maps a config.json's architecture to its Flax implementation."""

from __future__ import annotations

import jax.numpy as jnp

from fastgen_jax.attention import Attention, get_attention
from fastgen_jax.config import LLAMA_FAMILY_ARCHITECTURES, ConfigError, ModelConfig
from fastgen_jax.models.llama import LlamaForCausalLM, init_kv_cache, kv_bytes_per_page
from fastgen_jax.models.metadata import AttentionMetadata

MODEL_REGISTRY = {arch: LlamaForCausalLM for arch in LLAMA_FAMILY_ARCHITECTURES}


def build_model(config: ModelConfig, dtype=jnp.float32, attention: Attention | None = None):
    """The Flax module for `config`; call it with `module.apply({"params": params}, ...)`."""
    try:
        cls = MODEL_REGISTRY[config.architecture]
    except KeyError:
        raise ConfigError(f"no implementation registered for {config.architecture!r}") from None
    return cls(config=config, attention=attention or get_attention(), dtype=jnp.dtype(dtype))


__all__ = [
    "AttentionMetadata",
    "MODEL_REGISTRY",
    "build_model",
    "init_kv_cache",
    "kv_bytes_per_page",
]
