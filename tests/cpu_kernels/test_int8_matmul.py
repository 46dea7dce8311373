"""The C++ weight-only int8 matmul (XLA FFI) against a float64 numpy oracle, on shapes that reach
every path of the kernel (bfloat16 products: rows widening in registers up to 8 rows and from a
buffer above, row tiles of 1-6; float32 products: K not a multiple of 32, row tiles of 6, 3 and 1, K
not a multiple of 16; column groups and the per-column tail), on single matrices and on stacks
indexed by a traced layer inside jit and scan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpu_kernels.matmul import int8_matmul

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def random_inputs(m, k, n, layers=None, seed=0):
    rng = np.random.default_rng(seed)
    lead = () if layers is None else (layers,)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    q = rng.integers(-127, 128, (*lead, n, k)).astype(np.int8)
    scale = rng.uniform(1e-3, 2e-2, (*lead, n)).astype(np.float32)
    return x, q, scale


def oracle(x, q, scale):
    """float64 (x @ q.T) * scale (exact products of the bfloat16 rows)."""
    return (np.asarray(x, np.float64) @ q.astype(np.float64).T) * scale.astype(np.float64)


def assert_close(got, expected, x, q, scale):
    # float32 sums in another order: bound the error by the magnitudes summed, not by the result.
    bound = (np.abs(np.asarray(x, np.float64)) @ np.abs(q.astype(np.float64)).T) * scale * 1e-6 + 1e-7
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.all(np.abs(got - expected) <= bound), np.max(np.abs(got - expected) / bound)


@given(
    m=st.integers(1, 20),
    k=st.sampled_from([32, 64, 576, 16, 48, 5, 17, 100, 24, 584]),  # 24, 584: K % 16 == 8
    n=st.integers(1, 140),
    seed=st.integers(0, 2**16),
)
@SETTINGS
def test_matches_the_oracle(m, k, n, seed):
    x, q, scale = random_inputs(m, k, n, seed=seed)
    got = np.asarray(int8_matmul(x, jnp.asarray(q), jnp.asarray(scale)))
    assert_close(got, oracle(x, q, scale), x, q, scale)


@pytest.mark.parametrize(
    "m, k, n", [(9, 64, 67), (13, 32, 130), (6, 96, 5), (8, 96, 7), (2, 1504, 1030), (7, 608, 3075)]
)
def test_buffered_and_direct_paths_with_column_tails_match_the_oracle(m, k, n):
    """Rows above 8 widen each work item once into a buffer; 8 or fewer in registers, reading each
    column in runs of 64 weights and a last 32 (K % 64 == 32), in work items of 64-256 columns that
    need not be a multiple of 64; columns past the last group of 4 (and of an item) go one at a time."""
    x, q, scale = random_inputs(m, k, n, seed=m)
    got = np.asarray(int8_matmul(x, jnp.asarray(q), jnp.asarray(scale)))
    assert_close(got, oracle(x, q, scale), x, q, scale)


@pytest.mark.parametrize("m", [1, 6, 8, 9, 64, 128])
def test_model_sized_projections_match_the_oracle(m):
    x, q, scale = random_inputs(m, 576, 1536, seed=m)
    got = np.asarray(jax.jit(int8_matmul)(x, q, scale))
    assert_close(got, oracle(x, q, scale), x, q, scale)


def test_a_stack_indexed_by_a_traced_layer_in_scan_matches_each_layer():
    x, q, scale = random_inputs(5, 64, 72, layers=3, seed=1)

    def body(carry, layer):
        return carry, int8_matmul(carry, q, scale, layer=layer)

    _, out = jax.jit(lambda x: jax.lax.scan(body, x, jnp.arange(3)))(x)
    for layer in range(3):
        assert_close(np.asarray(out[layer]), oracle(x, q[layer], scale[layer]), x, q[layer], scale[layer])
    # and the scanned slices (XLA copies each out) agree with the stack read in place
    _, sliced = jax.lax.scan(lambda c, w: (c, int8_matmul(c, *w)), x, (q, scale))
    np.testing.assert_array_equal(np.asarray(sliced), np.asarray(out))


@pytest.mark.parametrize("m, real", [(16, 5), (16, 0), (32, 9), (4, 1), (8, -3), (8, 99)])
def test_only_the_real_rows_are_multiplied_as_a_call_on_them_alone(m, real):
    """`rows` (traced): the first rows' results are those of a call on them alone, bit for bit (5 of
    16 rows widen in registers), the padding rows' are zeros; `rows` is clamped to [0, M]."""
    x, q, scale = random_inputs(m, 576, 300, seed=m + real)
    q, scale = jnp.asarray(q), jnp.asarray(scale)
    got = np.asarray(jax.jit(lambda x, r: int8_matmul(x, q, scale, rows=r))(x, jnp.int32(real)))
    n_real = min(max(real, 0), m)
    np.testing.assert_array_equal(got[:n_real], np.asarray(int8_matmul(x[:n_real], q, scale)))
    assert not got[n_real:].any()


def test_zero_rows_give_an_empty_result():
    x, q, scale = random_inputs(0, 32, 8)
    assert int8_matmul(x, jnp.asarray(q), jnp.asarray(scale)).shape == (0, 8)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x, q, s: (x.astype(jnp.float32), q, s), "dtype"),
        (lambda x, q, s: (x, q.astype(jnp.int32), s), "dtype"),
        (lambda x, q, s: (x[:, :-1], q, s), "do not match"),
        (lambda x, q, s: (x, q, s[:-1]), "do not match"),
        (lambda x, q, s: (x[0], q, s), "want"),
    ],
)
def test_bad_inputs_raise(change, match):
    x, q, scale = (jnp.asarray(a) for a in random_inputs(2, 32, 8))
    with pytest.raises(ValueError, match=match):
        int8_matmul(*change(x, q, scale))
