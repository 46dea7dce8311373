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

from fastgen_jax.models.layers import DecoderLayer


class GemmaDecoderLayer(DecoderLayer):
    @nn.nowrap
    def residual_block(self, h, attend):
        h = h + self.norm("post_attn_norm")(attend(self.norm("attn_norm")(h)))
        return h + self.norm("post_mlp_norm")(self.mlp(self.norm("mlp_norm")(h)))
