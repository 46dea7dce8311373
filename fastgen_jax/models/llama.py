"""The Llama layout: Llama 2/3, Mistral, Qwen2, Qwen3 (q/k norm), Phi-3 (its fused projections are
split when the checkpoint is read), SmolLM2, and OPT (LayerNorms, a non-gated ReLU MLP, biases and
learned positions: all configuration of the shared blocks).

    h = h + attn(attn_norm(h));  h = h + mlp(mlp_norm(h))
"""

from __future__ import annotations

import flax.linen as nn

from fastgen_jax.models.layers import DecoderLayer


class LlamaDecoderLayer(DecoderLayer):
    @nn.nowrap
    def residual_block(self, h, attend):
        h = h + attend(self.norm("attn_norm")(h))
        return h + self.mlp(self.norm("mlp_norm")(h))
