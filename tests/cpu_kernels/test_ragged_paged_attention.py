"""The C++ CPU ragged paged attention kernel (XLA FFI) against the pure-JAX reference and the numpy
oracle, on the random batches the Pallas kernel's tests draw, and inside jit, scan and shard_map."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cpu_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.reference import ragged_paged_attention_reference
from tests.pallas_kernels.test_ragged_paged_attention import batches, make_inputs
from tests.pallas_kernels.test_reference import numpy_oracle

# The kernel sums in float32 in another order than the reference; bf16 outputs round to bf16.
TOLERANCES = {"float32": dict(atol=2e-5, rtol=2e-5), "bfloat16": dict(atol=2e-2, rtol=2e-2)}
SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)


def assert_matches_reference(args, *, sliding_window=None, logit_softcap=None):
    q = args[0]
    kwargs = dict(sm_scale=q.shape[-1] ** -0.5, sliding_window=sliding_window, logit_softcap=logit_softcap)
    expected = np.asarray(ragged_paged_attention_reference(*args, **kwargs), np.float32)
    got = ragged_paged_attention(*args, **kwargs)
    assert got.shape == q.shape and got.dtype == q.dtype
    got = np.asarray(got, np.float32)
    num_tokens = int(args[5][args[6][0]])
    assert not got[num_tokens:].any(), "padding rows must be exactly zero"
    np.testing.assert_allclose(got, expected, **TOLERANCES[jnp.dtype(q.dtype).name])


@given(batches(kinds=("decode",)), st.integers(0, 2**16))
@SETTINGS
def test_decode_only_matches_reference(seqs, seed):
    assert_matches_reference(make_inputs(seqs, group=4, seed=seed))


@given(batches(kinds=("prompt",), page_size=32), st.integers(0, 2**16))
@SETTINGS
def test_prompt_only_matches_reference(seqs, seed):
    assert_matches_reference(make_inputs(seqs, page_size=32, seed=seed))


@given(batches(page_size=64), st.integers(0, 2**16))
@SETTINGS
@example(seqs=[(13, 21), (40, 1), (0, 0), (5, 11)], seed=0)  # chunks start and end mid-page
def test_mixed_batch_matches_reference(seqs, seed):
    assert_matches_reference(make_inputs(seqs, page_size=64, group=3, seed=seed))


@given(batches(page_size=8), st.integers(0, 2**16), st.sampled_from([1, 2, 4, 8]))
@SETTINGS
def test_small_pages_and_every_gqa_ratio_match_reference(seqs, seed, group):
    assert_matches_reference(make_inputs(seqs, page_size=8, group=group, seed=seed))


# Every ratio and every page size by default; the rest of their cross product with -m slow (CI time).
_GQA_PAGES = [(1, 16), (2, 32), (3, 8), (3, 64), (4, 64), (8, 8)]


@pytest.mark.parametrize(
    "group, page_size",
    [
        pair if pair in _GQA_PAGES else pytest.param(*pair, marks=pytest.mark.slow)
        for pair in itertools.product([1, 2, 3, 4, 8], [8, 16, 32, 64])
    ],
)
def test_gqa_ratios_and_page_sizes(group, page_size):
    """Chunks that cross page boundaries, a decode, an idle slot, padding rows."""
    seqs = [(page_size - 3, 7), (2 * page_size + 1, 1), (page_size, 0), (0, 19)]
    assert_matches_reference(make_inputs(seqs, page_size=page_size, group=group, seed=group))


@pytest.mark.parametrize(
    "group, head_dim, dtype",
    [
        (3, 64, jnp.float32),
        (4, 128, jnp.bfloat16),  # 4 x 128: one query at a time
        (2, 128, jnp.bfloat16),  # bf16 rows widened in registers (AVX-512) at the larger head size
        *[
            pytest.param(g, d, t, marks=pytest.mark.slow)  # -m slow (CI time)
            for g, d, t in [
                (3, 64, jnp.bfloat16),
                (2, 128, jnp.float32),
                (4, 128, jnp.float32),
            ]
        ],
    ],
)
def test_a_decode_rows_kv_group_goes_through_a_page_together_at_both_head_sizes(group, head_dim, dtype):
    """One-row decodes (their 2-4 queries see the same keys: `page_by_group` where the output rows fit
    in registers, one at a time where they do not) at the kernel's two compiled head sizes, with
    contexts ending mid-page, a window and soft-capping; and two rows of one sequence beside them."""
    seqs = [(37, 1), (16, 1), (150, 1), (0, 1), (70, 2)]
    args = make_inputs(
        seqs, group=group, head_dim=head_dim, dtype=dtype, num_slots=6, width=12, seed=group + head_dim
    )
    assert_matches_reference(args)
    assert_matches_reference(args, sliding_window=20, logit_softcap=5.0)


@pytest.mark.parametrize("sliding_window", [1, 7, 40])
@pytest.mark.parametrize("traced", [False, True])
def test_sliding_window(sliding_window, traced):
    seqs = [(60, 20), (100, 1), (0, 17), (33, 0)]
    window = jnp.int32(sliding_window) if traced else sliding_window
    assert_matches_reference(make_inputs(seqs, group=2, seed=sliding_window), sliding_window=window)


@pytest.mark.parametrize("logit_softcap", [1.5, 30.0])
def test_logit_softcap(logit_softcap):
    seqs = [(60, 20), (100, 1), (0, 17)]
    args = make_inputs(seqs, group=2, seed=3)
    assert_matches_reference(args, logit_softcap=logit_softcap, sliding_window=9)


@given(batches(), st.integers(0, 2**16), st.booleans())
@SETTINGS
def test_bfloat16_kv_matches_reference(seqs, seed, bf16_q):
    q, k, v, *rest = make_inputs(seqs, group=4, seed=seed)
    q = q.astype(jnp.bfloat16) if bf16_q else q
    assert_matches_reference((q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), *rest))


@st.composite
def long_context_batches(draw):
    """One to three sequences over up to 2k keys: few enough work items that the kernel splits each
    sequence's keys over several items and merges them (flash-decoding), for decodes and for prompt
    chunks (>= 16 query vectors per item: the tiled path)."""
    page_size = draw(st.sampled_from([8, 16, 32]))
    seqs = []
    for _ in range(draw(st.integers(1, 3))):
        new = draw(st.sampled_from([0, 1, 1, 2, 5, 16, 21]))
        seqs.append((draw(st.integers(0, 2000 - new)), new))
    return page_size, seqs


@given(
    long_context_batches(),
    st.sampled_from([1, 2, 3, 4, 8]),
    st.sampled_from([None, 300, 700]),
    st.sampled_from([None, 20.0]),
    st.sampled_from(["float32", "bfloat16"]),
    st.integers(0, 2**16),
)
@settings(max_examples=4, deadline=None, derandomize=True)  # long contexts: the reference is slow
@example(batch=(16, [(2047, 1)]), group=3, window=None, softcap=None, dtype="float32", seed=0)
@example(batch=(16, [(1500, 21), (2000, 1)]), group=8, window=700, softcap=20.0, dtype="float32", seed=1)
def test_long_contexts_split_over_items_match_reference(batch, group, window, softcap, dtype, seed):
    page_size, seqs = batch
    q, k, v, *rest = make_inputs(
        seqs, page_size=page_size, group=group, num_kv_heads=1 + seed % 2, width=2048 // page_size, seed=seed
    )
    k, v = k.astype(dtype), v.astype(dtype)
    window = None if window is None else jnp.int32(window)
    assert_matches_reference((q, k, v, *rest), sliding_window=window, logit_softcap=softcap)


@st.composite
def oracle_batches(draw):
    page_size = draw(st.sampled_from([8, 16, 32]))
    q_lens = draw(st.lists(st.integers(0, 40), min_size=1, max_size=5))
    ctx = draw(st.lists(st.integers(0, 90), min_size=len(q_lens), max_size=len(q_lens)))
    return (page_size, draw(st.sampled_from([(1, 1), (2, 3), (1, 4), (2, 8)])), q_lens, ctx,
            draw(st.sampled_from([None, 5, 17])), draw(st.sampled_from([None, 1.5])))  # fmt: skip


@given(oracle_batches(), st.integers(0, 2**31 - 1))
@SETTINGS
def test_matches_the_numpy_oracle(batch, seed):
    page_size, (kvh, group), q_lens, ctx, window, softcap = batch
    rng = np.random.default_rng(seed)
    num_slots, slab, head_dim = len(q_lens) + 1, sum(q_lens) + 5, 16
    kv_lens = np.zeros(num_slots, np.int32)
    kv_lens[: len(q_lens)] = np.array(q_lens) + np.array(ctx)
    width = max(1, -(-int(kv_lens.max()) // page_size))
    pages = num_slots * width + 1
    page_indices = rng.permutation(np.arange(1, pages)).reshape(num_slots, width).astype(np.int32)
    cu = np.zeros(num_slots + 1, np.int32)
    cu[1 : len(q_lens) + 1] = np.cumsum(q_lens)
    cu[len(q_lens) + 1 :] = cu[len(q_lens)]
    q = rng.normal(size=(slab, kvh * group, head_dim)).astype(np.float32)
    k, v = (rng.normal(size=(kvh, pages, page_size, head_dim)).astype(np.float32) for _ in range(2))
    args = (q, k, v, kv_lens, page_indices, cu, np.array([len(q_lens)], np.int32))
    got = np.asarray(
        ragged_paged_attention(*args, sm_scale=0.3, sliding_window=window, logit_softcap=softcap)
    )
    expected = numpy_oracle(*args[:-1], len(q_lens), 0.3, window, softcap)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)
    assert not got[cu[len(q_lens)] :].any()


def test_empty_batch_is_all_zeros():
    args = make_inputs([], seed=1)
    assert not np.asarray(ragged_paged_attention(*args, sm_scale=0.125)).any()


def test_inside_a_jitted_scan_with_a_per_layer_traced_window():
    """Two layers in one scan, windows 5 and none (as Gemma's alternating layers pass them)."""
    args = make_inputs([(40, 9), (21, 1)], group=2, seed=4)
    windows = jnp.array([5, 1 << 30], jnp.int32)

    def run(attend):
        def layer(acc, window):
            return acc + attend(*args, sm_scale=0.125, sliding_window=window), None

        return jax.jit(lambda: jax.lax.scan(layer, jnp.zeros_like(args[0]), windows)[0])()

    np.testing.assert_allclose(
        run(ragged_paged_attention), run(ragged_paged_attention_reference), atol=4e-5, rtol=4e-5
    )


def test_bad_inputs_raise():
    q, k, v, *rest = make_inputs([(3, 2)], num_kv_heads=2, group=1)
    with pytest.raises(ValueError, match="num_q_heads"):
        ragged_paged_attention(jnp.zeros((4, 3, 64)), k, v, *rest, sm_scale=1.0)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        ragged_paged_attention(q, k.astype(jnp.float16), v.astype(jnp.float16), *rest, sm_scale=1.0)
