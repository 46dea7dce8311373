"""Speculative decoding with a draft model (`fastgen_jax.speculative_draft`): greedy outputs equal those
without speculation whatever the draft, the draft mirrors the target's tokens (the target as its own
draft is accepted almost always), and a draft with another vocabulary is refused."""

import dataclasses

import jax
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from fastgen_jax.checkpoints import load_checkpoint
from fastgen_jax.config import ConfigError, EngineConfig
from fastgen_jax.engine import Sequence
from fastgen_jax.llm_engine import LLMEngine
from fastgen_jax.speculative_draft import DraftProposer, check_same_vocabulary, draft_config
from fastgen_jax.tokenizer import Tokenizer
from tests.test_llm_engine import run_with_logprobs

VOCAB = 512


def _save_llama(path, seed, layers, hidden, heads, kv_heads, tokenizer):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        initializer_range=0.3,
        eos_token_id=2,
        bos_token_id=1,
    )
    transformers.LlamaForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    tokenizer.save(path)
    return path


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory, smollm2_dir):
    """A random 2-layer Llama with SmolLM2's tokenizer."""
    tokenizer = Tokenizer.from_hf_dir(smollm2_dir)
    return _save_llama(tmp_path_factory.mktemp("target"), 0, 2, 64, 4, 2, tokenizer)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, smollm2_dir):
    """A smaller random Llama (1 layer, other weights) with the same tokenizer."""
    tokenizer = Tokenizer.from_hf_dir(smollm2_dir)
    return _save_llama(tmp_path_factory.mktemp("draft"), 1, 1, 32, 2, 1, tokenizer)


def _word_tokenizer(words):
    backend = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0])
    )
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return Tokenizer(backend)


def _workload():
    """Prompts of different lengths, several longer than the budget of 32 (split), one twice (as the
    `n` choices of one prompt are)."""
    rng = np.random.default_rng(3)
    lengths = [70, 1, 33, 5, 120, 17, 9]
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in lengths]
    prompts.append(list(prompts[4]))
    num_new = [40, 60, 7, 70, 24, 50, 60, 24]
    return prompts, num_new


_run = run_with_logprobs


def _engine(target_dir, speculative="off", draft=None, **overrides):
    config = dict(token_budget=32, token_buckets=(8, 32), max_num_seqs=8, max_model_len=256, page_size=16)
    config.update(num_pages=18)  # 17 pages for 8 sequences of up to 9 each: preemptions
    config.update(overrides)
    if speculative != "off":
        config.update(speculative=speculative, speculative_model=str(draft), num_speculative_tokens=4)
    engine = LLMEngine(load_checkpoint(target_dir), EngineConfig(**config), progress=False)
    if engine.speculator is not None:
        # These tests check what verification does, so every step that can speculate does: no cost
        # model (on these tiny models the draft costs as much as the target; it would refuse).
        engine.speculator.step_seconds.clear()
    return engine


@pytest.fixture(scope="module")
def engines(target_dir, draft_dir):
    """One engine without speculation, one with the target as its own draft, one with a random
    draft, shared by the tests below (each runs whole workloads: nothing is left in flight)."""
    return {
        "off": _engine(target_dir),
        "self": _engine(target_dir, "draft", target_dir),
        "random": _engine(target_dir, "draft", draft_dir),
    }


@pytest.fixture(scope="module")
def plain_outputs(engines):
    return _run(engines["off"], *_workload(), logprobs=True)


def _acceptance(engine):
    s = engine.stats
    return s.spec_accepted_tokens / s.spec_proposed_tokens


