"""The Pallas ragged paged attention kernel against the pure-JAX reference.

On the CPU the kernel runs through the Pallas interpreter, which is slow: slabs are tiny, examples
few, and shapes fixed per test so each test compiles once. Tests marked `gpu` compile the kernel
through Triton and run it on the device at serving-like shapes.

A batch is a list of (context, new) pairs, one per sequence slot: `context` keys are already in the
cache, `new` rows of the slab are this step's tokens (their K/V written too), so kv_len is
context + new.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pallas_kernels.ragged_paged_attention import _query_block_table, ragged_paged_attention
from pallas_kernels.reference import ragged_paged_attention_reference
from pallas_kernels.tiles import TileSizes, get_tile_sizes

NUM_ROWS = 48  # slab rows T
NUM_SLOTS = 4  # sequence slots S
WIDTH = 8  # page-table width W: a sequence holds at most WIDTH * page_size keys
# Elementwise |kernel - reference| <= atol + rtol * |reference|. bfloat16: the kernel rounds P to
# bf16 before the second matmul (the reference stays in f32) and both round the output to bf16.
TOLERANCES = {
    "float32": dict(atol=2e-5, rtol=2e-5),
    "bfloat16": dict(atol=3e-2, rtol=3e-2),
    "float16": dict(atol=4e-3, rtol=4e-3),
}
CPU_SETTINGS = settings(max_examples=3, deadline=None, derandomize=True)


def make_inputs(
    seqs,
    *,
    page_size=16,
    num_kv_heads=2,
    group=1,
    head_dim=64,
    dtype=jnp.float32,
    num_rows=NUM_ROWS,
    num_slots=NUM_SLOTS,
    width=WIDTH,
    seed=0,
):
    """The kernel's positional arguments for `seqs`, pages scattered over a shuffled pool."""
    assert len(seqs) <= num_slots and sum(new for _, new in seqs) <= num_rows
    rng = np.random.default_rng(seed)
    num_pages = num_slots * width + 1  # page 0 is the page-table padding
    pool = rng.permutation(np.arange(1, num_pages))
    kv_lens = np.zeros(num_slots, np.int32)
    cu_q_lens = np.zeros(num_slots + 1, np.int32)
    page_indices = np.zeros((num_slots, width), np.int32)
    for s, (context, new) in enumerate(seqs):
        kv_lens[s] = context + new
        assert kv_lens[s] <= width * page_size
        cu_q_lens[s + 1] = cu_q_lens[s] + new
        used = -(-kv_lens[s] // page_size)
        page_indices[s, :used] = pool[s * width : s * width + used]
    cu_q_lens[len(seqs) + 1 :] = cu_q_lens[len(seqs)]  # unused slots repeat the last value

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

    kv_shape = (num_kv_heads, num_pages, page_size, head_dim)
    return (
        normal(num_rows, num_kv_heads * group, head_dim),
        normal(*kv_shape),
        normal(*kv_shape),
        jnp.asarray(kv_lens),
        jnp.asarray(page_indices),
        jnp.asarray(cu_q_lens),
        jnp.asarray([len(seqs)], jnp.int32),
    )


def assert_matches_reference(args, *, sliding_window=None, logit_softcap=None, interpret=True, **tiles):
    """Runs kernel and reference on `args`, prints the max errors, checks them and the padding."""
    q = args[0]
    sm_scale = q.shape[-1] ** -0.5
    settings = dict(sm_scale=sm_scale, sliding_window=sliding_window, logit_softcap=logit_softcap)
    with jax.default_matmul_precision("highest"):  # on a GPU, no TF32 in the oracle
        expected = ragged_paged_attention_reference(*args, **settings)
    got = ragged_paged_attention(*args, **settings, interpret=interpret, **tiles)
    assert got.shape == q.shape and got.dtype == q.dtype
    got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
    num_tokens = int(args[5][args[6][0]])
    assert not got[num_tokens:].any(), "padding rows must be exactly zero"
    abs_err = float(np.abs(got - expected).max(initial=0.0))
    rel_err = abs_err / max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    dtype = jnp.dtype(q.dtype).name
    print(f"{dtype}: max abs error {abs_err:.2e}, max error / max |ref| {rel_err:.2e}")
    np.testing.assert_allclose(got, expected, **TOLERANCES[dtype])
    return abs_err


# ----------------------------------------------------------------------------- random batches


@st.composite
def batches(draw, kinds=("decode", "prompt", "chunk", "idle"), page_size=16):
    """(context, new) per slot; `new` sums to at most NUM_ROWS, the rest of the slab is padding."""
    max_len = WIDTH * page_size
    budget = NUM_ROWS - draw(st.integers(0, 8))
    seqs = []
    for _ in range(draw(st.integers(1, NUM_SLOTS))):
        kind = draw(st.sampled_from(kinds))
        if kind == "decode":
            context, new = draw(st.integers(0, max_len - 1)), 1
        elif kind == "prompt":
            context, new = 0, draw(st.integers(1, max(1, min(budget, max_len))))
        elif kind == "chunk":  # a prompt chunk after earlier chunks, starting and ending anywhere
            context = draw(st.integers(1, max_len - 1))
            new = draw(st.integers(1, max(1, min(budget, max_len - context))))
        else:  # a sequence with a slot but no new tokens this step
            context, new = draw(st.integers(0, max_len)), 0
        new = min(new, budget)
        budget -= new
        seqs.append((context, new))
    return seqs


@given(batches(kinds=("decode",)), st.integers(0, 2**16))
@CPU_SETTINGS
def test_decode_only_matches_reference(seqs, seed):
    assert_matches_reference(make_inputs(seqs, group=4, seed=seed))


@given(batches(kinds=("prompt",), page_size=32), st.integers(0, 2**16))
@CPU_SETTINGS
def test_prompt_only_matches_reference(seqs, seed):
    assert_matches_reference(make_inputs(seqs, page_size=32, seed=seed))


@given(batches(page_size=64), st.integers(0, 2**16))
@CPU_SETTINGS
@example(seqs=[(13, 21), (40, 1), (0, 0), (5, 11)], seed=0)  # chunks start and end mid-page
def test_mixed_batch_matches_reference(seqs, seed):
    assert_matches_reference(make_inputs(seqs, page_size=64, group=3, seed=seed))


# Every group with some page size by default; the rest of the grid with -m slow (CI time: each
# point compiles the interpreted kernel, about 5 s on 2 cores).
_GQA_DEFAULT = {(1, 16), (3, 32), (4, 64), (8, 16)}


@pytest.mark.parametrize(
    "group,page_size",
    [
        (g, p) if (g, p) in _GQA_DEFAULT else pytest.param(g, p, marks=pytest.mark.slow)
        for g in (1, 3, 4, 8)
        for p in (16, 32, 64)
    ],
)
def test_gqa_ratios_and_page_sizes(group, page_size):
    """Chunks that cross page boundaries, a decode, an idle slot, padding rows."""
    seqs = [(page_size - 3, 7), (2 * page_size + 1, 1), (page_size, 0), (0, 19)]
    assert_matches_reference(make_inputs(seqs, page_size=page_size, group=group, seed=group))


@pytest.mark.parametrize("sliding_window", [1, 7, 40])
def test_sliding_window(sliding_window):
    """Windows shorter than a row's context skip whole KV tiles and mask the window's edge."""
    seqs = [(60, 20), (100, 1), (0, 17), (33, 0)]
    args = make_inputs(seqs, group=2, seed=sliding_window)
    assert_matches_reference(args, sliding_window=sliding_window, pages_per_block=1)


@given(batches(), st.integers(0, 2**16))
@CPU_SETTINGS
def test_bfloat16_matches_reference(seqs, seed):
    assert_matches_reference(make_inputs(seqs, group=4, dtype=jnp.bfloat16, seed=seed))


def test_float16_head_dim_128():
    seqs = [(30, 9), (70, 1), (0, 30)]
    args = make_inputs(seqs, group=2, head_dim=128, dtype=jnp.float16)
    assert_matches_reference(args)


@pytest.mark.parametrize("block_rows,pages_per_block", [(16, 1), (16, 2), (64, 4)])
def test_tile_sizes_do_not_change_the_result(block_rows, pages_per_block):
    """Sequences split over several query blocks, several or few KV tiles per block."""
    seqs = [(5, 40), (17, 1), (0, 7)]
    args = make_inputs(seqs, page_size=16, group=1, seed=block_rows + pages_per_block)
    assert_matches_reference(args, block_rows=block_rows, pages_per_block=pages_per_block)


def test_empty_batch_is_all_zeros():
    args = make_inputs([], seed=1)
    out = ragged_paged_attention(*args, sm_scale=0.125, interpret=True)
    assert not np.asarray(out).any()


# ----------------------------------------------------------------------------- query blocks


_block_table = jax.jit(_query_block_table, static_argnums=(3, 4, 5))


@given(
    st.lists(st.integers(0, 20), min_size=0, max_size=6),
    st.integers(0, 10),
    st.sampled_from([1, 2, 4, 8]),
)
@settings(max_examples=100, deadline=None)
def test_query_blocks_cover_every_row_once(q_lens, num_padding, block_q):
    """Every slab row lies in exactly one block; a block never spans two sequences."""
    num_slots, num_rows = 7, 6 * 20 + 10  # fixed shapes: one compilation per block_q
    n = len(q_lens)
    cu_q_lens = np.full(num_slots + 1, sum(q_lens), np.int32)
    cu_q_lens[: n + 1] = np.cumsum([0, *q_lens])
    kv_lens = np.zeros(num_slots, np.int32)
    kv_lens[:n] = np.asarray(q_lens, np.int32) + 3
    num_blocks = num_rows // block_q + num_slots + 1
    table = _block_table(
        jnp.asarray(cu_q_lens), jnp.asarray(kv_lens), jnp.asarray([n], jnp.int32),
        num_rows, block_q, num_blocks,
    )  # fmt: skip
    slot, first_row, rows, first_pos, kv_len = np.asarray(table)
    covered = np.zeros(num_rows, int)
    for b in np.flatnonzero(rows):
        covered[first_row[b] : first_row[b] + rows[b]] += 1
        if first_row[b] < cu_q_lens[n]:  # a real sequence's rows
            s = slot[b]
            assert cu_q_lens[s] <= first_row[b] and first_row[b] + rows[b] <= cu_q_lens[s + 1]
            assert first_pos[b] == kv_lens[s] - q_lens[s] + first_row[b] - cu_q_lens[s]
            assert kv_len[b] == kv_lens[s]
        else:  # padding: no keys, so zeros
            assert kv_len[b] == 0
    assert (covered == 1).all()


# ----------------------------------------------------------------------------- API


def test_tile_table_defaults():
    assert get_tile_sizes(128, 16, jnp.bfloat16).pages_per_block(16) == 4
    assert get_tile_sizes(128, 64, jnp.bfloat16).pages_per_block(64) == 1
    assert get_tile_sizes(64, 16, jnp.float32).block_rows >= 16
    with pytest.raises(ValueError, match="power of two"):
        TileSizes(block_rows=48, block_kv=64, num_warps=4, num_stages=2)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: (a[0][..., :48], *a[1:]), "head_dim"),
        (lambda a: (a[0][:, :3], *a[1:]), "multiple of num_kv_heads"),
        (lambda a: (a[0].astype(jnp.bfloat16), *a[1:]), "one float type"),
        (lambda a: (*a[:3], a[3].astype(jnp.float32), *a[4:]), "kv_lens"),
        (lambda a: (*a[:5], a[5][:-1], a[6]), "cu_q_lens"),
        (lambda a: (*a[:6], jnp.asarray(1, jnp.int32)), "num_seqs"),
    ],
)
def test_bad_inputs_raise_value_error(change, message):
    args = change(make_inputs([(3, 2)], group=2))
    with pytest.raises(ValueError, match=message):
        ragged_paged_attention(*args, sm_scale=0.125, interpret=True)


