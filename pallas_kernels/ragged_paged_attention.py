"""Ragged paged attention as a Pallas kernel (Triton lowering): prompt chunks and decode tokens of
many sequences in one launch, over a paged KV cache.

Same contract as `reference.ragged_paged_attention_reference`: the slab holds the new tokens of
several sequences back to back (sequence `s` owns rows `cu_q_lens[s]:cu_q_lens[s + 1]`), their K/V
are already written into the pages, and rows past `cu_q_lens[num_seqs]` come out as zeros.

Design (after vLLM's Triton "unified attention"):
- The grid is (query block, KV head). A query block is up to `block_q` consecutive rows of ONE
  sequence, so every program reads a single page-table row. Before the launch, plain JAX cuts each
  sequence's rows into blocks and writes a small table (one entry per block: page-table row, first
  slab row, rows in use, position of the first row, kv_len). The padding rows form one extra
  "sequence" with no keys, so the same code writes their zeros; spare grid slots have no rows and
  return at once. The grid size is static: at most `T // block_q + S + 1` blocks are ever needed.
- The query heads that share a KV head are packed into the tile's rows (`block_q` tokens x the group
  padded to a power of two), so each K/V tile is loaded once for the whole group (GQA).
- Each program walks only the KV tiles its rows can see: from the sliding window's first tile (if
  any) to the tile holding its last row's position. Tiles wholly visible to every row skip the mask
  arithmetic; only the diagonal (and window-edge) tiles build it.
- Online softmax in base 2 with float32 statistics and accumulator; P is cast to the KV dtype for
  the second matmul, as FlashAttention does.

Every entry of `page_indices` must be a valid page id, padding included (the engine pads with page
0): a KV tile gathers whole pages and masks keys past kv_len only after loading them.

Not here yet: vLLM's split-KV ("3D") variant, which also splits one long decode's keys across
programs; with few sequences and long contexts this kernel runs only S x KVH programs.

The K/V write stays a separate XLA scatter (`reference.write_kv_pages_reference`): fusing it here
would race, because the rows of a long prompt chunk are spread over several programs that each need
the keys the others write.

Back-end details (the Triton `CompilerParams` name, masked loads and stores) stay in this file so a
move to Mosaic GPU touches one place.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # deprecated since JAX 0.11 and slated for removal; the reference path must outlive it
    from jax.experimental.pallas import triton as pltriton
except ImportError:
    pltriton = None

from pallas_kernels.reference import DEFAULT_MASK_VALUE
from pallas_kernels.tiles import get_tile_sizes

LOG2_E = math.log2(math.e)
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_SQUEEZED = getattr(pl, "squeezed", None)  # a block dimension dropped inside the kernel


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: jax.Array, b: int) -> jax.Array:
    """Ceiling division of a non-negative scalar (lax.div truncates, which is floor here)."""
    return lax.div(a + (b - 1), b)


def _query_block_table(
    cu_q_lens: jax.Array,  # i32[S + 1]
    kv_lens: jax.Array,  # i32[S]
    num_seqs: jax.Array,  # i32[1]
    num_rows: int,
    block_q: int,
    num_blocks: int,
) -> jax.Array:  # i32[5, num_blocks]
    """Cuts every sequence's slab rows into blocks of `block_q`; one table column per block.

    Fields: page-table row, first slab row, rows in use (0: spare block), position of the first row
    in its sequence, kv_len. Segment S is the padding tail: no keys, so its rows come out zero.
    """
    num_slots = kv_lens.shape[0]
    n = num_seqs[0]
    in_use = jnp.arange(num_slots) < n
    q_lens = jnp.where(in_use, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    pad_start = cu_q_lens[n]
    seg_len = jnp.append(q_lens, num_rows - pad_start)  # [S + 1]
    seg_start = jnp.append(cu_q_lens[:-1], pad_start)
    seg_kv_len = jnp.append(jnp.where(in_use, kv_lens, 0), 0)
    seg_pos = jnp.append(kv_lens - q_lens, 0)
    seg_slot = jnp.arange(num_slots + 1).at[-1].set(0)
    seg_blocks = (seg_len + block_q - 1) // block_q
    seg_end_block = jnp.cumsum(seg_blocks)  # exclusive end of each segment's blocks

    blocks = jnp.arange(num_blocks)
    seg = jnp.searchsorted(seg_end_block, blocks, side="right")
    used = seg <= num_slots
    seg = jnp.minimum(seg, num_slots)
    first_row = (blocks - (seg_end_block[seg] - seg_blocks[seg])) * block_q
    rows = jnp.where(used, jnp.clip(seg_len[seg] - first_row, 0, block_q), 0)
    table = (
        seg_slot[seg],
        seg_start[seg] + first_row,
        rows,
        seg_pos[seg] + first_row,
        seg_kv_len[seg],
    )
    return jnp.stack(table).astype(jnp.int32)


def ragged_paged_attention_kernel(
    block_table_ref,  # i32[5, num_blocks]: see `_query_block_table`
    window_ref,  # i32[1]: the sliding window (read only when `has_window`)
    page_indices_ref,  # i32[S, W_padded]
    q_ref,  # [T + block_q, group_padded, head_dim]: this program's KV head
    k_pages_ref,  # [total_num_pages, page_size, head_dim]: this program's KV head
    v_pages_ref,  # [total_num_pages, page_size, head_dim]
    o_ref,  # [T + block_q, group_padded, head_dim]
    *,
    sm_scale: float,
    has_window: bool,
    logit_softcap: float | None,
    block_q: int,
    pages_per_block: int,
    mask_value: float,
):
    block = pl.program_id(0)
    sliding_window = window_ref[0] if has_window else None
    num_rows = block_table_ref[2, block]

    @pl.when(num_rows > 0)
    def _():
        slot = block_table_ref[0, block]
        first_row = block_table_ref[1, block]
        first_pos = block_table_ref[3, block]
        kv_len = block_table_ref[4, block]
        _, group, head_dim = q_ref.shape
        page_size = k_pages_ref.shape[1]
        block_kv = pages_per_block * page_size
        tile_rows = block_q * group

        q = q_ref[pl.ds(first_row, block_q)].reshape(tile_rows, head_dim)  # [M, D]
        row_ids = lax.broadcasted_iota(jnp.int32, (tile_rows,), 0)
        q_pos = first_pos + lax.div(row_ids, group)  # [M]: tile row -> token position
        precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

        def tile(j, carry, masked: bool):
            row_max, row_sum, acc = carry  # f32[M], f32[M], f32[M, D]
            pages = page_indices_ref[slot, pl.ds(j * pages_per_block, pages_per_block)]
            k = k_pages_ref[pages].reshape(block_kv, head_dim)  # [C, D]
            v = v_pages_ref[pages].reshape(block_kv, head_dim)  # [C, D]
            s = _dot(q, k, precision, transpose_b=True)  # [M, C]
            if logit_softcap is None:
                s = s * (sm_scale * LOG2_E)  # log2 domain: exp2 below
            else:
                s = (logit_softcap * LOG2_E) * jnp.tanh(s * (sm_scale / logit_softcap))
            if masked:
                kv_pos = j * block_kv + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
                visible = (kv_pos <= q_pos[:, None]) & (kv_pos < kv_len)
                if sliding_window is not None:
                    visible &= kv_pos > q_pos[:, None] - sliding_window
                s = jnp.where(visible, s, mask_value)
            max_new = jnp.maximum(row_max, s.max(axis=1))
            p = jnp.exp2(s - max_new[:, None])
            if masked:  # a row with nothing visible yet has s == max_new: zero it explicitly
                p = jnp.where(visible, p, 0.0)
            alpha = jnp.exp2(row_max - max_new)
            pv = _dot(p.astype(v.dtype), v, precision)  # [M, D]
            return max_new, alpha * row_sum + p.sum(axis=1), alpha[:, None] * acc + pv

        lo, full_lo, full_hi, hi = _kv_tile_bounds(first_pos, num_rows, kv_len, block_kv, sliding_window)
        carry = (
            jnp.full((tile_rows,), mask_value, jnp.float32),
            jnp.zeros((tile_rows,), jnp.float32),
            jnp.zeros((tile_rows, head_dim), jnp.float32),
        )
        carry = lax.fori_loop(lo, full_lo, functools.partial(tile, masked=True), carry)
        carry = lax.fori_loop(full_lo, full_hi, functools.partial(tile, masked=False), carry)
        _, row_sum, acc = lax.fori_loop(full_hi, hi, functools.partial(tile, masked=True), carry)

        out = acc / jnp.where(row_sum == 0.0, 1.0, row_sum)[:, None]  # padding rows: no keys, zeros
        out = out.reshape(block_q, group, head_dim).astype(o_ref.dtype)
        token_ids = lax.broadcasted_iota(jnp.int32, (block_q, group, head_dim), 0)
        pltriton.store(o_ref.at[pl.ds(first_row, block_q)], out, mask=token_ids < num_rows)


def _dot(a: jax.Array, b: jax.Array, precision, transpose_b: bool = False) -> jax.Array:
    """a @ b (or a @ b.T) with float32 accumulation."""
    dims = (((1,), (1 if transpose_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _kv_tile_bounds(first_pos, num_rows, kv_len, block_kv: int, sliding_window):
    """KV tiles a query block visits: masked [lo, full_lo), unmasked [full_lo, full_hi), masked
    [full_hi, hi). Unmasked tiles lie wholly inside every row's causal range and window."""
    last_pos = first_pos + num_rows - 1
    hi = _cdiv(jnp.minimum(last_pos + 1, kv_len), block_kv)  # kv_len 0 (padding): no tiles
    if sliding_window is None:
        lo = full_lo = jnp.int32(0)
    else:
        lo = lax.div(jnp.maximum(first_pos - sliding_window + 1, 0), block_kv)
        full_lo = _cdiv(jnp.maximum(last_pos - sliding_window + 1, 0), block_kv)
    full_lo = jnp.clip(full_lo, lo, hi)
    full_hi = jnp.clip(lax.div(first_pos + 1, block_kv), full_lo, hi)
    return lo, full_lo, full_hi, hi


