"""Ragged paged attention on the CPU: the C++ kernel in `ragged_paged_attention.cc`, called through
XLA's FFI so the step stays one compiled program.

The contract is `pallas_kernels.reference.ragged_paged_attention_reference`'s (slab rows,
`cu_q_lens`, `kv_lens`, `page_indices`, sliding window, soft-capping, GQA, f32 or bf16 KV pages;
padding rows come out as zeros). The kernel reads each sequence's pages through its row of the page
table, so nothing is gathered, and its cost follows the real rows and their visible keys: the padded
slab and page-table width cost nothing. It runs over (sequence, KV head, block of 16 query rows) work
items on XLA's CPU thread pool, splitting long contexts over several items when there are few
sequences (see the C++ source's header). Scores and sums are float32 whatever the input dtypes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cpu_kernels import build

TARGET = "fastgen_ragged_paged_attention"
NO_WINDOW = 1 << 30  # a window no sequence reaches


def ragged_paged_attention(
    q: jax.Array,  # [T, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_kv_heads, total_num_pages, page_size, head_dim], f32 or bf16
    v_pages: jax.Array,  # [num_kv_heads, total_num_pages, page_size, head_dim], like k_pages
    kv_lens: jax.Array,  # i32[S]
    page_indices: jax.Array,  # i32[S, W]
    cu_q_lens: jax.Array,  # i32[S + 1]
    num_seqs: jax.Array,  # i32[1]
    *,
    sm_scale: float,
    sliding_window: int | jax.Array | None = None,
    logit_softcap: float | None = None,
) -> jax.Array:  # [T, num_q_heads, head_dim], q.dtype
    """Attention of every slab row over its own sequence's paged keys and values (see the module
    docstring). `sliding_window` may be a traced i32[] (a per-layer value in a scanned stack)."""
    num_rows, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[0]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads=} is not a multiple of {num_kv_heads=}")
    if k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype or k_pages.shape[3] != head_dim:
        raise ValueError(f"{k_pages.shape=} {v_pages.shape=} {k_pages.dtype=} {v_pages.dtype=} {q.shape=}")
    if k_pages.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"{k_pages.dtype=} must be float32 or bfloat16")
    if logit_softcap is not None and logit_softcap <= 0:
        raise ValueError(f"{logit_softcap=} must be positive")
    build.load()
    window = jnp.asarray(NO_WINDOW if sliding_window is None else sliding_window, jnp.int32).reshape(1)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
    out = call(
        q.astype(jnp.float32),
        k_pages,
        v_pages,
        kv_lens.astype(jnp.int32),
        page_indices.astype(jnp.int32),
        cu_q_lens.astype(jnp.int32),
        num_seqs.astype(jnp.int32).reshape(1),
        window,
        sm_scale=np.float32(sm_scale),
        logit_softcap=np.float32(logit_softcap or 0.0),
    )
    return out.astype(q.dtype)
