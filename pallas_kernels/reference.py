"""Pure-JAX ragged paged attention: the oracle for the Pallas kernels and the CPU path.

The token slab holds the new tokens of several sequences back to back: sequence `s` owns rows
`cu_q_lens[s]:cu_q_lens[s + 1]`. Its keys and values live in fixed-size pages of a shared pool; row
`s` of `page_indices` lists them in order. `kv_lens[s]` counts the sequence's keys *including* the new
tokens, whose K/V must already be written (see `write_kv_pages_reference`), so the new tokens sit at
positions `kv_lens[s] - q_len .. kv_lens[s] - 1` and attend causally to everything before them.

Rows past `cu_q_lens[num_seqs]` are padding and come out as zeros.

The cost of one call follows `T x W x page_size` (slab rows times the page-table width the caller
chose), never the pool size: callers pass the narrowest page table that covers the step's longest
context.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

DEFAULT_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def write_kv_pages_reference(
    k_pages: jax.Array,  # [num_kv_heads, total_num_pages, page_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, total_num_pages, page_size, head_dim]
    k: jax.Array,  # [T, num_kv_heads, head_dim]
    v: jax.Array,  # [T, num_kv_heads, head_dim]
    slot_mapping: jax.Array,  # i32[T]: page * page_size + offset; out of range means "drop"
) -> tuple[jax.Array, jax.Array]:
    """Scatters each row's K and V into its slot. Out-of-range slots (padding rows, negative ones
    included) are dropped."""
    kvh, num_pages, page_size, head_dim = k_pages.shape

    def scatter(pages, rows):
        flat = pages.reshape(kvh, num_pages * page_size, head_dim)
        rows = jnp.swapaxes(rows, 0, 1).astype(pages.dtype)
        flat = flat.at[:, slot_mapping].set(rows, mode="drop", wrap_negative_indices=False)
        return flat.reshape(pages.shape)

    return scatter(k_pages, k), scatter(v_pages, v)


def _rows_to_seqs(cu_q_lens, kv_lens, num_seqs, num_rows):
    """For every slab row: its sequence slot, its position in that sequence, and whether it is real."""
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    # A row belongs to the first sequence whose end lies beyond it.
    seq = jnp.searchsorted(cu_q_lens[1:], rows, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, kv_lens.shape[0] - 1)
    valid = rows < cu_q_lens[num_seqs[0]]
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    q_pos = kv_lens[seq] - q_len + (rows - cu_q_lens[seq])
    return seq, q_pos, valid


def _walk_pages(
    qg, q_pos, kv_len, gather, first_block, num_blocks, *, block_len, sliding_window, logit_softcap, per_row
):
    """Online softmax over page blocks [first_block, num_blocks) of keys and values from `gather(b)`:
    f32[KVH, R, C, D] each when every row has its own (`per_row`), f32[KVH, C, D] when all rows share
    one sequence. qg f32[R, KVH, G, D] (already scaled); q_pos, kv_len i32[R]. Returns unnormalised
    (acc, denom)."""
    num_rows, num_kv_heads, group, head_dim = qg.shape
    kv = "ktcd" if per_row else "kcd"

    def body(b, carry):
        m, denom, acc = carry  # [R, KVH, G], [R, KVH, G], [R, KVH, G, D]
        k, v = gather(b)
        s = jnp.einsum(f"tkgd,{kv}->tkgc", qg, k)  # [R, KVH, G, C]
        if logit_softcap is not None:
            s = logit_softcap * jnp.tanh(s / logit_softcap)
        kv_pos = b * block_len + jnp.arange(block_len, dtype=jnp.int32)  # [C]
        mask = _mask(kv_pos, q_pos, kv_len, sliding_window)[:, None, None, :]  # [R, 1, 1, C]
        s = jnp.where(mask, s, DEFAULT_MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        # Zero masked entries explicitly: in a block with no visible key, s - m_new is 0 there.
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        return (
            m_new,
            alpha * denom + p.sum(axis=-1),
            alpha[..., None] * acc + jnp.einsum(f"tkgc,{kv}->tkgd", p, v),
        )

    init = (
        jnp.full((num_rows, num_kv_heads, group), DEFAULT_MASK_VALUE, jnp.float32),
        jnp.zeros((num_rows, num_kv_heads, group), jnp.float32),
        jnp.zeros((num_rows, num_kv_heads, group, head_dim), jnp.float32),
    )
    _, denom, acc = jax.lax.fori_loop(first_block, num_blocks, body, init)
    return acc, denom


def _attend_rows(
    qg,
    seq,
    q_pos,
    kv_len,
    valid,
    k_pages,
    v_pages,
    page_indices,
    *,
    sliding_window,
    logit_softcap,
    pages_per_block,
):
    """Rows that may belong to different sequences: each gathers its own sequence's pages, only as
    far as the longest real row's context reaches. seq, q_pos, kv_len i32[R]; valid bool[R]."""
    num_rows, num_kv_heads, _, head_dim = qg.shape
    block_len = pages_per_block * k_pages.shape[2]

    def gather(b):
        cols = jax.lax.dynamic_slice_in_dim(page_indices, b * pages_per_block, pages_per_block, 1)
        pages = cols[seq]  # [R, pages_per_block]
        shape = (num_kv_heads, num_rows, block_len, head_dim)
        return (x[:, pages].reshape(shape).astype(jnp.float32) for x in (k_pages, v_pages))

    longest = jnp.max(jnp.where(valid, kv_len, 0))
    num_blocks = jnp.minimum((longest + block_len - 1) // block_len, page_indices.shape[1] // pages_per_block)
    return _walk_pages(qg, q_pos, kv_len, gather, 0, num_blocks, block_len=block_len,
                       sliding_window=sliding_window, logit_softcap=logit_softcap, per_row=True)  # fmt: skip


def _attend_one_sequence(
    qg,
    s,
    q_pos,
    valid,
    kv_lens,
    k_pages,
    v_pages,
    page_indices,
    *,
    sliding_window,
    logit_softcap,
    pages_per_block,
):
    """Rows that all belong to sequence `s`: each block of its pages is gathered once for all rows,
    and only blocks a real row can see are visited, so the cost follows the context, not the padded
    width of the page table. q_pos i32[R]; valid bool[R]."""
    num_kv_heads, _, page_size, head_dim = k_pages.shape
    block_len = pages_per_block * page_size

    def gather(b):
        pages = jax.lax.dynamic_slice_in_dim(page_indices[s], b * pages_per_block, pages_per_block)
        return (
            x[:, pages].reshape(num_kv_heads, block_len, head_dim).astype(jnp.float32)
            for x in (k_pages, v_pages)
        )

    last_key = jnp.minimum(jnp.max(jnp.where(valid, q_pos, 0)) + 1, kv_lens[s])  # keys beyond are masked
    first_block = 0
    if sliding_window is not None:  # keys before the window of the first real row are masked too
        first_block = (
            jnp.maximum(jnp.min(jnp.where(valid, q_pos, last_key)) - sliding_window + 1, 0) // block_len
        )
    num_blocks = jnp.minimum(
        (last_key + block_len - 1) // block_len, page_indices.shape[1] // pages_per_block
    )
    kv_len = jnp.broadcast_to(kv_lens[s], q_pos.shape)
    return _walk_pages(qg, q_pos, kv_len, gather, first_block, num_blocks, block_len=block_len,
                       sliding_window=sliding_window, logit_softcap=logit_softcap, per_row=False)  # fmt: skip


def _mask(kv_pos, q_pos, kv_len, sliding_window):
    """bool[R, C]: causal, inside the sequence, and inside the sliding window if there is one."""
    mask = (kv_pos[None, :] <= q_pos[:, None]) & (kv_pos[None, :] < kv_len[:, None])
    if sliding_window is not None:
        mask &= kv_pos[None, :] > q_pos[:, None] - sliding_window
    return mask


@functools.partial(jax.jit, static_argnames=("sm_scale", "logit_softcap", "pages_per_block", "block_rows"))
def ragged_paged_attention_reference(
    q: jax.Array,  # [T, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_kv_heads, total_num_pages, page_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, total_num_pages, page_size, head_dim]
    kv_lens: jax.Array,  # i32[S]
    page_indices: jax.Array,  # i32[S, W]
    cu_q_lens: jax.Array,  # i32[S + 1]
    num_seqs: jax.Array,  # i32[1]
    *,
    sm_scale: float,
    sliding_window: int | jax.Array | None = None,
    logit_softcap: float | None = None,
    pages_per_block: int = 8,
    block_rows: int = 32,
) -> jax.Array:  # [T, num_q_heads, head_dim], q.dtype
    """Attention of every slab row over its own sequence's paged keys and values.

    The slab is walked in blocks of `block_rows` rows. A block whose rows all belong to one sequence
    (the bulk of every prompt chunk) gathers each block of that sequence's pages once for all its
    rows. A block that mixes sequences (decode rows beside a prompt chunk, chunk boundaries) is
    retried in sub-blocks of 8 rows, and only a sub-block that still mixes lets each row gather its
    own pages. A block of padding rows costs nothing, and every walk over pages stops at the last key
    a real row can see. So a step's cost follows its real tokens and their real context, not the
    padded page-table width: prompt rows pay attention over their context, decode rows one read of
    theirs, and fusing decodes with a prompt chunk (Dynamic SplitFuse) costs what the two cost apart.

    `sliding_window` may be a traced i32[] (a per-layer value inside a scanned layer stack): each
    row then sees keys at positions > its own minus the window. `logit_softcap` (static) replaces a
    score s by cap * tanh(s / cap) before the softmax (Gemma 2).
    """
    num_rows, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[0]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads=} is not a multiple of {num_kv_heads=}")
    width = page_indices.shape[1]
    pages_per_block = math.gcd(pages_per_block, width)  # blocks must tile the page table exactly
    block_rows = math.gcd(block_rows, num_rows)
    group = num_q_heads // num_kv_heads

    seq, q_pos, valid = _rows_to_seqs(cu_q_lens, kv_lens, num_seqs, num_rows)
    qg = q.astype(jnp.float32).reshape(num_rows, num_kv_heads, group, head_dim) * sm_scale
    sub_rows = math.gcd(8, block_rows)

    def attend(qb, sb, pb, vb, mixed):
        """Rows of one block: nothing (padding), dense (one sequence), or `mixed(...)`."""
        zeros = (jnp.zeros(qb.shape, jnp.float32), jnp.zeros(qb.shape[:-1], jnp.float32))
        one_seq = jnp.all(jnp.where(vb, sb == sb[0], True))
        branch = jnp.where(~vb[0], 0, jnp.where(one_seq, 1, 2))  # real rows come first in a slab
        return jax.lax.switch(
            branch,
            [
                lambda: zeros,
                lambda: _attend_one_sequence(
                    qb,
                    sb[0],
                    pb,
                    vb,
                    kv_lens,
                    k_pages,
                    v_pages,
                    page_indices,
                    sliding_window=sliding_window,
                    logit_softcap=logit_softcap,
                    pages_per_block=pages_per_block,
                ),
                lambda: mixed(qb, sb, pb, vb),
            ],
        )

    def per_row(qb, sb, pb, vb):
        return _attend_rows(
            qb,
            sb,
            pb,
            kv_lens[sb],
            vb,
            k_pages,
            v_pages,
            page_indices,
            sliding_window=sliding_window,
            logit_softcap=logit_softcap,
            pages_per_block=pages_per_block,
        )

    def sub_blocks(qb, sb, pb, vb):
        # A mixed block (decode rows beside a prompt chunk) is retried in sub-blocks of 8 rows, so
        # only the rows that really mix pay the per-row path; the prompt rows stay dense.
        def one(x):
            return attend(*x, per_row)

        split = [x.reshape(-1, sub_rows, *x.shape[1:]) for x in (qb, sb, pb, vb)]
        acc, denom = jax.lax.map(one, tuple(split))
        return acc.reshape(qb.shape), denom.reshape(qb.shape[:-1])

    def one_block(b):
        first = b * block_rows
        qb = jax.lax.dynamic_slice_in_dim(qg, first, block_rows)
        sb, pb, vb = (jax.lax.dynamic_slice_in_dim(x, first, block_rows) for x in (seq, q_pos, valid))
        return attend(qb, sb, pb, vb, sub_blocks if sub_rows < block_rows else per_row)

    acc, denom = jax.lax.map(one_block, jnp.arange(num_rows // block_rows))
    acc = acc.reshape(num_rows, num_kv_heads, group, head_dim)
    denom = denom.reshape(num_rows, num_kv_heads, group)
    out = acc / jnp.where(denom == 0.0, 1.0, denom)[..., None]
    out = jnp.where(valid[:, None, None, None], out, 0.0)
    return out.reshape(num_rows, num_q_heads, head_dim).astype(q.dtype)
