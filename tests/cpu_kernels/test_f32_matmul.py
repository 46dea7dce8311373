"""The C++ float32 matmul (XLA FFI) against a float64 numpy oracle, on shapes that reach every path
of the kernel (weights [K, N]: up to `stream_rows` rows streamed in order, 8 weight rows at a time
and the rest one at a time, 5-8 rows in register blocks of 48 or 64 columns and 16 at their end,
K in runs summed in order, a per-column tail; more by row tiles of 6
and of 1-5 rows, 64- and 16-column strips and the per-column tail; weights [N, K]: groups of four
columns by tiles of 6, 3 and 1 rows, K not a multiple of 16, the per-column tail), and
`Attention.matmul`, which chooses it for the CPU kernels' few-row slabs (the model's projections and
LM head) and XLA's dot otherwise. The widths named are AVX-512's; an AVX2 build has 8-float vectors
(e.g. 16-column strips, packed when more than two row tiles read them, and 2-row dot tiles), which
`test_the_avx2_build_matches_the_oracle` runs where the host's own build is AVX-512."""

from __future__ import annotations

import os
import pathlib
import platform
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpu_kernels import build
from cpu_kernels.matmul import STREAM_ROWS, f32_matmul
from fastgen_jax.attention import Attention, f32_kernel_rows

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def random_inputs(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)


def assert_close(got, x, w):
    """float32 sums in another order: the error bounded by the magnitudes summed, not the result."""
    expected = x.astype(np.float64) @ w.astype(np.float64)
    bound = (np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64))) * 1e-6 + 1e-7
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.all(np.abs(got - expected) <= bound), np.max(np.abs(got - expected) / bound)


@given(
    m=st.integers(1, 20),
    k=st.sampled_from([16, 32, 576, 48, 5, 17, 100, 24, 40]),  # 24, 40: K % 16 == 8 (AVX2's last 8)
    n=st.integers(1, 200),
    w_nk=st.booleans(),
    stream_rows=st.sampled_from([0, 3, STREAM_ROWS]),
    seed=st.integers(0, 2**16),
)
@SETTINGS
def test_matches_the_oracle(m, k, n, w_nk, stream_rows, seed):
    x, w = random_inputs(m, k, n, seed)
    given = jnp.asarray(w.T.copy() if w_nk else w)
    got = f32_matmul(jnp.asarray(x), given, w_nk=w_nk, stream_rows=stream_rows)
    assert_close(np.asarray(got), x, w)


@pytest.mark.parametrize("m, k, n", [(5, 576, 176), (6, 100, 200), (7, 1536, 960), (8, 100, 176)])
def test_five_to_eight_streamed_rows_match_the_oracle(m, k, n):
    """5-8 rows stream in register blocks (64 columns for 5-6 rows, 48 for 7-8), then 16 columns at a
    time, then the per-column tail; K = 100 leaves weight rows past the last group of 8."""
    x, w = random_inputs(m, k, n, seed=m)
    assert_close(np.asarray(f32_matmul(jnp.asarray(x), jnp.asarray(w), stream_rows=STREAM_ROWS)), x, w)


@pytest.mark.parametrize("m", [1, 2, 6, 8, 32, 33, 300])
@pytest.mark.parametrize("k, n", [(576, 960), (1536, 576)])
def test_model_sized_projections_match_the_oracle(m, k, n):
    x, w = random_inputs(m, k, n, seed=m)
    assert_close(np.asarray(jax.jit(f32_matmul)(x, w)), x, w)
    tiles = jax.jit(lambda x, w: f32_matmul(x, w, stream_rows=0))(x, w)  # what m > STREAM_ROWS takes
    assert_close(np.asarray(tiles), x, w)
    got = jax.jit(lambda x, w: f32_matmul(x, w, w_nk=True))(x, w.T.copy())
    assert_close(np.asarray(got), x, w)


