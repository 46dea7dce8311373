"""The packed float32 projections (`cpu_kernels.matmul.f32_packed_matmul`, `fastgen_jax.weight_layout`):
the kernel against a float64 numpy oracle on shapes that reach its paths (row tiles of 1-6 rows, two
tiles in turns or three asking for the next strip, a last strip narrower than the build's strip, stacks
indexed by a traced layer, padding rows, K = 0), a row's bits independent of the other rows, and a
model whose projections are packed against the reference model. `test_the_avx2_build_matches_the_oracle`
(test_f32_matmul.py) runs this file again on an AVX2 build where the host's own is AVX-512."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpu_kernels import build
from cpu_kernels.matmul import f32_packed_matmul, pack_f32, unpack_f32
from fastgen_jax import parallel, weight_layout
from fastgen_jax.attention import Attention
from tests.cpu_kernels.test_f32_matmul import assert_close, random_inputs

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
STRIP = build.packed_strip()


def packed_product(x, w, **kw):
    return np.asarray(f32_packed_matmul(jnp.asarray(x), pack_f32(jnp.asarray(w)), w.shape[-1], **kw))


def test_the_layout_is_strips_of_rows():
    w = np.arange(3 * 2 * (STRIP + 3), dtype=np.float32).reshape(3, 2, STRIP + 3)
    packed = np.asarray(pack_f32(jnp.asarray(w)))
    assert packed.shape == (3, 2, 2, STRIP)  # [L, strips, K, strip]
    np.testing.assert_array_equal(packed[:, 0], w[:, :, :STRIP])
    np.testing.assert_array_equal(packed[:, 1, :, :3], w[:, :, STRIP:])
    assert not packed[:, 1, :, 3:].any()  # the last strip's missing columns are zeros
    np.testing.assert_array_equal(np.asarray(unpack_f32(jnp.asarray(packed), STRIP + 3)), w)


@given(
    m=st.integers(1, 20),
    k=st.sampled_from([1, 5, 16, 24, 100, 576]),
    n=st.integers(1, 200),
    seed=st.integers(0, 2**16),
)
@SETTINGS
def test_matches_the_oracle(m, k, n, seed):
    x, w = random_inputs(m, k, n, seed)
    assert_close(packed_product(x, w), x, w)


@pytest.mark.parametrize("m", [1, 2, 6, 7, 8, 11, 12, 33, 300])
@pytest.mark.parametrize("k, n", [(576, 960), (1536, 576), (64, 3 * STRIP + 5)])
def test_model_sized_projections_match_the_oracle(m, k, n):
    x, w = random_inputs(m, k, n, seed=m)
    assert_close(packed_product(x, w), x, w)


@pytest.mark.parametrize("k, n", [(576, 200), (64, 20)])  # (64, 20): two strips, rows split in blocks
def test_a_row_gives_the_same_bits_whatever_rows_share_the_call(k, n):
    """Every row goes through the same tiles, summing K in order: the slab around it changes nothing
    (a sequence's tokens do not depend on what else the step batched), nor does a strip's rows being
    split into blocks where there are few strips for the threads."""
    x, w = random_inputs(37, k, n, seed=3)
    whole = packed_product(x, w)
    # 1, 8, 10, 12 and 7 rows: one tile; two in turns with AVX-512, three built for AVX2 (and at 13+)
    for lo, hi in [(0, 1), (5, 6), (3, 11), (20, 30), (25, 37), (30, 37)]:
        np.testing.assert_array_equal(packed_product(x[lo:hi], w), whole[lo:hi])


@pytest.mark.parametrize("m, real", [(16, 5), (16, 0), (16, 16), (4, 1), (8, -3), (8, 99)])
def test_only_the_real_rows_are_multiplied_as_a_call_on_them_alone(m, real):
    x, w = random_inputs(m, 100, 40, seed=m)
    got = jax.jit(lambda x, w, r: f32_packed_matmul(x, w, 40, rows=r))(x, pack_f32(jnp.asarray(w)), real)
    kept = min(max(real, 0), m)
    np.testing.assert_array_equal(np.asarray(got)[:kept], packed_product(x[:kept], w))
    assert not np.asarray(got)[kept:].any()


def test_an_empty_contraction_gives_zeros():
    got = packed_product(np.zeros((3, 0), np.float32), np.zeros((0, 20), np.float32))
    np.testing.assert_array_equal(got, np.zeros((3, 20), np.float32))


def test_a_stack_indexed_by_a_traced_layer_in_scan_matches_each_layer():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 48)).astype(np.float32)
    ws = rng.standard_normal((3, 48, 70)).astype(np.float32)
    packed = pack_f32(jnp.asarray(ws))

    @jax.jit
    def run(x, packed):
        return jax.lax.scan(lambda c, i: (c, f32_packed_matmul(x, packed, 70, layer=i)), 0, jnp.arange(3))[1]

    got = np.asarray(run(x, packed))
    for layer in range(3):
        assert_close(got[layer], x, ws[layer])
    with pytest.raises(Exception, match="layer out of range"):
        jax.block_until_ready(f32_packed_matmul(jnp.asarray(x), packed, 70, layer=3))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x, p, n: (x.astype(jnp.bfloat16), p, n), "dtype"),
        (lambda x, p, n: (x[:, :-1], p, n), "do not match"),
        (lambda x, p, n: (x, p, n + STRIP), "do not match"),
        (lambda x, p, n: (x, p[..., :-1], n), "strips of"),
        (lambda x, p, n: (x[0], p, n), "want"),
    ],
)
def test_bad_inputs_raise(change, match):
    """The wrapper's checks; `test_the_kernel_checks_shapes_itself` calls the custom call directly."""
    x, w = random_inputs(2, 32, 40)
    with pytest.raises(ValueError, match=match):
        f32_packed_matmul(*change(jnp.asarray(x), pack_f32(jnp.asarray(w)), 40))


# ----------------------------------------------------------------------------- the model


@pytest.fixture
def packed_layout(monkeypatch):
    monkeypatch.setattr(weight_layout, "PACKED", True)


@pytest.mark.parametrize("fused, tied", [(False, True), (True, True), (True, False)])
def test_a_model_with_packed_projections_matches_the_reference(packed_layout, fused, tied):
    """Every projection kind packed (q/k/v apart or fused, the output projection's two contracted
    axes, gate/up apart or fused, down) and the LM head (a tied embedding, whose lookup then reads
    the packed copy, or an untied head; 61 tokens: a last strip part padding), through the model's
    scan and paged cache: the logits of the reference model on the unpacked weights."""
    from tests.paged import paged_logits
    from tests.test_attention_dispatch import REFERENCE, random_params, tiny_config

    config = tiny_config(sliding_window=None, tie_word_embeddings=tied)
    params = random_params(config)
    if fused:
        params = {"params": parallel.fuse_projections(params["params"], 1)}
    packed = weight_layout.pack_params(jax.tree.map(lambda a: a, params))  # it consumes its dicts
    layers = packed["params"]["layers"]
    names = {name for tree in layers.values() if isinstance(tree, dict) for name in tree}
    assert names and all(not n.startswith("w") or n.endswith("_packed") for n in names), names
    top = set(packed["params"])
    assert top >= ({"embed_packed"} if tied else {"embed", "lm_head_packed"}), top
    assert not top & ({"embed", "lm_head"} if tied else {"embed_packed", "lm_head"}), top
    ids = np.random.default_rng(1).integers(0, config.vocab_size, 29).tolist()
    kw = dict(chunks=[5, 11, 1, 12], page_size=8, slab=16)
    expected = paged_logits(config, params, ids, attention=REFERENCE, **kw)
    got = paged_logits(config, packed, ids, attention=Attention("cpu"), **kw)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_the_engine_packs_its_projections_and_the_step_reads_them_in_place(packed_layout):
    """The runner packs the layer stack on the CPU kernels, and the compiled step multiplies every
    projection by the packed kernel over its whole stack [L, strips, K, strip] (no slice copied out,
    no XLA dot), and the LM head by the same kernel. Greedy tokens equal the reference engine's."""
    from tests.test_attention_dispatch import engine_greedy_tokens

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 61, n).tolist() for n in (21, 3, 9)]
    tokens, engine = engine_greedy_tokens("cpu", prompts, 6, keep_engine=True)
    runner = engine.runner
    layers = runner.params["params"]["layers"]
    leaves = {name for tree in layers.values() if isinstance(tree, dict) for name in tree}
    assert {"wqkv_packed", "wo_packed", "w_gate_up_packed", "w_down_packed"} <= leaves, leaves
    text = next(iter(runner._executables.values())).as_text()
    calls = [line for line in text.splitlines() if 'custom_call_target="fastgen_f32_packed_matmul"' in line]
    operands = [re.findall(r"f32\[([\d,]*)\]", line.split("custom-call(", 1)[1])[1] for line in calls]
    layer_calls = [o for o in operands if o.count(",") == 3]  # the stacks; then the head's [strips, K, strip]
    assert len(layer_calls) == 4 and all(
        o.startswith(f"{runner.model_config.num_layers},") for o in layer_calls
    )
    assert all(o.endswith(f",{STRIP}") for o in operands), operands
    c = runner.model_config
    assert len(operands) == 5 and f"{-(-c.vocab_size // STRIP)},{c.hidden_size},{STRIP}" in operands, operands
    assert tokens == engine_greedy_tokens("reference", prompts, 6)