def test_logit_softcap():
    """Gemma 2's cap * tanh(s / cap) on the scores, in the kernel's log2 domain."""
    seqs = [(0, 9), (5, 1), (12, 6)]
    assert_matches_reference(make_inputs(seqs, group=2, seed=3), logit_softcap=0.7, pages_per_block=1)


def test_traced_per_layer_window_matches_a_static_one():
    """A window that is a traced value (one per layer of a scanned stack) gives what the same window
    as a Python int gives; a global layer's NO_WINDOW sees every key."""
    seqs = [(3, 9), (20, 1), (0, 12)]
    args = make_inputs(seqs, group=2, seed=5)
    settings = dict(sm_scale=0.25, interpret=True, pages_per_block=1)
    kernel = jax.jit(lambda w, *a: ragged_paged_attention(*a, sliding_window=w, **settings))
    for window, static in ((4, 4), (1 << 30, None)):
        got = np.asarray(kernel(jnp.int32(window), *args))
        expected = np.asarray(ragged_paged_attention_reference(*args, sm_scale=0.25, sliding_window=static))
        np.testing.assert_allclose(got, expected, **TOLERANCES["float32"])


def test_nonpositive_sliding_window_raises():
    with pytest.raises(ValueError, match="sliding_window"):
        ragged_paged_attention(*make_inputs([(3, 2)]), sm_scale=0.125, sliding_window=0, interpret=True)


