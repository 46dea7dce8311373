"""Weight-only int8 (`quantize="int8"`): the per-channel quantization, the model over int8 weights
against the float32 model over the same weights dequantized (the int8 path must change nothing but
the weights' precision), through the C++ kernel and XLA's path, and the whole engine."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastgen_jax import parallel, quantize
from fastgen_jax.attention import INT8_BF16_ROWS, INT8_KERNEL_ROWS, Attention
from fastgen_jax.checkpoints import Checkpoint
from fastgen_jax.config import ConfigError, EngineConfig
from fastgen_jax.llm_engine import LLMEngine
from tests.paged import paged_logits
from tests.test_attention_dispatch import random_params, tiny_config, word_tokenizer
from tests.test_llm_engine import run_all


def test_each_channel_round_trips_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 40, 24)).astype(np.float32) * rng.uniform(0.01, 3, 24).astype(np.float32)
    w[1, :, 5] = 0.0  # an all-zero channel
    q, scale = quantize.quantize_int8(jnp.asarray(w), 1)
    q, scale = np.asarray(q), np.asarray(scale)
    assert q.dtype == np.int8 and q.shape == (3, 24, 40) and scale.shape == (3, 24)
    assert np.abs(q).max() == 127 and q.min() >= -127
    # every channel's largest weight maps to +-127, and every weight to within half a step
    np.testing.assert_array_equal(np.abs(q[0]).max(axis=1), 127)
    back = np.asarray(quantize.dequantize(jnp.asarray(q), jnp.asarray(scale)))
    assert np.all(np.abs(back - w) <= scale[:, None, :] / 2 * (1 + 1e-6))
    assert scale[1, 5] == 1.0 and not q[1, 5].any()


def test_two_contracted_axes_flatten_in_order():
    w = np.random.default_rng(1).standard_normal((2, 3, 4, 5)).astype(np.float32)  # [L, H, D, N]
    q, scale = quantize.quantize_int8(jnp.asarray(w), 2)
    back = np.asarray(quantize.dequantize(q, scale)).reshape(w.shape)
    np.testing.assert_allclose(back, w, atol=float(np.asarray(scale).max()) / 2 + 1e-7)


def quantized_and_dequantized(config, params):
    """(int8 variables as the engine builds them, float32 variables of the same weights dequantized,
    the config of the latter: untied, since its LM head is the dequantized embedding)."""
    fused = parallel.fuse_projections(params, 1)
    int8 = quantize.quantize_params(fused, config.tie_word_embeddings)

    def restore(tree):
        out = {}
        for name, value in tree.items():
            if isinstance(value, dict):
                out[name] = restore(value)
            elif name in quantize.PROJECTIONS:
                q, scale = quantize.quantize_int8(value, quantize.PROJECTIONS[name])
                out[name] = quantize.dequantize(q, scale).reshape(value.shape)
            else:
                out[name] = value
        return out

    plain = restore(params["params"])
    head = params["params"]["embed"] if config.tie_word_embeddings else plain["lm_head"]
    q, scale = quantize.quantize_int8(head.T[None], 1)
    plain["lm_head"] = quantize.dequantize(q, scale)[0].T
    return int8, {"params": plain}, dataclasses.replace(config, tie_word_embeddings=False)


@pytest.mark.parametrize(
    "attention, slab, tied",
    [
        (Attention("cpu"), 16, True),  # the C++ kernel
        (Attention("cpu"), 2 * INT8_BF16_ROWS, False),  # XLA's bfloat16 dot
        pytest.param(Attention("reference"), 16, False, marks=pytest.mark.slow),  # XLA's float32 dot
    ],
)
def test_int8_logits_match_the_dequantized_float32_model(attention, slab, tied):
    """The same weights in float32: only the rows' rounding to bfloat16 (every int8 path) differs."""
    config = tiny_config(tie_word_embeddings=tied, attention_bias=True)
    params = random_params(config)
    int8, plain, plain_config = quantized_and_dequantized(config, params)
    tokens = np.random.default_rng(2).integers(3, 61, 23).tolist()
    chunks = [9, 1, 13]
    got = paged_logits(config, int8, tokens, chunks, slab=slab, attention=attention)
    want = paged_logits(plain_config, plain, tokens, chunks, slab=slab, attention=attention)
    np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2 * np.abs(want).max())
    if tied:  # and it is a real change of weights: the float32 model's logits differ
        exact = paged_logits(config, params, tokens, chunks, slab=slab, attention=attention)
        assert np.abs(exact - got).max() > 1e-3 * np.abs(exact).max()


@pytest.mark.skipif(not Attention("cpu").reads_weight_stacks, reason="no stacks without the kernel")
def test_the_kernel_reads_each_layers_int8_weights_in_place_with_the_slices_results(monkeypatch):
    """With `Attention.reads_weight_stacks` the scanned layers hand the kernel their whole int8 stacks
    and the layer's index (no copy of a slice first): the same products, bit for bit."""
    import cpu_kernels.matmul

    config = tiny_config(tie_word_embeddings=True)
    int8, _, _ = quantized_and_dequantized(config, random_params(config))
    tokens = np.random.default_rng(3).integers(3, 61, 11).tolist()
    layers = []
    kernel = cpu_kernels.matmul.int8_matmul

    def spy(*args, layer=None, **kwargs):
        layers.append(layer)
        return kernel(*args, layer=layer, **kwargs)

    monkeypatch.setattr(cpu_kernels.matmul, "int8_matmul", spy)
    in_place = paged_logits(config, int8, tokens, [5, 1, 5], slab=8, attention=Attention("cpu"))
    assert any(layer is not None for layer in layers) and any(layer is None for layer in layers)  # the head
    layers.clear()
    monkeypatch.setattr(Attention, "reads_weight_stacks", property(lambda self: False))
    sliced = paged_logits(config, int8, tokens, [5, 1, 5], slab=8, attention=Attention("cpu"))
    assert layers and all(layer is None for layer in layers)
    np.testing.assert_array_equal(in_place, sliced)


