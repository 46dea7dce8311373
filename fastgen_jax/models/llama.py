"""The Llama layout: Llama 2/3, Mistral, Qwen2, Qwen3 (q/k norm), Phi-3 (its fused projections are
split when the checkpoint is read), SmolLM2, and OPT (LayerNorms, a non-gated ReLU MLP, biases and
learned positions: all configuration of the shared blocks).

    h = h + attn(attn_norm(h));  h = h + mlp(mlp_norm(h))
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from fastgen_jax.attention import Attention
from fastgen_jax.config import ModelConfig
from fastgen_jax.models.layers import MLP, LayerSettings, PagedAttention, norm
from fastgen_jax.models.metadata import AttentionMetadata


class LlamaDecoderLayer(nn.Module):
    config: ModelConfig
    attention: Attention
    dtype: jnp.dtype
    max_model_len: int

    @nn.compact
    def __call__(self, carry, layer: LayerSettings, md: AttentionMetadata):
        h, kv_cache = carry
        c = self.config
        attn = PagedAttention(c, self.attention, self.dtype, self.max_model_len, name="attn")
        attn_out, kv_cache = attn(norm(c, self.dtype, "attn_norm")(h), kv_cache, layer, md)
        h = h + attn_out
        h = h + MLP(c, self.dtype, name="mlp")(norm(c, self.dtype, "mlp_norm")(h))
        return (h, kv_cache), None