@pytest.mark.parametrize(
    "dtype,group,head_dim,sliding_window",
    [(jnp.bfloat16, 1, 128, None), (jnp.float16, 3, 64, 16), (jnp.float32, 8, 128, None)],
)
def test_lowers_to_triton_for_cuda(dtype, group, head_dim, sliding_window):
    """The Triton lowering accepts every op of the kernel (checked without a GPU by exporting for
    CUDA, for an abstract H100: JAX 0.11 asks the lowering's device for its GPU's details, where 0.10
    assumed one; newer JAX versions may compile at lowering time and need the GPU's Triton handler)."""
    from jax import export
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    args = make_inputs([(3, 2)], group=group, head_dim=head_dim, dtype=dtype)
    fn = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=0.1, sliding_window=sliding_window))
    checks = [export.DisabledSafetyCheck.custom_call(t) for t in _TRITON_CUSTOM_CALLS]
    h100 = AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
    try:
        with use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=h100)):
            exported = export.export(fn, platforms=("cuda",), disabled_checks=checks)(*args)
    except RuntimeError as e:
        if "Triton compilation handler" in str(e):
            pytest.skip("this JAX compiles Triton at lowering time; needs a GPU")
        raise
    assert any(t in exported.mlir_module() for t in _TRITON_CUSTOM_CALLS)


