"""`get_attention`: which implementation each `attention_impl` resolves to, and that the Pallas
kernel (through the interpreter on the CPU) and the C++ CPU kernel give a model the same logits and
tokens as the reference."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers

import cpu_kernels
from fastgen_jax import attention as attention_module
from fastgen_jax.attention import Attention, get_attention
from fastgen_jax.checkpoints import Checkpoint
from fastgen_jax.config import ATTENTION_IMPLS, ConfigError, EngineConfig, ModelConfig
from fastgen_jax.llm_engine import LLMEngine
from fastgen_jax.models import build_model, init_kv_cache
from fastgen_jax.sampling_params import SamplingParams
from fastgen_jax.tokenizer import Tokenizer
from pallas_kernels import ragged_paged_attention, reference
from tests.paged import chunk_metadata, paged_logits

ON_GPU = jax.default_backend() == "gpu"
REFERENCE = Attention("reference")
KERNEL = Attention("pallas_interpret")


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(
        architecture="LlamaForCausalLM",
        vocab_size=61,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        eos_token_ids=(2,),
    )
    return ModelConfig(**{**fields, **overrides})


def random_params(config: ModelConfig, seed=0):
    """{"params": ...} of a random model, scaled up so attention is far from uniform. Made once per
    (config, seed) in a process (a compiled init: 3-7 s on 2 cores); each call gets its own
    containers over the same (immutable) arrays."""
    return jax.tree.map(lambda x: x, _random_params(config, seed))


@functools.cache
def _random_params(config: ModelConfig, seed):
    model = build_model(config, jnp.float32, REFERENCE)
    md = chunk_metadata(0, 4, [1], 4, 1, 2, 4)
    kv = init_kv_cache(config, 2, 4, jnp.float32)
    params = model.init(jax.random.key(seed), jnp.zeros(4, jnp.int32), kv, md)
    return jax.tree.map(lambda x: x * 4.0 if x.ndim == 3 else x, params)


# ----------------------------------------------------------------------------- resolution


def test_every_impl_is_an_engine_config_choice():
    assert set(ATTENTION_IMPLS) == {"auto", "reference", "pallas", "pallas_interpret", "cpu"}
    for impl in ATTENTION_IMPLS:
        assert EngineConfig(attention_impl=impl).attention_impl == impl
    with pytest.raises(ConfigError, match="attention_impl"):
        EngineConfig(attention_impl="flash")


@pytest.mark.skipif(ON_GPU, reason="checks the CPU resolution")
def test_auto_is_the_cpu_kernel_on_cpu():
    attention = get_attention("auto")
    assert attention == Attention("cpu")
    assert attention.paged_attention is cpu_kernels.ragged_paged_attention.ragged_paged_attention
    assert attention.write_kv is cpu_kernels.write_kv.write_kv_pages


@pytest.fixture
def broken_cpu_kernel(monkeypatch):
    """A CPU kernel whose build fails, with the resolution caches cleared before and after."""

    def fail():
        raise cpu_kernels.build.KernelBuildError("g++ failed (exit 1): no compiler here")

    monkeypatch.setattr(cpu_kernels.build, "load", fail)
    for cached in (get_attention, attention_module._cpu_kernel_error):
        cached.cache_clear()
    yield
    for cached in (get_attention, attention_module._cpu_kernel_error):
        cached.cache_clear()


@pytest.mark.skipif(ON_GPU, reason="checks the CPU resolution")
def test_auto_falls_back_to_the_reference_with_one_log_line_when_the_cpu_kernel_fails(
    broken_cpu_kernel, caplog
):
    with caplog.at_level(logging.WARNING, logger="fastgen_jax.attention"):
        assert get_attention("auto") == REFERENCE
        get_attention("reference")
    assert [r.getMessage() for r in caplog.records] == [
        "CPU attention kernel unavailable, using the reference: g++ failed (exit 1): no compiler here"
    ]


@pytest.mark.skipif(ON_GPU, reason="checks the CPU resolution")
def test_explicit_cpu_kernel_that_fails_to_build_is_a_config_error(broken_cpu_kernel):
    with pytest.raises(ConfigError, match="attention_impl='cpu'.*no compiler here"):
        get_attention("cpu")


@pytest.mark.gpu
def test_auto_is_the_kernel_on_gpu():
    assert get_attention("auto") == Attention("pallas", fallback=True)


@pytest.mark.skipif(ON_GPU, reason="checks the CPU resolution")
def test_pallas_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="pallas_interpret"):
        get_attention("pallas")


def test_unknown_impl_is_a_config_error():
    with pytest.raises(ConfigError, match="attention_impl"):
        get_attention("flash")


def test_kernel_impls_share_the_reference_kv_write():
    assert KERNEL.write_kv is reference.write_kv_pages_reference


def test_fallback_takes_the_reference_for_shapes_the_kernel_cannot_take():
    """head_dim 24 is no power of two: "auto" falls back, an explicit kernel choice raises."""
    q = jax.random.normal(jax.random.key(0), (8, 4, 24))
    k_pages = jax.random.normal(jax.random.key(1), (2, 3, 4, 24))
    metadata = (
        jnp.array([6, 0], jnp.int32),
        jnp.array([[1, 2], [0, 0]], jnp.int32),
        jnp.array([0, 6, 6], jnp.int32),
        jnp.array([1], jnp.int32),
    )
    assert not ragged_paged_attention.supports(q, k_pages)
    fallback = Attention("pallas_interpret", fallback=True).paged_attention
    got = fallback(q, k_pages, k_pages, *metadata, sm_scale=0.2)
    expected = reference.ragged_paged_attention_reference(q, k_pages, k_pages, *metadata, sm_scale=0.2)
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="head_dim"):
        KERNEL.paged_attention(q, k_pages, k_pages, *metadata, sm_scale=0.2)


# ----------------------------------------------------------------------------- a model


def assert_same_logits(attention: Attention, sliding_window: int | None) -> None:
    """Chunked prefill through the paged cache: chunks start and end mid-page, one is a single
    token, the slab has padding rows."""
    config = tiny_config(sliding_window=sliding_window)
    params = random_params(config)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, 29).tolist()
    kw = dict(chunks=[5, 11, 1, 12], page_size=8, slab=16)
    expected = paged_logits(config, params, ids, attention=REFERENCE, **kw)
    got = paged_logits(config, params, ids, attention=attention, **kw)
    diff = np.abs(got - expected).max()
    print(f"{attention.impl} sliding_window={sliding_window}: max |logits diff| {diff:.2e}")
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sliding_window", [None, pytest.param(5, marks=pytest.mark.slow)])  # 5: -m slow
def test_tiny_model_logits_match_the_reference(sliding_window):
    assert_same_logits(KERNEL, sliding_window)


@pytest.mark.skipif(ON_GPU, reason="the C++ kernel runs on the CPU backend")
@pytest.mark.parametrize("sliding_window", [None, 5])
def test_tiny_model_logits_with_the_cpu_kernel_match_the_reference(sliding_window):
    assert_same_logits(Attention("cpu"), sliding_window)


@pytest.mark.gpu
@pytest.mark.parametrize("sliding_window", [None, 5])
def test_tiny_model_logits_with_the_compiled_kernel_on_gpu(sliding_window):
    with jax.default_matmul_precision("highest"):  # no TF32 in the reference's f32 einsums
        assert_same_logits(Attention("pallas"), sliding_window)


def word_tokenizer(vocab_size: int) -> Tokenizer:
    vocab = {f"w{i}": i for i in range(vocab_size)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, special_tokens={"eos_token": "w2"})


def engine_greedy_tokens(attention_impl: str, prompts, num_new, keep_engine=False):
    """Each prompt's greedy tokens through a tiny engine (and the engine, with `keep_engine`)."""
    config = tiny_config()
    checkpoint = Checkpoint(config, random_params(config), word_tokenizer(config.vocab_size), "")
    engine_config = EngineConfig(
        token_budget=16,
        token_buckets=(16,),
        max_num_seqs=4,
        page_size=8,
        num_pages=24,
        max_model_len=32,
        attention_impl=attention_impl,
    )
    engine = LLMEngine(checkpoint, engine_config, dtype="float32", progress=False)
    params = SamplingParams(max_new_tokens=num_new, ignore_eos=True)
    ids = [engine.add_request(prompt_token_ids=p, sampling_params=params) for p in prompts]
    tokens = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    if keep_engine:
        return [tokens[i] for i in ids], engine
    return [tokens[i] for i in ids]


@pytest.mark.slow
def test_engine_greedy_tokens_match_the_reference():
    """SplitFuse steps mixing prompt chunks and decodes, through the whole engine."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 61, n).tolist() for n in (21, 3, 9)]
    expected = engine_greedy_tokens("reference", prompts, 6)
    assert engine_greedy_tokens("pallas_interpret", prompts, 6) == expected


# Slow (30 s): on the CPU `auto` picks this kernel, so every engine test of the default suite
# (transformers' greedy tokens in tests/models/test_smollm2.py among them) already runs it.
@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="the C++ kernel runs on the CPU backend")
def test_engine_greedy_tokens_with_the_cpu_kernel_match_the_reference():
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 61, n).tolist() for n in (21, 3, 9)]
    assert engine_greedy_tokens("cpu", prompts, 6) == engine_greedy_tokens("reference", prompts, 6)


@pytest.mark.gpu
def test_engine_greedy_tokens_with_the_compiled_kernel_on_gpu():
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 61, n).tolist() for n in (21, 3, 9)]
    with jax.default_matmul_precision("highest"):
        expected = engine_greedy_tokens("reference", prompts, 6)
        assert engine_greedy_tokens("pallas", prompts, 6) == expected
