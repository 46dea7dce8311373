"""The pure-JAX reference against a plain numpy loop: one sequence at a time, dense softmax."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.reference import ragged_paged_attention_reference, write_kv_pages_reference


def numpy_oracle(
    q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale, window, softcap=None
):
    num_rows, num_heads, head_dim = q.shape
    kvh, _, page_size, _ = k_pages.shape
    group = num_heads // kvh
    out = np.zeros_like(q, dtype=np.float64)
    for s in range(num_seqs):
        rows = range(cu_q_lens[s], cu_q_lens[s + 1])
        n_pages = -(-kv_lens[s] // page_size)
        k = k_pages[:, page_indices[s, :n_pages]].reshape(kvh, -1, head_dim)[:, : kv_lens[s]]
        v = v_pages[:, page_indices[s, :n_pages]].reshape(kvh, -1, head_dim)[:, : kv_lens[s]]
        for i, r in enumerate(rows):
            pos = kv_lens[s] - len(rows) + i
            lo = 0 if window is None else max(0, pos - window + 1)
            for h in range(num_heads):
                scores = k[h // group, lo : pos + 1] @ q[r, h] * sm_scale
                if softcap is not None:
                    scores = softcap * np.tanh(scores / softcap)
                p = np.exp(scores - scores.max())
                out[r, h] = (p / p.sum()) @ v[h // group, lo : pos + 1]
    return out


@st.composite
def ragged_batches(draw):
    page_size = draw(st.sampled_from([4, 8, 16]))
    kvh, group = draw(st.sampled_from([(1, 1), (2, 3), (1, 4), (2, 2)]))
    num_slots = draw(st.integers(1, 6))
    num_seqs = draw(st.integers(1, num_slots))
    q_lens = [draw(st.integers(0, 40)) for _ in range(num_seqs)]
    ctx = [draw(st.integers(0, 60)) for _ in range(num_seqs)]
    window = draw(st.sampled_from([None, 5, 17]))
    softcap = draw(st.sampled_from([None, 1.5]))
    traced = draw(st.booleans())  # the window as an array, as a scanned layer stack passes it
    return page_size, kvh, group, num_slots, q_lens, ctx, window, softcap, traced


@settings(max_examples=6, deadline=None)  # new draws every run; 2 s each here (CI time)
@given(ragged_batches(), st.integers(0, 2**31 - 1))
def test_reference_matches_the_numpy_loop(batch, seed):
    page_size, kvh, group, num_slots, q_lens, ctx, window, softcap, traced = batch
    rng = np.random.default_rng(seed)
    head_dim, slab = 8, 256  # up to 6 sequences of 40 new tokens
    kv_lens = np.zeros(num_slots, np.int32)
    kv_lens[: len(q_lens)] = np.array(q_lens) + np.array(ctx)
    width = max(1, -(-int(kv_lens.max()) // page_size))
    total_pages = num_slots * width + 1
    page_indices = rng.permutation(np.arange(1, total_pages))[: num_slots * width].reshape(num_slots, width)
    page_indices = page_indices.astype(np.int32)
    cu = np.zeros(num_slots + 1, np.int32)
    cu[1 : len(q_lens) + 1] = np.cumsum(q_lens)
    cu[len(q_lens) + 1 :] = cu[len(q_lens)]
    q = rng.normal(size=(slab, kvh * group, head_dim)).astype(np.float32)
    k_pages = rng.normal(size=(kvh, total_pages, page_size, head_dim)).astype(np.float32)
    v_pages = rng.normal(size=(kvh, total_pages, page_size, head_dim)).astype(np.float32)
    # Write the new tokens' K/V through the same scatter the model uses (padding rows dropped).
    slots = np.full(slab, total_pages * page_size, np.int32)
    for s, n in enumerate(q_lens):
        pos = np.arange(ctx[s], ctx[s] + n)
        slots[cu[s] : cu[s + 1]] = page_indices[s, pos // page_size] * page_size + pos % page_size
    new_k = rng.normal(size=(slab, kvh, head_dim)).astype(np.float32)
    new_v = rng.normal(size=(slab, kvh, head_dim)).astype(np.float32)
    written = write_kv_pages_reference(jnp.asarray(k_pages), jnp.asarray(v_pages), new_k, new_v, slots)
    k_pages, v_pages = (np.asarray(x) for x in written)
    args = (q, k_pages, v_pages, kv_lens, page_indices, cu, np.array([len(q_lens)], np.int32))
    window_arg = jnp.int32(window) if traced and window is not None else window
    settings = dict(sm_scale=0.3, sliding_window=window_arg, logit_softcap=softcap)
    ours = np.asarray(ragged_paged_attention_reference(*args, **settings))
    expected = numpy_oracle(*args[:-1], len(q_lens), 0.3, window, softcap)
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=1e-4)
    assert not ours[cu[len(q_lens)] :].any()  # padding rows are zero
