"""Prefix caching in the engine: greedy outputs with the cache equal those without it and
transformers' one-request-at-a-time greedy decoding, while the shared prefixes are computed once."""

import numpy as np
import pytest

from fastgen_jax.checkpoints import load_checkpoint
from fastgen_jax.config import EngineConfig
from fastgen_jax.llm_engine import LLMEngine
from fastgen_jax.sampling_params import SamplingParams
from tests.test_llm_engine import TINY_VOCAB, hf_greedy, run_all, tiny_dir  # noqa: F401 - a fixture

PAGE = 16


@pytest.fixture(scope="module")
def engines(tiny_dir):  # noqa: F811
    """The tiny model twice, with and without the prefix cache (budget 64: long prompts are split)."""
    checkpoint = load_checkpoint(tiny_dir[0])

    def make(caching, **overrides):
        config = dict(
            token_budget=64, token_buckets=(64,), max_num_seqs=16, max_model_len=256, page_size=PAGE
        )
        config.update(overrides)
        return LLMEngine(checkpoint, EngineConfig(enable_prefix_caching=caching, **config), progress=False)

    return make(True), make(False), make


def tokens(rng, n):
    return rng.integers(3, TINY_VOCAB, n).tolist()


def computed(engine, run):
    """Prompt tokens the engine computed while `run()` ran."""
    before = engine.stats.prompt_tokens
    result = run()
    return result, engine.stats.prompt_tokens - before


@pytest.mark.parametrize("system_len", [100, 40])  # 40: the shared prefix ends in the middle of a page
def test_a_shared_system_prompt_gives_the_same_outputs_and_is_computed_once(tiny_dir, engines, system_len):  # noqa: F811
    cached, plain, _ = engines
    rng = np.random.default_rng(system_len)
    system = tokens(rng, system_len)
    prompts = [system + tokens(rng, int(n)) for n in rng.integers(5, 40, 6)]
    num_new = [12] * len(prompts)
    expected = [hf_greedy(tiny_dir[1], p, n) for p, n in zip(prompts, num_new, strict=True)]
    cached.reset_prefix_cache()
    got, work = computed(cached, lambda: run_all(cached, prompts, num_new))
    assert got == expected
    assert run_all(plain, prompts, num_new) == expected
    shared = (system_len // PAGE) * PAGE  # full pages of the system prompt
    assert work == sum(map(len, prompts)) - (len(prompts) - 1) * shared
    assert cached.stats.free_pages == cached.stats.total_pages and cached.stats.cached_pages > 0


def test_n_choices_of_one_prompt_prefill_it_once(tiny_dir, engines):  # noqa: F811
    cached, _, _ = engines
    prompt = tokens(np.random.default_rng(1), 150)  # longer than the budget of 64: chunked
    cached.reset_prefix_cache()
    got, work = computed(cached, lambda: run_all(cached, [prompt] * 4, [10] * 4))
    assert got == [hf_greedy(tiny_dir[1], prompt, 10)] * 4
    assert work == 150 + 3 * (150 - 144)  # each other choice recomputes only its partial last page


def test_a_multi_turn_chat_prefills_only_the_new_turn(tiny_dir, engines):  # noqa: F811
    cached, _, _ = engines
    rng = np.random.default_rng(2)
    cached.reset_prefix_cache()
    history, previous = tokens(rng, 60), 0
    for turn in range(3):
        [answer], work = computed(cached, lambda h=history: run_all(cached, [h], [20]))
        assert answer == hf_greedy(tiny_dir[1], history, 20)
        if turn:  # everything before the previous answer's last token is cached, whole pages of it
            assert work == len(history) - ((previous - 1) // PAGE) * PAGE
        previous = len(history) + len(answer)
        history = history + answer + tokens(rng, 15)


def test_cache_salts_keep_tenants_apart(engines):
    cached, _, _ = engines
    prompt = tokens(np.random.default_rng(3), 70)
    cached.reset_prefix_cache()

    def run(salt):
        rid = cached.add_request(
            prompt_token_ids=prompt, sampling_params=SamplingParams(max_new_tokens=2), cache_salt=salt
        )
        outs = []
        while cached.has_unfinished():
            outs += [o for o in cached.step() if o.request_id == rid]
        return outs[-1].num_cached_tokens

    assert [run("a"), run("b"), run("a"), run(None), run(None)] == [0, 0, 64, 0, 64]


def test_a_tiny_pool_evicts_cached_pages_and_preempts_with_the_same_outputs(tiny_dir, engines):  # noqa: F811
    _, _, make = engines
    rng = np.random.default_rng(4)
    systems = [tokens(rng, 48), tokens(rng, 33)]
    prompts = [systems[i % 2] + tokens(rng, int(n)) for i, n in enumerate(rng.integers(5, 40, 12))]
    num_new = rng.integers(30, 60, 12).tolist()
    expected = [hf_greedy(tiny_dir[1], p, n) for p, n in zip(prompts, num_new, strict=True)]
    engine = make(
        True, num_pages=17, token_budget=128, token_buckets=(128,), max_num_seqs=32
    )  # 16 pages for 12 requests
    assert run_all(engine, prompts, num_new) == expected
    assert engine.stats.preemptions > 0 and engine.scheduler.allocator.num_evictions > 0
    assert engine.stats.prefix_cache_hits > 0
    assert engine.stats.free_pages == engine.stats.total_pages
    assert engine.stats.compiled_after_warmup == 0
