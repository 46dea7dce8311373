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
from fastgen_jax.attention import INT8_KERNEL_ROWS, Attention
from fastgen_jax.checkpoints import Checkpoint
from fastgen_jax.config import ConfigError, EngineConfig
from fastgen_jax.llm_engine import LLMEngine
from fastgen_jax.sampling_params import SamplingParams
from tests.paged import paged_logits
from tests.test_attention_dispatch import random_params, tiny_config, word_tokenizer


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
    "attention, slab, tied, tolerance",
    [
        (Attention("cpu"), INT8_KERNEL_ROWS, True, 1e-4),  # the C++ kernel: float32 rows
        # XLA's path (too many rows for the kernel, or no kernel): the rows round to bfloat16
        (Attention("cpu"), 4 * INT8_KERNEL_ROWS, False, 3e-2),
        (Attention("reference"), 16, False, 3e-2),
    ],
)
def test_int8_logits_equal_the_dequantized_float32_model(attention, slab, tied, tolerance):
    config = tiny_config(tie_word_embeddings=tied, attention_bias=True)
    params = random_params(config)
    int8, plain, plain_config = quantized_and_dequantized(config, params)
    tokens = np.random.default_rng(2).integers(3, 61, 23).tolist()
    chunks = [3, 1, 4, 4, 2, 4, 4, 1] if slab == INT8_KERNEL_ROWS else [9, 1, 13]
    assert max(chunks) <= slab
    got = paged_logits(config, int8, tokens, chunks, slab=slab, attention=attention)
    want = paged_logits(plain_config, plain, tokens, chunks, slab=slab, attention=attention)
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * np.abs(want).max())
    if tied:  # and it is a real change of weights: the float32 model's logits differ
        exact = paged_logits(config, params, tokens, chunks, slab=slab, attention=attention)
        assert np.abs(exact - got).max() > 1e-3 * np.abs(exact).max()


def test_many_rows_multiply_in_bfloat16_with_float32_sums():
    """XLA's path: the rows round to bfloat16, the int8 weights are exact there, the sums are float32."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2 * INT8_KERNEL_ROWS, 96)).astype(np.float32)
    q = rng.integers(-127, 128, (40, 96)).astype(np.int8)
    scale = rng.uniform(1e-3, 1e-2, 40).astype(np.float32)
    for attention in (Attention("cpu"), Attention("reference")):
        got = np.asarray(jax.jit(attention.int8_matmul)(x, q, scale))
        rows = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
        want = rows @ q.T.astype(np.float64) * scale
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_kernel_serves_decode_sized_slabs_and_xla_the_rest():
    x = jnp.ones((INT8_KERNEL_ROWS, 32), jnp.float32)
    q, scale = jnp.ones((8, 32), jnp.int8), jnp.ones((8,), jnp.float32)

    def hlo(attention, rows):
        return jax.jit(attention.int8_matmul).lower(x[:rows], q, scale).as_text()

    assert "fastgen_int8_matmul" in hlo(Attention("cpu"), INT8_KERNEL_ROWS)
    assert "fastgen_int8_matmul" not in hlo(Attention("reference"), 4)
    wide = jnp.ones((INT8_KERNEL_ROWS + 1, 32), jnp.float32)
    assert "fastgen_int8_matmul" not in jax.jit(Attention("cpu").int8_matmul).lower(wide, q, scale).as_text()


def engine_tokens(checkpoint, prompts, **options) -> tuple[list[list[int]], LLMEngine]:
    engine_config = EngineConfig(
        token_budget=INT8_KERNEL_ROWS,  # every slab through the kernel: float32 rows, as the reference
        token_buckets=(1, INT8_KERNEL_ROWS),
        max_num_seqs=4,
        page_size=8,
        num_pages=24,
        max_model_len=32,
        **options,
    )
    engine = LLMEngine(checkpoint, engine_config, dtype="float32", progress=False)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    ids = [engine.add_request(prompt_token_ids=p, sampling_params=params) for p in prompts]
    tokens = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return [tokens[i] for i in ids], engine


def test_the_int8_engine_generates_what_float32_generates_from_the_dequantized_weights():
    config = tiny_config()
    params = random_params(config)
    _, plain, plain_config = quantized_and_dequantized(config, params)
    tokenizer = word_tokenizer(config.vocab_size)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 61, n).tolist() for n in (21, 3, 9)]
    got, engine = engine_tokens(Checkpoint(config, params, tokenizer, ""), prompts, quantize="int8")
    want, _ = engine_tokens(Checkpoint(plain_config, plain, tokenizer, ""), prompts)
    assert got == want
    held = engine.runner.params["params"]  # and the engine really holds int8 weights
    assert held["layers"]["attn"]["wqkv_int8"].dtype == jnp.int8 and "wqkv" not in held["layers"]["attn"]
    assert (
        held["layers"]["mlp"]["w_gate_up_int8"].dtype == jnp.int8 and held["lm_head_int8"].dtype == jnp.int8
    )


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="quantize must be one of"):
        EngineConfig(quantize="int4")
    with pytest.raises(ConfigError, match="tensor_parallel=2"):
        EngineConfig(quantize="int8", tensor_parallel=2)
