"""Model registry: a config.json's architecture -> its family's decoder layer inside `CausalLM`.

`fastgen_jax.hf_config.ARCHITECTURES` names each architecture's family (host side, no jax); here each
family name meets its layer class. Adding a family: a module with its decoder layer (read llama.py),
an entry below, its checkpoint names in `checkpoints.hf_layouts`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastgen_jax.attention import Attention, get_attention
from fastgen_jax.config import ConfigError, ModelConfig
from fastgen_jax.hf_config import ARCHITECTURES
from fastgen_jax.models.falcon import FalconDecoderLayer
from fastgen_jax.models.gemma import GemmaDecoderLayer
from fastgen_jax.models.layers import CausalLM, init_kv_cache, kv_bytes_per_page
from fastgen_jax.models.llama import LlamaDecoderLayer
from fastgen_jax.models.metadata import AttentionMetadata, SamplingArrays, StepPlan
from fastgen_jax.models.moe import MoEDecoderLayer

FAMILY_LAYERS = {
    "llama": LlamaDecoderLayer,
    "moe": MoEDecoderLayer,
    "gemma": GemmaDecoderLayer,
    "falcon": FalconDecoderLayer,
}
MODEL_REGISTRY = {arch: FAMILY_LAYERS[family] for arch, (family, _) in ARCHITECTURES.items()}


def build_model(
    config: ModelConfig,
    dtype=jnp.float32,
    attention: Attention | None = None,
    max_model_len: int | None = None,
) -> CausalLM:
    """The Flax module for `config`; call it with `module.apply({"params": params}, ...)`.

    `max_model_len`: the engine's longest sequence (default: the model's limit); LongRoPE models
    choose their RoPE factors from it."""
    try:
        layer_cls = MODEL_REGISTRY[config.architecture]
    except KeyError:
        raise ConfigError(
            f"no implementation registered for {config.architecture!r} "
            f"(supported: {', '.join(MODEL_REGISTRY)})"
        ) from None
    return CausalLM(
        config=config,
        attention=attention or get_attention(),
        layer_cls=layer_cls,
        dtype=jnp.dtype(dtype),
        max_model_len=max_model_len or config.max_position_embeddings,
    )


def param_shapes(config: ModelConfig):
    """{"params": ...} of `jax.ShapeDtypeStruct`s (float32): the parameter tree `config` needs."""
    model = build_model(config, jnp.float32, Attention("reference"))
    zeros = jnp.zeros((1,), jnp.int32)
    md = AttentionMetadata(
        positions=zeros,
        slot_mapping=zeros,
        kv_lens=zeros,
        page_indices=jnp.zeros((1, 1), jnp.int32),
        cu_q_lens=jnp.zeros((2,), jnp.int32),
        num_seqs=jnp.ones((1,), jnp.int32),
        logits_indices=zeros,
    )
    kv = jax.eval_shape(lambda: init_kv_cache(config, 2, 1, jnp.float32))
    return jax.eval_shape(model.init, jax.random.key(0), zeros, kv, md)


__all__ = [
    "AttentionMetadata",
    "MODEL_REGISTRY",
    "build_model",
    "init_kv_cache",
    "kv_bytes_per_page",
    "param_shapes",
    "SamplingArrays",
    "StepPlan",
]