def _validate_layout(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array) -> None:
    if q.ndim != 3 or k_pages.ndim != 4:
        raise ValueError(f"{q.shape=} must be [T, H, D] and {k_pages.shape=} [KVH, P, page, D]")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"{k_pages.shape=} != {v_pages.shape=}")
    num_kv_heads, _, page_size, head_dim = k_pages.shape
    if q.shape[2] != head_dim:
        raise ValueError(f"{q.shape=} and {k_pages.shape=} disagree on head_dim")
    if q.shape[1] % num_kv_heads:
        raise ValueError(f"{q.shape[1]=} query heads is not a multiple of {num_kv_heads=}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"{head_dim=} must be a power of two >= 16 (Triton tiles)")
    if page_size & (page_size - 1):
        raise ValueError(f"{page_size=} must be a power of two")
    if q.dtype not in SUPPORTED_DTYPES or k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
        raise ValueError(f"{q.dtype=}, {k_pages.dtype=}, {v_pages.dtype=} must be one float type")


def supports(q: jax.Array, k_pages: jax.Array) -> bool:
    """Whether the kernel takes these shapes and dtypes (static: safe to ask while tracing)."""
    if pltriton is None:
        return False
    try:
        _validate_layout(q, k_pages, k_pages)
    except ValueError:
        return False
    return True


def _validate_metadata(kv_lens, page_indices, cu_q_lens, num_seqs) -> None:
    num_slots = kv_lens.shape[0]
    expected = {
        "kv_lens": (kv_lens, (num_slots,)),
        "page_indices": (page_indices, (num_slots, page_indices.shape[-1])),
        "cu_q_lens": (cu_q_lens, (num_slots + 1,)),
        "num_seqs": (num_seqs, (1,)),
    }
    for name, (x, shape) in expected.items():
        if x.shape != shape or x.dtype != jnp.int32:
            raise ValueError(f"{name}: {x.shape=} {x.dtype=}, expected int32{list(shape)}")


def ragged_paged_attention(*args, sliding_window: int | jax.Array | None = None, **kwargs) -> jax.Array:
    """Attention of every slab row over its own sequence's paged K/V: see `_ragged_paged_attention`.

    A Python int `sliding_window` is checked here, before jit turns it into a traced value."""
    if isinstance(sliding_window, int) and sliding_window < 1:
        raise ValueError(f"{sliding_window=} must be positive")
    return _ragged_paged_attention(*args, sliding_window=sliding_window, **kwargs)


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "logit_softcap",
        "pages_per_block",
        "block_rows",
        "num_warps",
        "num_stages",
        "interpret",
        "debug",
    ),
)
def _ragged_paged_attention(
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
    pages_per_block: int | None = None,
    block_rows: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
    debug: bool = False,
) -> jax.Array:  # [T, num_q_heads, head_dim], q.dtype
    """Attention of every slab row over its own sequence's paged K/V (see the module docstring).

    Tile parameters left as None come from `tiles.get_tile_sizes(head_dim, page_size, dtype)`:
    `pages_per_block` pages per KV tile, `block_rows` query-tile rows (tokens x padded group).
    `interpret=True` runs the kernel through the Pallas interpreter (any backend, slowly).
    `sliding_window` may be traced (a per-layer value of a scanned layer stack); `logit_softcap`
    (static) caps scores as cap * tanh(s / cap) before the softmax.
    """
    if pltriton is None:
        raise NotImplementedError(f"this JAX ({jax.__version__}) has no Pallas Triton back end")
    _validate_layout(q, k_pages, v_pages)
    _validate_metadata(kv_lens, page_indices, cu_q_lens, num_seqs)
    num_rows, num_q_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    tiles = get_tile_sizes(head_dim, page_size, q.dtype)
    pages_per_block = pages_per_block or tiles.pages_per_block(page_size)
    block_rows = block_rows or tiles.block_rows
    for name, value in (("pages_per_block", pages_per_block), ("block_rows", block_rows)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name}={value} must be a power of two")
    group = num_q_heads // num_kv_heads
    group_padded = _next_power_of_two(group)
    block_q = max(1, block_rows // group_padded)
    if not interpret and min(block_q * group_padded, pages_per_block * page_size) < 16:
        raise ValueError(
            f"{block_rows=} and {pages_per_block=} x {page_size=} must both reach 16: "
            "Triton matmul tiles have at least 16 rows and columns"
        )
    num_blocks = num_rows // block_q + kv_lens.shape[0] + 1

    # Rows padded by one block so every block's rows are in bounds; heads padded to a power of two.
    q = q.reshape(num_rows, num_kv_heads, group, head_dim)
    q = jnp.pad(q, ((0, block_q), (0, 0), (0, group_padded - group), (0, 0)))
    width = page_indices.shape[1]
    page_indices = jnp.pad(page_indices, ((0, 0), (0, -width % pages_per_block)))
    block_table = _query_block_table(cu_q_lens, kv_lens, num_seqs, num_rows, block_q, num_blocks)
    window = jnp.reshape(jnp.asarray(0 if sliding_window is None else sliding_window, jnp.int32), (1,))

    kernel = functools.partial(
        ragged_paged_attention_kernel,
        sm_scale=sm_scale,
        has_window=sliding_window is not None,
        logit_softcap=logit_softcap,
        block_q=block_q,
        pages_per_block=pages_per_block,
        mask_value=DEFAULT_MASK_VALUE,
    )
    whole = lambda x: pl.BlockSpec(x.shape, lambda b, h: (0,) * x.ndim)
    per_head_q = pl.BlockSpec((q.shape[0], _SQUEEZED, group_padded, head_dim), lambda b, h: (0, h, 0, 0))
    per_head_kv = pl.BlockSpec((_SQUEEZED, num_pages, page_size, head_dim), lambda b, h: (h, 0, 0, 0))
    out = pl.pallas_call(
        kernel,
        grid=(num_blocks, num_kv_heads),
        in_specs=[
            whole(block_table),
            whole(window),
            whole(page_indices),
            per_head_q,
            per_head_kv,
            per_head_kv,
        ],
        out_specs=per_head_q,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltriton.CompilerParams(
            num_warps=num_warps or tiles.num_warps, num_stages=num_stages or tiles.num_stages
        ),
        interpret=interpret,
        debug=debug,
        name=f"ragged_paged_attention_{block_q=}_{pages_per_block=}",
    )(block_table, window, page_indices, q, k_pages, v_pages)
    return out[:num_rows, :, :group].reshape(num_rows, num_q_heads, head_dim)