@pytest.mark.parametrize(
    "m, k, n",
    [(1, 576, 49152 // 16), (3, 592, 3075), (8, 48, 1030), (9, 576, 1030), (6, 584, 1030), (2, 24, 70)],
)
def test_few_rows_of_the_dot_form_match_the_oracle(m, k, n):
    """w [N, K] at up to 8 rows reads each column's weights in order (K % 32 == 16 leaves a last 16;
    with AVX2, K % 16 == 8 a last 8, and 5-8 rows a second pass over each column), in work items of
    64-256 columns with groups of 4 and single columns at their ends; 9 rows take the column-group
    tiles."""
    x, w = random_inputs(m, k, n, seed=n)
    got = jax.jit(lambda x, w: f32_matmul(x, w, w_nk=True))(x, w.T.copy())
    assert_close(np.asarray(got), x, w)


@pytest.mark.parametrize("w_nk", [False, True])
@pytest.mark.parametrize("m, real", [(16, 5), (16, 0), (16, 16), (4, 1), (32, 9), (8, -3), (8, 99)])
def test_only_the_real_rows_are_multiplied_as_a_call_on_them_alone(m, real, w_nk):
    """`rows` (traced): the first rows' results are those of a call on them alone, bit for bit (the
    same path: 5 of 16 rows stream), the padding rows' are zeros; `rows` is clamped to [0, M]."""
    x, w = random_inputs(m, 576, 200, seed=m + real)
    given = jnp.asarray(w.T.copy() if w_nk else w)
    got = np.asarray(jax.jit(lambda x, r: f32_matmul(x, given, w_nk=w_nk, rows=r))(x, jnp.int32(real)))
    n_real = min(max(real, 0), m)
    alone = np.asarray(f32_matmul(jnp.asarray(x[:n_real]), given, w_nk=w_nk))
    np.testing.assert_array_equal(got[:n_real], alone)
    assert not got[n_real:].any()
    if n_real:
        assert_close(got[:n_real], x[:n_real], w)


def test_zero_rows_give_an_empty_result():
    x, w = random_inputs(0, 32, 8)
    assert f32_matmul(jnp.asarray(x), jnp.asarray(w)).shape == (0, 8)


@pytest.mark.parametrize("stream_rows", [0, STREAM_ROWS])
def test_an_empty_contraction_gives_zeros(stream_rows):
    x, w = random_inputs(3, 0, 200)  # wide enough that a strip asks for the next one's (no) rows
    got = np.asarray(f32_matmul(jnp.asarray(x), jnp.asarray(w), stream_rows=stream_rows))
    assert got.shape == (3, 200) and not got.any()


@pytest.mark.parametrize("m", [1, 4, STREAM_ROWS])
def test_few_rows_give_the_same_bits_every_call(m):
    """The streamed path sums its runs of K in a fixed order, whichever thread took which run."""
    x, w = random_inputs(m, 1536, 576, seed=m)
    mm = jax.jit(f32_matmul)
    first = np.asarray(mm(x, w))
    for _ in range(20):
        np.testing.assert_array_equal(np.asarray(mm(x, w)), first)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x, w: (x.astype(jnp.bfloat16), w), "dtype"),
        (lambda x, w: (x, w.astype(jnp.bfloat16)), "dtype"),
        (lambda x, w: (x[:, :-1], w), "do not match"),
        (lambda x, w: (x[0], w), "want"),
    ],
)
def test_bad_inputs_raise(change, match):
    x, w = (jnp.asarray(a) for a in random_inputs(2, 32, 8))
    with pytest.raises(ValueError, match=match):
        f32_matmul(*change(x, w))


def _hlo(attention, x, w, **kw):
    return jax.jit(lambda x, w: attention.matmul(x, w, **kw)).lower(x, w).as_text()


# the kernel's tiles are sized for AVX-512 and AVX2 + FMA; elsewhere XLA takes every slab
KERNEL = build.vector_lanes() in (8, 16)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86 -march")
@pytest.mark.parametrize("march, lanes", [("x86-64", 0), ("x86-64-v3", 8), ("x86-64-v4", 16)])
def test_the_vector_width_follows_the_librarys_march(monkeypatch, march, lanes):
    monkeypatch.setenv("FASTGEN_KERNEL_MARCH", march)
    build.vector_lanes.cache_clear()
    try:
        assert build.vector_lanes() == lanes
    finally:
        monkeypatch.delenv("FASTGEN_KERNEL_MARCH")
        build.vector_lanes.cache_clear()