_TRITON_CUSTOM_CALLS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")


# ----------------------------------------------------------------------------- GPU (compiled)

GPU_BATCH = [(0, 200), (517, 1), (1000, 1), (64, 64), (3000, 0), (2047, 1), (31, 97)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("group,head_dim", [(1, 128), (4, 128), (8, 64), (3, 64)])
@pytest.mark.parametrize("page_size", [16, 64])
def test_compiled_kernel_matches_reference_on_gpu(dtype, group, head_dim, page_size):
    args = make_inputs(
        GPU_BATCH,
        page_size=page_size,
        num_kv_heads=4,
        group=group,
        head_dim=head_dim,
        dtype=dtype,
        num_rows=512,
        num_slots=16,
        width=4096 // page_size,
    )
    assert_matches_reference(args, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("sliding_window", [1, 100, 1024])
def test_compiled_sliding_window_on_gpu(sliding_window):
    args = make_inputs(
        GPU_BATCH, group=4, head_dim=128, dtype=jnp.bfloat16, num_rows=512, num_slots=16,
        width=256,
    )  # fmt: skip
    assert_matches_reference(args, sliding_window=sliding_window, interpret=False)


@pytest.mark.gpu
@given(batches(), st.integers(0, 2**16))
@settings(max_examples=30, deadline=None)
def test_compiled_random_batches_on_gpu(seqs, seed):
    assert_matches_reference(make_inputs(seqs, group=4, dtype=jnp.bfloat16, seed=seed), interpret=False)