@pytest.mark.parametrize("which", ["self", "random"])
def test_greedy_outputs_equal_decoding_without_speculation(engines, plain_outputs, which):
    """Any draft: the same tokens and log-probabilities as without speculation. The target as its own
    draft proves the mirroring (its greedy proposals are the target's own argmax: nearly all
    accepted); a random draft is almost never right (low acceptance is expected) and changes nothing."""
    engine = engines[which]
    tokens, logprobs = _run(engine, *_workload(), logprobs=True)
    assert tokens == plain_outputs[0]
    for got, want in zip(logprobs, plain_outputs[1], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    proposer = engine.speculator.proposer
    assert engine.stats.spec_proposed_tokens > 0 and proposer.stats.seconds_per_step > 0
    s = engine.stats
    print(f"{which} draft: {proposer.stats}, accepted {s.spec_accepted_tokens}/{s.spec_proposed_tokens}")
    if which == "self":
        assert _acceptance(engine) > 0.9
    assert engine.stats.preemptions > 0  # the target's pool is small: recomputation kept outputs too
    # Every finished request was forgotten and its draft pages given back; nothing compiled late.
    assert proposer.num_mirrors == 0
    assert proposer.num_free_pages == proposer.allocator.num_usable
    assert proposer.runner.num_compiled == proposer.stats.compiled_programs == len(proposer.planner.shapes())


def test_stop_tokens_and_top_logprobs_stay_exact(engines, plain_outputs):
    """A stop token inside an accepted run of drafts ends the request there, with the same top
    log-probabilities as without speculation (this time the prompts hit the prefix cache)."""
    prompts, num_new = _workload()
    stop = plain_outputs[0][4][9]  # the 10th token of a long request
    params = dict(stop_token_ids=(stop,), top_logprobs=2, logprobs=True)
    want = _run(engines["off"], prompts, num_new, **params)
    got = _run(engines["self"], prompts, num_new, **params)
    assert got[0] == want[0]
    for got_lp, want_lp in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(got_lp, want_lp, rtol=1e-4, atol=1e-4)
    want = want[0]
    assert want[4][-1] == stop and len(want[4]) <= 10


def test_the_draft_mirror_catches_up_only_what_changed(target_dir, draft_dir):
    """Proposing after the target took some proposals and one token of its own recomputes only the
    tokens past the common prefix, and proposes what a fresh draft would from the same tokens."""
    target = load_checkpoint(target_dir)
    draft = load_checkpoint(draft_dir)
    config = draft_config(EngineConfig(token_budget=32, max_num_seqs=4, page_size=16), 64, 256, 1)

    mirrored = DraftProposer(draft, config, "float32", target.config.vocab_size)
    rng = np.random.default_rng(0)
    seq = Sequence("a", rng.integers(3, VOCAB, 50).tolist(), 100)
    [first] = mirrored.propose([(seq, 4)])
    assert len(first) == 4 and mirrored.stats.rows == 50 + 3  # prompt in 2 chunks, then 3 fed back
    assert mirrored.stats.steps == 2 + 3
    for token in [*first[:2], (first[2] + 1) % VOCAB]:  # two accepted, then the target's own token
        seq.append_token(token)
    rows = mirrored.stats.rows
    [second] = mirrored.propose([(seq, 3)])
    assert mirrored.stats.rows - rows == 1 + 2  # only the new token, then 2 fed back
    fresh = Sequence("b", seq.all_token_ids, 100)  # the same tokens, no mirror yet
    assert second == mirrored.propose([(fresh, 3)])[0]
    for token in [*second, 7]:  # all accepted, then a bonus token: the last proposal has no KV yet
        seq.append_token(token)
    rows = mirrored.stats.rows
    [third] = mirrored.propose([(seq, 2)])
    assert mirrored.stats.rows - rows == 2 + 1
    assert third == mirrored.propose([(Sequence("c", seq.all_token_ids, 100), 2)])[0]
    for request_id in "abc":
        mirrored.forget(request_id)
    assert mirrored.num_mirrors == 0 and mirrored.num_free_pages == mirrored.allocator.num_usable


def test_a_full_draft_pool_drops_idle_mirrors_then_proposes_nothing(target_dir, draft_dir):
    target = load_checkpoint(target_dir)
    draft = load_checkpoint(draft_dir)
    base = draft_config(EngineConfig(token_budget=32, max_num_seqs=4, page_size=16), 1, 64, 1)
    config = dataclasses.replace(base, num_pages=6)  # 5 usable pages; a sequence below takes 3
    p = DraftProposer(draft, config, "float32", target.config.vocab_size)
    rng = np.random.default_rng(1)
    a, b = (Sequence(r, rng.integers(3, VOCAB, 40).tolist(), 20) for r in "ab")
    first_a, none_b = p.propose([(a, 2), (b, 2)])  # both asked: b finds 2 free pages, gets nothing
    assert len(first_a) == 2 and none_b == [] and p.stats.starved == 1 and p.stats.dropped == 0
    assert len(p.propose([(b, 2)])[0]) == 2 and p.stats.dropped == 1  # a was idle: dropped for b
    assert p.propose([(a, 2)]) == [first_a] and p.stats.dropped == 2  # a again, from scratch
    assert p.num_mirrors == 1


def test_a_draft_with_another_vocabulary_is_refused(tmp_path, target_dir):
    words = [f"w{i}" for i in range(VOCAB)]
    other = _save_llama(tmp_path / "other", 2, 1, 32, 2, 1, _word_tokenizer(words))
    with pytest.raises(ConfigError, match="speculative_model=.*vocabulary of 512 tokens"):
        _engine(target_dir, "draft", other)
    with pytest.raises(ConfigError, match="speculative_model='x'.*token id 1 is 'v1'"):
        check_same_vocabulary(_word_tokenizer(words), _word_tokenizer(["w0", "v1", *words[2:]]), "x")
    with pytest.raises(ConfigError, match="speculative_model=.*cannot be loaded"):
        _engine(target_dir, "draft", tmp_path / "missing")


def test_seeded_sampling_is_unchanged_by_a_greedy_draft(engines):
    """Sampled requests verify the draft's greedy proposals against what plain decoding draws at each
    position (the same per-position key): the same text with and without speculation."""
    prompts, num_new = _workload()
    params = dict(temperature=0.8, top_p=0.95, seed=11)
    want = _run(engines["off"], prompts, num_new, **params)[0]
    proposed = engines["self"].stats.spec_proposed_tokens
    assert _run(engines["self"], prompts, num_new, **params)[0] == want
    assert engines["self"].stats.spec_proposed_tokens > proposed


@pytest.mark.slow  # about 24 s (CI time); -m slow
def test_an_int8_target_drafts_with_int8_weights_and_outputs_stay_the_targets(target_dir):
    """`quantize="int8"` reaches the draft (its own runner holds int8 projections); verification
    still leaves the int8 target's greedy tokens as they are without speculation."""
    prompts = [np.random.default_rng(5).integers(3, VOCAB, 12).tolist()]
    plain = _run(_engine(target_dir, quantize="int8"), prompts, [16])[0]
    engine = _engine(target_dir, "draft", target_dir, quantize="int8")
    assert _run(engine, prompts, [16])[0] == plain
    draft_weights = engine.speculator.proposer.runner.params["params"]["layers"]["attn"]
    assert draft_weights["wqkv_int8"].dtype == np.int8 and "wqkv" not in draft_weights
    assert engine.stats.spec_proposed_tokens > 0


def test_waiting_until_ready_waits_for_the_draft_pool_too(engines, monkeypatch):
    engine = engines["random"]
    waited = []
    for name, runner in (("target", engine.runner), ("draft", engine.speculator.proposer.runner)):
        monkeypatch.setattr(runner, "wait_until_ready", lambda name=name: waited.append(name))
    engine.wait_until_ready()
    assert waited == ["target", "draft"]
    monkeypatch.undo()
    engine.wait_until_ready()
    pools = [engine.runner.kv_cache, engine.speculator.proposer.runner.kv_cache]
    assert all(leaf.is_ready() for leaf in jax.tree.leaves(pools))
