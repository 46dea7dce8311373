"""Small random Llama models with a real tokenizer: for server tests, soak runs and host-side benchmarks.

The weights are random (normal, std `scale`), so the text is gibberish, but every code path a real
model takes (tokenizer, chat template, EOS, paged attention, sampling) runs, and a step costs little.
"""

from __future__ import annotations

import os

import numpy as np

from fastgen_jax.checkpoints.converted import save_checkpoint
from fastgen_jax.checkpoints.hf import _layer_tensor_specs, hf_tensors_to_params
from fastgen_jax.config import ModelConfig
from fastgen_jax.tokenizer import Tokenizer


def random_hf_tensors(config: ModelConfig, seed: int = 0, scale: float = 0.3) -> dict[str, np.ndarray]:
    """Hugging Face-named tensors of the right shapes for `config`."""
    c, rng = config, np.random.default_rng(seed)
    h, kvh, d, hid, f = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.intermediate_size
    shapes = {
        "input_layernorm.weight": (hid,),
        "post_attention_layernorm.weight": (hid,),
        "self_attn.q_proj.weight": (h * d, hid),
        "self_attn.k_proj.weight": (kvh * d, hid),
        "self_attn.v_proj.weight": (kvh * d, hid),
        "self_attn.o_proj.weight": (hid, h * d),
        "mlp.gate_proj.weight": (f, hid),
        "mlp.up_proj.weight": (f, hid),
        "mlp.down_proj.weight": (hid, f),
    }
    assert set(shapes) <= set(_layer_tensor_specs(c))
    tensors = {
        "model.embed_tokens.weight": rng.normal(0, scale, (c.vocab_size, hid)),
        "model.norm.weight": np.ones(hid),
        "lm_head.weight": rng.normal(0, scale, (c.vocab_size, hid)),
    }
    for i in range(c.num_layers):
        for name, shape in shapes.items():
            norm = name.endswith("layernorm.weight")
            tensors[f"model.layers.{i}.{name}"] = np.ones(shape) if norm else rng.normal(0, scale, shape)
    return {k: v.astype(np.float32) for k, v in tensors.items()}


def make_random_checkpoint(
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> ModelConfig:
    """Writes a converted checkpoint (loadable by `load_checkpoint`) of a random Llama over `tokenizer`."""
    config = ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=tokenizer.eos_token_ids,
    )
    params = hf_tensors_to_params(config, random_hf_tensors(config, seed))
    save_checkpoint(out_dir, config, params, tokenizer, source=f"random (seed {seed})")
    return config
