"""Falcon (rotary variants): attention and MLP side by side on the same layer input, added to one
residual, under one shared LayerNorm (the 7B layout, multi-query) or one LayerNorm each (the "new
decoder architecture", grouped KV heads); the non-gated GELU MLP. Its fused qkv projection is split
when the checkpoint is read. A Falcon without `parallel_attn` runs the Llama order with LayerNorms.

    parallel:   h = h + attn(attn_norm(h)) + mlp(mlp_norm(h))   (mlp_norm = attn_norm with one norm)
    sequential: h = h + attn(attn_norm(h));  h = h + mlp(mlp_norm(h))
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from fastgen_jax.attention import Attention
from fastgen_jax.config import ModelConfig
from fastgen_jax.models.layers import MLP, LayerSettings, PagedAttention, norm
from fastgen_jax.models.metadata import AttentionMetadata


class FalconDecoderLayer(nn.Module):
    config: ModelConfig
    attention: Attention
    dtype: jnp.dtype
    max_model_len: int

    @nn.compact
    def __call__(self, carry, layer: LayerSettings, md: AttentionMetadata):
        h, kv_cache = carry
        c = self.config
        attn = PagedAttention(c, self.attention, self.dtype, self.max_model_len, name="attn")
        attn_in = norm(c, self.dtype, "attn_norm")(h)
        attn_out, kv_cache = attn(attn_in, kv_cache, layer, md)
        if not c.parallel_attn:
            h = h + attn_out
            return (h + MLP(c, self.dtype, name="mlp")(norm(c, self.dtype, "mlp_norm")(h)), kv_cache), None
        mlp_in = norm(c, self.dtype, "mlp_norm")(h) if c.parallel_norms == 2 else attn_in
        return (h + attn_out + MLP(c, self.dtype, name="mlp")(mlp_in), kv_cache), None