def test_the_kernel_checks_shapes_itself():
    """The C++ handler refuses shapes the wrapper would have caught (a call made without it)."""
    x, w = random_inputs(2, 32, 40)
    packed = pack_f32(jnp.asarray(w))
    f32_packed_matmul(jnp.asarray(x), packed, 40)  # registers the target
    index, rows = jnp.zeros(1, jnp.int32), jnp.full(1, 2, jnp.int32)

    def call(x, w, n):
        out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
        return jax.ffi.ffi_call("fastgen_f32_packed_matmul", out)(x, w, index, rows)

    for args, match in [
        ((x[:, :-1], packed, 40), "do not match"),  # K
        ((x, packed, 40 + STRIP), "do not match"),  # strips for N
        ((x, packed[..., :-1], 40), "strips of"),
    ]:
        with pytest.raises(Exception, match=match):
            jax.block_until_ready(call(*args))


@pytest.mark.parametrize("dtype, quantize", [("bfloat16", "none"), ("float32", "int8")])
def test_bfloat16_and_int8_engines_keep_their_weights_unpacked(packed_layout, dtype, quantize):
    from fastgen_jax.config import EngineConfig
    from fastgen_jax.runner import ModelRunner
    from tests.test_attention_dispatch import random_params, tiny_config

    config = tiny_config()
    engine = EngineConfig(max_num_seqs=2, page_size=8, num_pages=8, max_model_len=32, attention_impl="cpu")
    runner = ModelRunner(config, random_params(config), dataclasses.replace(engine, quantize=quantize), dtype)
    assert runner.attention.packs_weights
    leaves = jax.tree_util.tree_flatten_with_path(runner.params)[0]
    assert not [path for path, _ in leaves if "packed" in jax.tree_util.keystr(path)]


def test_pack_params_refuses_a_projection_that_is_not_float32():
    from tests.test_attention_dispatch import random_params, tiny_config

    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), random_params(tiny_config()))
    with pytest.raises(ValueError, match="only float32"):
        weight_layout.pack_params(params)
