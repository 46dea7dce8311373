"""Falcon (rotary variants): attention and MLP side by side on the same layer input, added to one
residual, under one shared LayerNorm (the 7B layout, multi-query) or one LayerNorm each (the "new
decoder architecture", grouped KV heads); the non-gated GELU MLP. Its fused qkv projection is split
when the checkpoint is read. A Falcon without `parallel_attn` runs the Llama order with LayerNorms.

    parallel:   h = h + attn(attn_norm(h)) + mlp(mlp_norm(h))   (mlp_norm = attn_norm with one norm)
    sequential: h = h + attn(attn_norm(h));  h = h + mlp(mlp_norm(h))
"""

from __future__ import annotations

import flax.linen as nn

from fastgen_jax.models.layers import DecoderLayer


class FalconDecoderLayer(DecoderLayer):
    @nn.nowrap
    def residual_block(self, h, attend):
        c = self.config
        attn_in = self.norm("attn_norm")(h)
        attn_out = attend(attn_in)
        if not c.parallel_attn:
            h = h + attn_out
            return h + self.mlp(self.norm("mlp_norm")(h))
        mlp_in = self.norm("mlp_norm")(h) if c.parallel_norms == 2 else attn_in
        return h + attn_out + self.mlp(mlp_in)