@pytest.mark.parametrize("rows", [1, INT8_KERNEL_ROWS, INT8_BF16_ROWS + 1, 4 * INT8_BF16_ROWS])
def test_every_path_multiplies_rows_rounded_to_bfloat16_with_float32_sums(rows):
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 96)).astype(np.float32)
    q = rng.integers(-127, 128, (40, 96)).astype(np.int8)
    scale = rng.uniform(1e-3, 1e-2, 40).astype(np.float32)
    rounded = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    want = rounded @ q.T.astype(np.float64) * scale
    for attention in (Attention("cpu"), Attention("reference")):
        got = np.asarray(jax.jit(attention.int8_matmul)(x, q, scale))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert np.abs(got - x.astype(np.float64) @ q.T.astype(np.float64) * scale).max() > 0  # rounded


def test_the_kernel_serves_decode_sized_slabs_and_xla_the_rest():
    x = jnp.ones((INT8_KERNEL_ROWS, 32), jnp.float32)
    q, scale = jnp.ones((8, 32), jnp.int8), jnp.ones((8,), jnp.float32)

    def hlo(attention, rows):
        return jax.jit(attention.int8_matmul).lower(x[:rows], q, scale).as_text()

    assert "fastgen_int8_matmul" in hlo(Attention("cpu"), INT8_KERNEL_ROWS)
    assert "fastgen_int8_matmul" not in hlo(Attention("reference"), 4)
    wide = jnp.ones((INT8_KERNEL_ROWS + 1, 32), jnp.float32)
    assert "fastgen_int8_matmul" not in jax.jit(Attention("cpu").int8_matmul).lower(wide, q, scale).as_text()


def int8_engine(checkpoint) -> LLMEngine:
    engine_config = EngineConfig(
        token_budget=64,
        token_buckets=(4, 16, 64),  # decodes in the kernel, a long prompt chunk in the bfloat16 dot
        max_num_seqs=4,
        page_size=8,
        num_pages=40,
        max_model_len=96,
        quantize="int8",
        enable_prefix_caching=False,
    )
    return LLMEngine(checkpoint, engine_config, dtype="float32", progress=False)


def test_int8_greedy_batch_equals_one_at_a_time():
    """Rows go through different paths (kernel, float32 or bfloat16 dot) as the slab they share
    changes; the rows' common rounding keeps each request's tokens the same."""
    config = tiny_config(max_position_embeddings=128)
    engine = int8_engine(Checkpoint(config, random_params(config), word_tokenizer(config.vocab_size), ""))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 61, n).tolist() for n in (45, 3, 21)]
    batch = run_all(engine, prompts, [6] * len(prompts))
    assert batch == [run_all(engine, [p], [6])[0] for p in prompts]
    held = engine.runner.params["params"]  # and the engine really holds int8 weights
    assert held["layers"]["attn"]["wqkv_int8"].dtype == jnp.int8 and "wqkv" not in held["layers"]["attn"]
    assert (
        held["layers"]["mlp"]["w_gate_up_int8"].dtype == jnp.int8 and held["lm_head_int8"].dtype == jnp.int8
    )


def test_quantizing_over_a_mesh_passes_every_other_leaf_on_uncopied():
    """While loading, only the int8 copies are new: the embedding, norms and the rest are the very
    arrays the engine was handed (a copy of them would raise the load's peak memory)."""
    config = tiny_config()
    mesh = parallel.make_mesh(jax.devices()[:1])
    params = parallel.shard_params(random_params(config), config, mesh, np.float32)
    held = quantize.quantize_over(params, config, mesh)
    assert held["params"]["embed"] is params["params"]["embed"]
    layers, before = held["params"]["layers"], params["params"]["layers"]
    assert layers["attn_norm"]["scale"] is before["attn_norm"]["scale"]
    assert layers["attn"]["wqkv_int8"].dtype == jnp.int8
    want = quantize.quantize_params(params, config.tie_word_embeddings)  # the same values
    for a, b in zip(jax.tree.leaves(held), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("tied", [True, False])
def test_quantized_bytes_are_counted_without_quantizing(tied):
    """What `--kv_memory_fraction` subtracts for the weights under int8: the bytes the engine holds."""
    config = tiny_config(tie_word_embeddings=tied)
    params = random_params(config)
    held = quantize.quantize_params(parallel.fuse_projections(params, 1), tied)
    want = sum(x.nbytes for x in jax.tree.leaves(held))
    assert quantize.quantized_nbytes(params, tied) == want
    assert want < sum(x.nbytes for x in jax.tree.leaves(params))


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="quantize must be one of"):
        EngineConfig(quantize="int4")
