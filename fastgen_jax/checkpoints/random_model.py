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

# Named shapes for benchmarks: (hidden, layers, heads, kv heads, intermediate, vocab, max positions).
SHAPES = {
    "tiny": (64, 2, 4, 2, 128, None, 2048),
    "llama2-7b": (4096, 32, 32, 32, 11008, 32000, 4096),
    "llama3-8b": (4096, 32, 32, 8, 14336, 128256, 8192),
}


def random_hf_tensors(
    config: ModelConfig, seed: int = 0, scale: float = 0.3, dtype=np.float32
) -> dict[str, np.ndarray]:
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

    def normal(shape):
        return (rng.standard_normal(shape, np.float32) * scale).astype(dtype)

    tensors = {
        "model.embed_tokens.weight": normal((c.vocab_size, hid)),
        "model.norm.weight": np.ones(hid, dtype),
        "lm_head.weight": normal((c.vocab_size, hid)),
    }
    for i in range(c.num_layers):
        for name, shape in shapes.items():
            norm = name.endswith("layernorm.weight")
            tensors[f"model.layers.{i}.{name}"] = np.ones(shape, dtype) if norm else normal(shape)
    return tensors


def make_random_checkpoint(
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer,
    shape: str = "tiny",
    seed: int = 0,
    dtype: str = "float32",
) -> ModelConfig:
    """Writes a converted checkpoint (loadable by `load_checkpoint`) of a random Llama of a named
    `shape` (see SHAPES) over `tokenizer`. Weights of large shapes are scaled down (std 0.02) so
    activations stay finite in bfloat16."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    hidden, layers, heads, kv_heads, intermediate, vocab, positions = SHAPES[shape]
    config = ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=vocab or tokenizer.vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=tokenizer.eos_token_ids,
    )
    scale = 0.3 if shape == "tiny" else 0.02
    np_dtype = np.dtype(dtype)
    params = hf_tensors_to_params(config, random_hf_tensors(config, seed, scale, np_dtype), np_dtype)
    save_checkpoint(out_dir, config, params, tokenizer, source=f"random (seed {seed})")
    return config
