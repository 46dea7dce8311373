"""Small random models of every family with a real tokenizer: for server tests, soak runs and host-side
benchmarks.

The weights are random (normal, std `scale`), so the text is gibberish, but every code path a real
model takes (tokenizer, chat template, EOS, paged attention, routing, sampling) runs, and a step costs
little.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from fastgen_jax.checkpoints.converted import save_checkpoint
from fastgen_jax.config import ModelConfig
from fastgen_jax.tokenizer import Tokenizer

# Named shapes for benchmarks: (hidden, layers, heads, kv heads, intermediate, vocab, max positions).
SHAPES = {
    "tiny": (64, 2, 4, 2, 128, None, 2048),
    "llama2-7b": (4096, 32, 32, 32, 11008, 32000, 4096),
    "llama3-8b": (4096, 32, 32, 8, 14336, 128256, 8192),
}
_TINY_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64)
# Tiny shapes of the other families: the "tiny" shape under another architecture, plus its switches.
FAMILY_SHAPES = {
    "tiny-qwen3": dict(architecture="Qwen3ForCausalLM", qk_norm=True),
    "tiny-phi3": dict(architecture="Phi3ForCausalLM"),
    "tiny-mixtral": dict(architecture="MixtralForCausalLM", **{**_TINY_MOE, "moe_intermediate_size": 128}),
    "tiny-qwen2-moe": dict(
        architecture="Qwen2MoeForCausalLM",
        attention_bias=True,
        norm_topk_prob=False,
        shared_expert_intermediate_size=96,
        **_TINY_MOE,
    ),
    "tiny-qwen3-moe": dict(
        architecture="Qwen3MoeForCausalLM", qk_norm=True, norm_topk_prob=False, **_TINY_MOE
    ),
    "tiny-gemma2": dict(
        architecture="Gemma2ForCausalLM",
        norm_plus_one=True,
        post_norms=True,
        embed_scale=True,
        hidden_act="gelu_tanh",
        tie_word_embeddings=True,
        query_pre_attn_scalar=16.0,
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
        sliding_window=64,
        layer_types=("sliding_attention", "full_attention"),
    ),
    "tiny-gemma3": dict(
        architecture="Gemma3ForCausalLM",
        norm_plus_one=True,
        post_norms=True,
        embed_scale=True,
        hidden_act="gelu_tanh",
        tie_word_embeddings=True,
        qk_norm=True,
        query_pre_attn_scalar=16.0,
        sliding_window=64,
        layer_types=("sliding_attention", "full_attention"),
        rope_local_theta=10000.0,
        rope_theta=1000000.0,
    ),
    "tiny-falcon": dict(
        architecture="FalconForCausalLM",
        norm_kind="layer",
        mlp_gated=False,
        hidden_act="gelu",
        parallel_attn=True,
        parallel_norms=2,
        tie_word_embeddings=True,
    ),
    "tiny-opt": dict(
        architecture="OPTForCausalLM",
        num_kv_heads=4,
        norm_kind="layer",
        mlp_gated=False,
        hidden_act="relu",
        attention_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        position_embedding="learned",
        learned_pos_offset=2,
        tie_word_embeddings=True,
    ),
}
ALL_SHAPES = (*SHAPES, *FAMILY_SHAPES)


def shape_config(shape: str, tokenizer: Tokenizer) -> ModelConfig:
    """The ModelConfig of a named shape (see SHAPES and FAMILY_SHAPES) over `tokenizer`."""
    extra = FAMILY_SHAPES.get(shape, {})
    hidden, layers, heads, kv_heads, intermediate, vocab, positions = SHAPES[
        "tiny" if shape in FAMILY_SHAPES else shape
    ]
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
    return dataclasses.replace(config, **extra)


_TILED_ABOVE = 1 << 26  # weights of more elements repeat one block of _TILE draws
_TILE = 1_000_003  # prime: the repeats do not line up with rows


def random_params(config: ModelConfig, seed: int = 0, scale: float = 0.3, dtype=np.float32):
    """{"params": ...} of random weights in our layout for `config`: norm weights at their neutral
    value (1, or 0 for (1 + w) norms), everything else normal with std `scale` (the largest ones, over
    _TILED_ABOVE elements, repeat one block of such draws: numpy drew a 7B model's for minutes)."""
    from fastgen_jax.models import param_shapes

    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.full(shape.shape, 0.0 if config.norm_plus_one else 1.0, dtype)
        if name == "bias" or name.startswith("b"):  # norm and projection biases
            return np.zeros(shape.shape, dtype)
        size = int(np.prod(shape.shape))
        if size > _TILED_ABOVE:  # a 7B model's stacks: one block of draws repeated (seconds, not minutes)
            block = (rng.standard_normal(_TILE, np.float32) * scale).astype(dtype)
            return np.resize(block, shape.shape)
        return (rng.standard_normal(shape.shape, np.float32) * scale).astype(dtype)

    import jax

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(config))


def make_random_checkpoint(
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer,
    shape: str = "tiny",
    seed: int = 0,
    dtype: str = "float32",
) -> ModelConfig:
    """Writes a converted checkpoint (loadable by `load_checkpoint`) of a random model of a named
    `shape` (see SHAPES, FAMILY_SHAPES) over `tokenizer`. Weights of large shapes are scaled down
    (std 0.02) so activations stay finite in bfloat16."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    config = shape_config(shape, tokenizer)
    scale = 0.3 if shape not in ("llama2-7b", "llama3-8b") else 0.02
    params = random_params(config, seed, scale, np.dtype(dtype))
    save_checkpoint(out_dir, config, params, tokenizer, source=f"random (seed {seed})")
    return config