def test_the_vector_width_decides_the_rows_the_kernel_takes(monkeypatch):
    from fastgen_jax import attention

    for lanes, rows in ((16, 512), (8, 128), (0, 0)):
        monkeypatch.setattr(build, "vector_lanes", lambda lanes=lanes: lanes)
        assert f32_kernel_rows() == rows
        assert Attention("cpu").reads_weight_stacks == (rows > 0)
    monkeypatch.setattr(attention, "F32_KERNEL_ROWS", 3)
    assert f32_kernel_rows() == 3


def test_the_cpu_kernels_take_few_float32_rows_and_xla_the_rest():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((32, 3, 8)), jnp.float32)  # [K, heads, D], as wqkv's slices
    limit = max(f32_kernel_rows(), 1)
    few = jnp.asarray(rng.standard_normal((limit, 32)), jnp.float32)
    many = jnp.asarray(rng.standard_normal((limit + 1, 32)), jnp.float32)
    assert ("fastgen_f32_matmul" in _hlo(Attention("cpu"), few, w)) == KERNEL
    assert ("fastgen_f32_matmul" in _hlo(Attention("cpu"), few, w[:, 0, :].T, w_nk=True)) == KERNEL
    assert "fastgen_f32_matmul" not in _hlo(Attention("cpu"), many, w)
    assert ("fastgen_f32_matmul" in _hlo(Attention("cpu"), few[:1], w)) == KERNEL
    assert ("fastgen_f32_matmul" in _hlo(Attention("cpu"), few[:1], w[:, 0, :].T, w_nk=True)) == KERNEL
    assert "fastgen_f32_matmul" not in _hlo(Attention("reference"), few, w)
    assert "fastgen_f32_matmul" not in _hlo(
        Attention("cpu"), few.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    )
    for x in (few, many, few[:1]):
        expected = np.einsum("tk,khd->thd", np.asarray(x, np.float64), np.asarray(w, np.float64))
        for attention in (Attention("cpu"), Attention("reference")):
            got = np.asarray(attention.matmul(x, w))
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_head_of_more_rows_than_the_kernel_takes_multiplies_the_used_rows_by_the_kernel(monkeypatch):
    """The LM head of a prompt step's bucket ([N, K], `rows=`): the kernel when the used rows fit
    it, XLA's dot when they do not; the used rows' logits are the same either way."""
    from fastgen_jax import attention

    monkeypatch.setattr(attention, "F32_KERNEL_ROWS", 4)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((12, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((40, 32)), jnp.float32)  # [N, K]
    head = jax.jit(lambda x, w, rows: Attention("cpu").matmul(x, w, w_nk=True, rows=rows))
    hlo = head.lower(x, w, jnp.int32(3)).as_text()
    assert ("fastgen_f32_matmul" in hlo) == KERNEL
    expected = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    for used in (1, 4, 5, 12):
        got = np.asarray(head(x, w, jnp.int32(used)))
        np.testing.assert_allclose(got[:used], expected[:used], rtol=1e-5, atol=1e-5)
        if KERNEL and used <= 4:  # the kernel leaves the unused rows zero
            np.testing.assert_array_equal(got[used:], 0.0)


def test_two_contracted_axes_as_the_output_projection():
    """wo [heads, head_dim, hidden] contracts the attention output's last two axes."""
    rng = np.random.default_rng(1)
    out = jnp.asarray(rng.standard_normal((5, 3, 16)), jnp.float32)
    wo = jnp.asarray(rng.standard_normal((3, 16, 40)), jnp.float32)
    expected = np.einsum("thk,hkd->td", np.asarray(out, np.float64), np.asarray(wo, np.float64))
    assert ("fastgen_f32_matmul" in _hlo(Attention("cpu"), out, wo)) == KERNEL
    np.testing.assert_allclose(np.asarray(Attention("cpu").matmul(out, wo)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("w_nk", [False, True])
def test_a_stack_indexed_by_a_traced_layer_in_scan_matches_each_layer(w_nk):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((7, 48)), jnp.float32)
    ws = rng.standard_normal((3, 48, 70)).astype(np.float32)
    stack = jnp.asarray(np.swapaxes(ws, 1, 2).copy() if w_nk else ws)

    def body(carry, layer):
        return carry, f32_matmul(carry, stack, w_nk=w_nk, layer=layer)

    _, out = jax.jit(lambda x: jax.lax.scan(body, x, jnp.arange(3)))(x)
    for layer in range(3):
        assert_close(np.asarray(out[layer]), np.asarray(x), ws[layer])


def test_a_layer_outside_the_stack_is_an_error():
    x, w = random_inputs(2, 16, 8)
    with pytest.raises(Exception, match="layer out of range"):
        jax.block_until_ready(f32_matmul(jnp.asarray(x), jnp.asarray(w[None]), layer=1))


@pytest.mark.skipif(not KERNEL, reason="the float32 kernel runs only where the library has AVX-512 or AVX2")
def test_the_model_reads_each_layers_weights_in_place_from_the_stack():
    """A scanned slice handed to a custom call is first copied out of the stack (4-20 ms of
    SmolLM2's projections at 4-128 rows); with the CPU kernels the model passes the whole stack and
    the layer, so in the compiled step every projection's kernel call takes a [L, K, N] operand."""
    from fastgen_jax.models import build_model, init_kv_cache
    from tests.paged import chunk_metadata
    from tests.test_attention_dispatch import random_params, tiny_config

    config = tiny_config(sliding_window=None)
    params = random_params(config)
    kv = init_kv_cache(config, 8, 8, jnp.float32)
    md = chunk_metadata(0, 5, [1, 2], 8, 2, 8, 16)
    step = jax.jit(build_model(config, jnp.float32, Attention("cpu"), None).apply)
    compiled = step.lower(params, jnp.zeros(16, jnp.int32), kv, md).compile().as_text()
    calls = [line for line in compiled.splitlines() if 'custom_call_target="fastgen_f32_matmul"' in line]
    weights = [re.findall(r"f32\[([\d,]*)\]", line.split("custom-call(", 1)[1])[1] for line in calls]
    stacked = [
        shape for shape in weights if shape.count(",") == 2 and shape.startswith(f"{config.num_layers},")
    ]
    # every projection of the layer reads its stack; the LM head (outside the scan) its own [N, K]
    assert len(calls) >= 4 and len(stacked) == len(calls) - 1, weights
    # (the logits against the reference: tests/test_attention_dispatch.py, the CPU kernel's model test)


def test_the_kernels_compile_without_avx512():
    """`FASTGEN_KERNEL_MARCH=x86-64-v3` (AVX2, no AVX-512: other CPUs, valgrind) must still build."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("an x86 -march")
    # -O0: quicker, and GCC still rejects what AVX2 cannot hold (an asm's 64-byte register operand)
    flags = [f for f in build.COMPILE_FLAGS if not f.startswith(("-march=", "-O"))] + [
        "-march=x86-64-v3",
        "-O0",
    ]
    for source in build.SOURCES:
        done = subprocess.run(
            [
                os.environ.get("CXX", "g++"),
                *flags,
                "-I",
                jax.ffi.include_dir(),
                "-c",
                str(source),
                "-o",
                os.devnull,
            ],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.skipif(
    build.vector_lanes() == 8 or not {"avx2", "fma"} <= set(build.cpu_features().split()),
    reason="the native build is the AVX2 one (this file tests it), or the CPU cannot run AVX2 code",
)
def test_the_avx2_build_matches_the_oracle():
    """An AVX-512 host's own build never runs the AVX2 + FMA tiles (16 registers, 8 lanes), which
    AVX2-only CPUs (e.g. AMD Zen 2/3) do: this file's tests, the packed and int8 kernels' run again in a
    subprocess on the library built with `FASTGEN_KERNEL_MARCH=x86-64-v3`."""
    root = pathlib.Path(__file__).resolve().parents[2]
    env = {**os.environ, "FASTGEN_KERNEL_MARCH": "x86-64-v3"}
    lanes = subprocess.run(
        [sys.executable, "-c", "from cpu_kernels import build; print(build.vector_lanes())"],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    assert lanes.stdout.strip() == "8"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "-k",
            "not avx2_build and not compile_without",
            "tests/cpu_kernels/test_f32_matmul.py",
            "tests/cpu_kernels/test_f32_packed_matmul.py",
            "tests/cpu_kernels/test_int8_matmul.py",
        ],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
