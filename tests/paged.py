"""Test helper: run one sequence through a model's paged KV cache in chunks, asking logits for all rows."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fastgen_jax.models import AttentionMetadata, build_model, init_kv_cache


def chunk_metadata(
    start: int,
    n: int,
    pages: list[int],
    page_size: int,
    width: int,
    num_pages: int,
    slab: int,
    num_slots: int = 2,
) -> AttentionMetadata:
    """Metadata for rows start..start+n-1 of a single sequence, padded to `slab` rows."""
    pos = np.arange(start, start + n)
    positions = np.zeros(slab, np.int32)
    positions[:n] = pos
    slots = np.full(slab, num_pages * page_size, np.int32)
    slots[:n] = np.asarray(pages)[pos // page_size] * page_size + pos % page_size
    page_indices = np.zeros((num_slots, width), np.int32)
    page_indices[0, : len(pages)] = pages
    kv_lens = np.zeros(num_slots, np.int32)
    kv_lens[0] = start + n
    cu = np.full(num_slots + 1, n, np.int32)
    cu[0] = 0
    logits_indices = np.arange(slab, dtype=np.int32)
    return AttentionMetadata(
        positions=jnp.asarray(positions),
        slot_mapping=jnp.asarray(slots),
        kv_lens=jnp.asarray(kv_lens),
        page_indices=jnp.asarray(page_indices),
        cu_q_lens=jnp.asarray(cu),
        num_seqs=jnp.asarray([1], jnp.int32),
        logits_indices=jnp.asarray(logits_indices),
    )


def paged_logits(
    config,
    params,
    token_ids,
    chunks=None,
    page_size=4,
    slab=None,
    dtype=jnp.float32,
    attention=None,
    max_model_len=None,
    kv_dtype=None,
) -> np.ndarray:
    """Logits f32[len(token_ids), vocab] computed chunk by chunk through the paged cache (its pages
    in `kv_dtype`, default `dtype`).

    Pages are handed out in a scrambled order so that page-table indirection is really exercised.
    `attention` is a resolved `fastgen_jax.attention.Attention` (default: the platform's);
    `max_model_len` the engine's longest sequence (LongRoPE models choose their factors by it).
    """
    token_ids = list(token_ids)
    n = len(token_ids)
    chunks = chunks or [n]
    assert sum(chunks) == n
    num_pages = -(-n // page_size) + 3
    pages = list(np.random.default_rng(0).permutation(np.arange(1, num_pages))[: -(-n // page_size)])
    width = 1 << max(0, (len(pages) - 1).bit_length())
    slab = slab or max(chunks)
    model = build_model(config, dtype, attention, max_model_len)
    step = jax.jit(model.apply)
    params = jax.device_put(params)  # once, not on every call
    kv = init_kv_cache(config, num_pages, page_size, kv_dtype or dtype)
    out, start = [], 0
    for c in chunks:
        md = chunk_metadata(start, c, pages, page_size, width, num_pages, slab)
        ids = np.zeros(slab, np.int32)
        ids[:c] = token_ids[start : start + c]
        logits, kv = step(params, jnp.asarray(ids), kv, md)
        out.append(np.asarray(logits)[:c])
        start += c
    return np.concatenate(out)


def greedy_continuation(config, params, prompt_ids, num_new, page_size=16) -> list[int]:
    """One sequence, greedy: the prompt in one pass, then one token per pass through the paged cache."""
    total = len(prompt_ids) + num_new
    num_pages = -(-total // page_size) + 1
    pages = list(range(1, num_pages))
    width = 1 << max(0, (len(pages) - 1).bit_length())
    model = build_model(config)
    step = jax.jit(model.apply)
    params = jax.device_put(params)
    kv = init_kv_cache(config, num_pages, page_size, jnp.float32)
    ids, start, out = list(prompt_ids), 0, []
    while len(out) < num_new:
        n = len(ids) - start
        md = chunk_metadata(start, n, pages, page_size, width, num_pages, n)
        md = dataclasses.replace(md, logits_indices=jnp.asarray([n - 1], jnp.int32))
        logits, kv = step(params, jnp.asarray(ids[start:], jnp.int32), kv, md)
        out.append(int(np.argmax(np.asarray(logits)[0])))
        start = len(ids)
        ids.append(out[-1])
    return out
