"""KV pages in another type than the model's (`kv_cache_dtype`): bfloat16 pages under a float32
model, through every attention implementation (each against the reference on the same pages), the
C++ page writer against XLA's scatter, and the whole engine (pool, page count, batch invariance)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpu_kernels.write_kv import write_kv_pages
from fastgen_jax.attention import Attention
from fastgen_jax.checkpoints import Checkpoint
from fastgen_jax.config import ConfigError, EngineConfig
from fastgen_jax.llm_engine import LLMEngine
from fastgen_jax.runner import resolve_limits
from fastgen_jax.speculative_draft import draft_config
from pallas_kernels.reference import write_kv_pages_reference
from tests.paged import paged_logits
from tests.test_attention_dispatch import random_params, tiny_config, word_tokenizer
from tests.test_llm_engine import run_all

ON_CPU = jax.default_backend() == "cpu"


@given(
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
    kvh=st.integers(1, 4),
    num_pages=st.integers(2, 9),
    page_size=st.sampled_from([1, 4, 16]),
    rows=st.integers(0, 20),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=30, deadline=None, derandomize=True)
def test_the_cpu_writer_matches_the_scatter(dtype, kvh, num_pages, page_size, rows, seed):
    """Rows land where XLA's scatter puts them, rounded alike; out-of-range slots (padding, negative
    ones included) are dropped by both."""
    rng = np.random.default_rng(seed)
    slots_total = num_pages * page_size
    real = rng.permutation(slots_total)[: min(rows, slots_total)]
    padding = rng.integers(-3, 5, rows - len(real))  # out of range either side: dropped
    slots = np.r_[real, np.where(padding < 0, padding, slots_total + padding)].astype(np.int32)
    shape = (kvh, num_pages, page_size, 8)
    k_pages, v_pages = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((rows, kvh, 8)), jnp.float32) for _ in range(2))
    expected = write_kv_pages_reference(k_pages, v_pages, k, v, jnp.asarray(slots))
    got = jax.jit(write_kv_pages)(k_pages, v_pages, k, v, jnp.asarray(slots))
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == dtype
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(e, np.float32))


def test_pages_that_were_not_donated_are_left_alone():
    """The writer's output aliases its input: without donation XLA must hand it a copy."""
    pages = jnp.zeros((1, 2, 4, 8), jnp.bfloat16)
    rows = jnp.ones((1, 1, 8), jnp.float32)
    out, _ = jax.jit(write_kv_pages)(pages, pages, rows, rows, jnp.asarray([5], jnp.int32))
    assert float(jnp.abs(pages.astype(jnp.float32)).sum()) == 0.0
    assert float(out[0, 1, 1].astype(jnp.float32).sum()) == 8.0


# The Pallas kernel interpreted on the CPU is slow (16 s): `-m slow` there; its bfloat16 pages are also
# checked against the reference in tests/pallas_kernels/test_ragged_paged_attention.py.
IMPLS = [
    pytest.param("pallas_interpret", marks=pytest.mark.slow) if ON_CPU else "pallas_interpret",
    *(["cpu"] if ON_CPU else []),
]


@pytest.mark.parametrize("impl", IMPLS)
def test_every_impl_reads_bfloat16_pages_under_a_float32_model(impl):
    """Chunked prefill (chunks start and end mid-page, scrambled pages): each implementation agrees
    with the reference on the same bfloat16 pages, and the pages' rounding really shows against
    float32 pages (small, but not nothing). The Pallas kernel takes one float type, so its queries
    (and P before P.V) are rounded to bfloat16 too: a looser bound there."""
    config = tiny_config()
    params = random_params(config)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, 29).tolist()
    kw = dict(chunks=[5, 11, 1, 12], page_size=8, slab=16)
    reference = paged_logits(
        config, params, ids, attention=Attention("reference"), kv_dtype=jnp.bfloat16, **kw
    )
    got = paged_logits(config, params, ids, attention=Attention(impl), kv_dtype=jnp.bfloat16, **kw)
    tol = 5e-3 if impl.startswith("pallas") else 2e-4
    np.testing.assert_allclose(got, reference, atol=tol, rtol=tol)
    float32 = paged_logits(config, params, ids, attention=Attention("reference"), **kw)
    rounding = np.abs(reference - float32).max()
    assert 1e-5 < rounding < 0.05 * np.abs(float32).max(), rounding


LIMITS = dict(max_num_seqs=4, page_size=8, max_model_len=96)


def engine(kv_cache_dtype: str, kv_cache_bytes: int) -> LLMEngine:
    config = tiny_config(max_position_embeddings=128)
    checkpoint = Checkpoint(config, random_params(config), word_tokenizer(config.vocab_size), "")
    engine_config = EngineConfig(
        **LIMITS,
        token_budget=32,
        token_buckets=(4, 32),
        kv_cache_bytes=kv_cache_bytes,
        kv_cache_dtype=kv_cache_dtype,
        enable_prefix_caching=False,
    )
    return LLMEngine(checkpoint, engine_config, dtype="float32", progress=False)


def test_a_bfloat16_pool_holds_twice_the_pages_and_batches_like_one_at_a_time():
    config = tiny_config(max_position_embeddings=128)
    pages_bytes = 2 * 2 * 2 * 8 * 16 * 4 * 16  # 16 float32 pages of the tiny model (2 layers, 2 KV heads)
    limits = {
        kv: resolve_limits(
            config, EngineConfig(**LIMITS, kv_cache_bytes=pages_bytes, kv_cache_dtype=kv), "float32", 61
        )
        for kv in ("auto", "float32", "bfloat16")
    }
    assert [limits[kv].num_pages for kv in limits] == [16, 16, 32]
    bf16 = engine("bfloat16", kv_cache_bytes=pages_bytes)
    assert bf16.limits.num_pages == 32
    assert [k.dtype for k in bf16.runner.kv_cache] == [jnp.bfloat16] * 2
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 61, n).tolist() for n in (45, 3, 21)]
    batch = run_all(bf16, prompts, [6] * len(prompts))
    assert batch == [run_all(bf16, [p], [6])[0] for p in prompts]


def test_bad_values_are_refused_and_a_draft_keeps_the_targets_pages_and_weights():
    with pytest.raises(ConfigError, match="kv_cache_dtype must be one of"):
        EngineConfig(kv_cache_dtype="int8")
    target = EngineConfig(kv_cache_dtype="bfloat16", quantize="int8", speculative="ngram")
    draft = draft_config(target, 100, 256, 1024)
    assert (draft.kv_cache_dtype, draft.quantize) == ("bfloat16", "int8")
