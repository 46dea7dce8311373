"""Gemma 2 and Gemma 3 (text): norms before and after both attention and the MLP, (1 + w) RMSNorm,
GeGLU, embeddings scaled by sqrt(hidden_size), attention scaled by `query_pre_attn_scalar`, and
sliding-window layers among global ones (their pattern from `layer_types`, their window a scanned
per-layer value). Gemma 2 soft-caps attention scores and the final logits; Gemma 3 normalises q and k
per head and gives its sliding layers their own RoPE base. All of it is configuration read by the
shared blocks; this module only orders them.

    h = h + post_attn_norm(attn(attn_norm(h)));  h = h + post_mlp_norm(mlp(mlp_norm(h)))
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from fastgen_jax.attention import Attention
from fastgen_jax.config import ModelConfig
from fastgen_jax.models.layers import MLP, LayerSettings, PagedAttention, norm
from fastgen_jax.models.metadata import AttentionMetadata


class GemmaDecoderLayer(nn.Module):
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
        h = h + norm(c, self.dtype, "post_attn_norm")(attn_out)
        mlp_out = MLP(c, self.dtype, name="mlp")(norm(c, self.dtype, "mlp_norm")(h))
        h = h + norm(c, self.dtype, "post_mlp_norm")(mlp_out)
        return (h, kv_cache), None
