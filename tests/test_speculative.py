"""Speculative decoding: the output never changes (greedy: transformers one request at a time; sampled:
the same seed gives the same text without speculation), the verification on the device against a
numpy oracle, the n-gram proposer and the adaptive k."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgen_jax.checkpoints import load_checkpoint
from fastgen_jax.config import ConfigError, EngineConfig
from fastgen_jax.engine import SamplingArrays, Sequence
from fastgen_jax.engine.speculative import NgramProposer, Speculator
from fastgen_jax.llm_engine import LLMEngine
from fastgen_jax.sampler import verify
from fastgen_jax.sampling_params import SamplingParams
from tests.server.conftest import tiny_random_dir  # noqa: F401 - a fixture
from tests.test_llm_engine import TINY_VOCAB, hf_greedy, run_all, save_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    """A random 2-layer Llama whose greedy text falls into loops and leaves them (small weights): prompt
    lookup gets drafts accepted and rejected."""
    return save_tiny_llama(tmp_path_factory, smollm2_dir, initializer_range=0.05, name="loopy-llama")


def repetitive_workload(num, seed=0, max_prompt=120):
    """Prompts that repeat a random phrase (so prompt lookup finds matches) and random ones."""
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(num):
        phrase = rng.integers(3, TINY_VOCAB, int(rng.integers(4, 12))).tolist()
        if i % 3 == 2:
            prompts.append(rng.integers(3, TINY_VOCAB, int(rng.integers(1, max_prompt))).tolist())
        else:
            prompts.append((phrase * 40)[: int(rng.integers(len(phrase) + 2, max_prompt))])
    return prompts, rng.integers(8, 40, num).tolist()


def spec_engine(path, **options):
    """An engine with n-gram speculation and no cost model: these tests check what verification does,
    so every step that can speculate does. With the warm-up's timings the drafts' worth depends on how
    busy the machine was then (a busy CI worker measured the larger buckets slow and declined every
    draft); the cost model has its own tests below."""
    defaults = dict(token_budget=64, max_num_seqs=16, max_model_len=256, page_size=16, speculative="ngram")
    engine = LLMEngine(load_checkpoint(path), EngineConfig(**{**defaults, **options}), progress=False)
    if engine.speculator is not None:
        engine.speculator.step_seconds.clear()
    return engine


@pytest.fixture(scope="module")
def workload(tiny_dir):
    _, model = tiny_dir
    prompts, num_new = repetitive_workload(8)
    return prompts, num_new, [hf_greedy(model, p, n) for p, n in zip(prompts, num_new, strict=True)]


@pytest.mark.parametrize(
    "options",
    [
        dict(),  # budget 64 splits the longer prompts; overlap on when nobody speculates
        dict(async_scheduling=False, num_speculative_tokens=7, token_budget=32),
        pytest.param(dict(policy="prefill_first"), marks=pytest.mark.slow),  # -m slow (CI time)
        pytest.param(dict(policy="sla"), marks=pytest.mark.slow),
    ],
)
def test_greedy_outputs_equal_transformers_with_ngram_speculation(tiny_dir, workload, options):
    prompts, num_new, expected = workload
    engine = spec_engine(tiny_dir[0], **options)
    assert run_all(engine, prompts, num_new) == expected
    s = engine.stats
    assert s.spec_verifications > 0 and 0 < s.spec_accepted_tokens <= s.spec_proposed_tokens
    assert s.generation_tokens == sum(num_new)
    assert s.steps < sum(num_new)  # some steps emitted several tokens for a sequence
    assert s.compiled_after_warmup == 0
    assert s.free_pages == s.total_pages


def test_eviction_and_preemption_with_speculation_keep_greedy_outputs(tiny_dir):
    _, model = tiny_dir
    prompts, num_new = repetitive_workload(6, seed=3, max_prompt=90)
    num_new = [n + 20 for n in num_new]
    expected = [hf_greedy(model, p, n) for p, n in zip(prompts, num_new, strict=True)]
    engine = spec_engine(tiny_dir[0], token_budget=128, max_num_seqs=32, max_model_len=160, num_pages=11)
    assert run_all(engine, prompts, num_new) == expected
    assert engine.stats.preemptions >= 2 and engine.stats.spec_accepted_tokens > 0
    assert engine.stats.free_pages == engine.stats.total_pages


def collect(engine, requests):
    """Adds (prompt ids, SamplingParams) requests; returns each one's tokens, text, logprobs, reason."""
    ids = [engine.add_request(prompt_token_ids=p, sampling_params=params) for p, params in requests]
    out = {i: ([], "", [], None) for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            tokens, text, logprobs, _ = out[o.request_id]
            logprobs = logprobs + (o.new_logprobs or [])
            out[o.request_id] = (tokens + o.new_token_ids, text + o.new_text, logprobs, o)
    return [(t, x, lp, (o.finish_reason, o.generated_length)) for t, x, lp, o in (out[i] for i in ids)]


def test_sampled_outputs_stops_and_logprobs_are_the_same_with_and_without_speculation(tiny_dir):
    prompts, _ = repetitive_workload(6, seed=7)
    requests = []
    for i, p in enumerate(prompts):
        params = SamplingParams(max_new_tokens=24, seed=i, temperature=(0.0, 0.7, 1.0)[i % 3], logprobs=True)
        if i % 4 == 1:
            params = dataclasses.replace(params, top_k=20, top_p=0.9, top_logprobs=3)
        requests.append((p, params))
        if i % 3 == 0:  # n > 1: the same prompt again, another seed
            requests.append((p, dataclasses.replace(params, seed=100 + i, temperature=0.8)))
    plain_engine = spec_engine(tiny_dir[0], speculative="off")
    plain = collect(plain_engine, requests)
    # stop strings and stop tokens that occur in the plain outputs, so some requests stop mid-step
    stopped = []
    for (p, params), (tokens, text, _, _) in zip(requests, plain, strict=True):
        if len(text) > 12:
            params = dataclasses.replace(params, stop=(text[8:11],))
        elif len(tokens) > 5:
            params = dataclasses.replace(params, stop_token_ids=(tokens[5],))
        stopped.append((p, params))
    plain_stopped = collect(plain_engine, stopped)
    engine = spec_engine(tiny_dir[0])
    got = collect(engine, requests)
    got_stopped = collect(engine, stopped)
    for want, have in zip(plain + plain_stopped, got + got_stopped, strict=True):
        assert (have[0], have[1], have[3]) == (want[0], want[1], want[3])
        np.testing.assert_allclose(have[2], want[2], atol=2e-4)
    assert engine.stats.spec_accepted_tokens > 0
    assert any(reason == "stop" for *_, (reason, _) in got_stopped)


def test_a_request_can_opt_out(tiny_dir):
    prompts, _ = repetitive_workload(2)
    engine = spec_engine(tiny_dir[0], token_budget=16)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True, speculative=False)
    collect(engine, [(p, params) for p in prompts])
    assert engine.stats.spec_proposed_tokens == 0 and engine.stats.steps >= 16


def test_bad_speculative_settings_are_refused():
    with pytest.raises(ConfigError, match="speculative must be one of"):
        EngineConfig(speculative="eagle")
    with pytest.raises(ConfigError, match="num_speculative_tokens"):
        EngineConfig(speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(ConfigError, match="speculative_model"):
        EngineConfig(speculative="draft")
    with pytest.raises(ValueError, match="speculative must be a boolean"):
        SamplingParams(speculative="yes")


# -- verification on the device against a numpy oracle ------------------------------------------------


_verify = jax.jit(verify)


def verify_oracle(tokens, drafts, cu):
    emitted, last = [], []
    for s in range(len(cu) - 1):
        n = 0
        for row in range(cu[s], cu[s + 1]):
            n += 1
            if drafts[row] < 0 or tokens[row] != drafts[row]:
                break
        emitted.append(n)
        last.append(tokens[cu[s] + n - 1] if n else tokens[0])
    return emitted, last


def test_verify_without_drafts_emits_each_slots_one_row_and_ignores_padding_rows():
    s = SamplingArrays.greedy(4, 10)  # L = 10 > S = 4: rows 4..9 are padding
    tokens = np.arange(10, 20, dtype=np.int32)
    emitted, last = _verify(jnp.asarray(tokens), s)
    assert np.asarray(emitted).tolist() == [1, 1, 1, 1] and np.asarray(last).tolist() == [10, 11, 12, 13]


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_verify_matches_a_row_by_row_oracle(data):
    num_slots, rows = 6, 32  # one shape: one compilation
    used = data.draw(st.integers(1, num_slots))
    drafts_per_slot = data.draw(st.lists(st.integers(0, 4), min_size=used, max_size=used))
    s = SamplingArrays.greedy(num_slots, rows)
    cu = [0]
    drafts = []
    for k in drafts_per_slot:
        proposal = data.draw(st.lists(st.integers(0, 3), min_size=k, max_size=k))
        drafts += [*proposal, -1]
        cu.append(cu[-1] + k + 1)
    cu += [cu[-1]] * (num_slots - used)
    s.cu_logit_rows[:] = cu
    s.draft_token_ids[: len(drafts)] = drafts
    tokens = np.array(data.draw(st.lists(st.integers(0, 3), min_size=rows, max_size=rows)), np.int32)
    emitted, last = _verify(jnp.asarray(tokens), s)
    want_emitted, want_last = verify_oracle(tokens, s.draft_token_ids, cu)
    assert np.asarray(emitted)[:used].tolist() == want_emitted[:used]
    assert np.asarray(emitted)[used:].tolist() == [0] * (num_slots - used)
    assert np.asarray(last)[:used].tolist() == want_last[:used]


# -- the proposer and the adaptive k -------------------------------------------------------------------


def test_ngram_proposes_what_followed_the_latest_longest_match():
    proposer = NgramProposer(min_n=2, max_n=3)
    seq = Sequence("a", [5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 6, 7], max_tokens=10)
    # "6 7" ends the tokens; its latest earlier match is at 6 7 -> 1 2 ..., the 3-gram "2 6 7" has none
    assert proposer.propose_one(seq, 3) == [1, 2, 6]
    seq.append_token(1)  # "6 7 1" matches the earlier one: proposes what followed it
    assert proposer.propose_one(seq, 2) == [2, 6]
    assert proposer.propose_one(Sequence("b", [1, 2, 3, 4], 5), 4) == []
    proposer.forget("a")
    assert "a" not in proposer._index


class _Always:
    """A proposer that always proposes the same tokens (tests steer acceptance with it)."""

    free = True

    def __init__(self, token):
        self.token = token

    def propose(self, asks):
        return [[self.token] * k for _, k in asks]

    def forget(self, request_id):
        pass


def test_k_drops_to_zero_on_rejections_and_comes_back_on_shadow_hits():
    scheduler, seq = _one_decoding(speculative="ngram")
    speculator = Speculator(_Always(7), max_tokens=4, max_rows=64)

    def emit(step, drafts):  # first every draft is wrong, then the text turns to 7 7 7 ...
        if step < 15:
            return [9] if drafts else 9
        return [7] * (len(drafts) + 1) if drafts else 7

    ks = _speculate(scheduler, speculator, 40, emit)
    assert ks[0] > 0 and 0 in ks[:15] and ks[-1] == 4
    assert seq.num_computed_tokens == seq.num_tokens - 1  # rejected drafts were trimmed


def test_drafts_fill_the_bucket_the_step_pads_to_and_a_larger_one_only_when_it_pays():
    speculator = Speculator(_Always(7), max_tokens=4, max_rows=64, buckets=(16, 32, 64))
    values = [0.9] * 40
    assert speculator._worth_room(10, values, room=40) == 40  # no step times known: all the room
    speculator.step_seconds = {16: 0.1, 32: 0.1, 64: 0.5}
    # 16: 6 rows, 154 tok/s; 32: 22 rows, 298 tok/s; 64: 40 rows, 92 tok/s
    assert speculator._worth_room(10, values, room=40) == 22
    speculator.step_seconds[64] = 0.12  # now the largest bucket pays: (10 + 36) / 0.12 = 383 tok/s
    assert speculator._worth_room(10, values, room=40) == 40
    assert (
        speculator._worth_room(10, [0.1] * 40, room=40) == 22
    )  # unlikely drafts: only free rows (16, 32 cost alike)


def test_where_each_real_row_costs_drafts_inside_the_bucket_are_not_free():
    speculator = Speculator(_Always(7), max_tokens=4, max_rows=64, buckets=(16, 32, 64))
    speculator.step_seconds = {16: 0.1, 32: 0.2, 64: 0.4}
    values = [0.9] * 40
    assert speculator._worth_room(10, values, room=40) == 6  # a step costs its bucket: 6 rows are free
    speculator.row_seconds = 0.1 / 16  # a step costs its rows (here 16 rows: 0.1 s, 64: 0.4 s)
    assert speculator._worth_room(10, values, room=40) == 0  # a row costs a token's time, brings 0.9
    speculator.host_seconds = 0.05  # unless more tokens share the step's host time
    assert speculator._worth_room(10, values, room=40) == 40  # 46 / (0.3125 + 0.05) s = 127 tok/s
    # where rows cost, part of a bucket can be best: 3 likely drafts, then unlikely ones
    assert speculator._worth_room(10, [0.9] * 3 + [0.05] * 37, room=40) == 3  # 12.7 / 0.131 s = 97 tok/s


def test_drafts_must_also_pay_for_the_overlap_they_give_up():
    speculator = Speculator(_Always(7), max_tokens=4, max_rows=64, buckets=(16, 32, 64), overlap=True)
    speculator.step_seconds = {16: 0.1, 32: 0.1, 64: 0.5}
    speculator.host_seconds = 0.05  # hidden by overlap in a step without drafts, paid in one with them
    assert speculator._worth_room(10, [0.2] * 40, room=40) == 0
    assert speculator._worth_room(10, [0.3] * 40, room=40) == 22
    speculator.overlap = False  # nothing to give up: the free rows are worth it again
    assert speculator._worth_room(10, [0.2] * 40, room=40) == 22


def test_a_constrained_rows_mask_goes_to_its_logit_row_when_other_slots_verify_drafts(tiny_random_dir):  # noqa: F811
    """Structured outputs never get drafts, and their token mask is indexed by logit row, not slot:
    with drafts before it in the slab, the constrained row's mask lands on its own row."""
    from fastgen_jax.structured import StructuredOutputs

    engine = LLMEngine(
        load_checkpoint(tiny_random_dir),
        EngineConfig(token_budget=32, max_num_seqs=4, max_model_len=128, speculative="ngram"),
        progress=False,
    )
    free = SamplingParams(max_new_tokens=8)
    constrained = SamplingParams(max_new_tokens=8, structured_outputs=StructuredOutputs(regex="(ab)+"))
    engine.add_request(prompt_token_ids=[5, 6, 7], sampling_params=free, request_id="free")
    engine.add_request(prompt_token_ids=[8, 9], sampling_params=constrained, request_id="json")
    while (
        engine.scheduler.running
        and any(s.is_prefilling for s in engine.scheduler.running)
        or (engine.scheduler.waiting)
    ):
        engine.step()
    while engine._in_flight is not None:  # read every step back: nothing pending
        engine.step()
    out = engine.scheduler.schedule()
    slots = {e.seq.request_id: i for i, e in enumerate(out.scheduled)}
    assert engine.scheduler.add_drafts(out, slots["free"], [11, 12, 13]) == 3
    plan = engine.planner.build(out)
    mask = engine._token_bitmask(out, plan)
    row = int(plan.sampling.cu_logit_rows[slots["json"]])
    assert row != slots["json"] or slots["json"] == 0
    want = engine.guided.bitmask([(0, "json")], 1)[0]
    assert (mask[row] == want).all() and not (want == -1).all()
    others = [r for r in range(plan.num_logit_rows) if r != row]
    assert (mask[others] == -1).all()
    engine.scheduler.abandon(out)


@pytest.mark.slow  # 20 s (CI time); sampled rows get drafts in the stops-and-logprobs test above too
def test_a_sampled_request_accepts_drafts(tiny_dir):
    """Not only greedy rows: a temperature > 0 row verifies drafts (against what it would have drawn)."""
    prompts, _ = repetitive_workload(3, seed=2)
    engine = spec_engine(tiny_dir[0], speculative="off")
    params = SamplingParams(max_new_tokens=30, temperature=0.05, seed=5, ignore_eos=True)  # sampled, sharp
    plain = collect(engine, [(p, params) for p in prompts])
    engine = spec_engine(tiny_dir[0])
    assert collect(engine, [(p, params) for p in prompts]) == plain
    assert engine.stats.spec_accepted_tokens > 0


def _speculate(scheduler, speculator, steps, emit):
    """Runs `steps` steps of the scheduler's one sequence with the speculator's drafts; emit(step,
    drafts) is what the step gives it (a list when it verified drafts). Returns each step's k."""
    ks = []
    for step in range(steps):
        out = scheduler.schedule()
        speculator.extend(scheduler, out)
        drafts = out.scheduled[0].draft_token_ids
        ks.append(len(drafts))
        emitted = emit(step, drafts)
        scheduler.postprocess(out, [emitted])
        speculator.observe(out, [emitted])
    return ks


def _one_decoding(max_tokens=300, **config):
    """A scheduler with one sequence that has just sampled its first token (9)."""
    from fastgen_jax.engine import Scheduler

    config = EngineConfig(
        **{"token_budget": 32, "max_num_seqs": 4, "num_pages": 40, "max_model_len": 512, **config}
    )
    scheduler = Scheduler(config)
    seq = Sequence("a", [1, 2, 3], max_tokens=max_tokens)
    scheduler.add(seq)
    scheduler.postprocess(scheduler.schedule(), [9])
    return scheduler, seq


def test_a_failed_step_with_drafts_rolls_back_and_its_sequence_sits_out_the_step_beside_it():
    scheduler, seq = _one_decoding(page_size=4, max_model_len=128, max_tokens=100)
    out = scheduler.schedule()
    assert scheduler.add_drafts(out, 0, [5, 6, 7]) == 3
    assert (seq.num_computed_tokens, seq.num_draft_tokens, len(seq.page_table)) == (7, 3, 2)
    beside = scheduler.schedule()  # composed while the verification is in flight: a sits out
    assert beside.is_empty
    scheduler.abandon(out)
    assert (seq.num_computed_tokens, seq.num_draft_tokens, seq.num_pending_tokens) == (3, 0, 0)
    again = scheduler.schedule()
    assert [(e.start_position, e.num_new_tokens) for e in again.scheduled] == [(3, 1)]


def test_pages_taken_for_rejected_drafts_go_back_at_once():
    scheduler, seq = _one_decoding(page_size=4, max_model_len=128, max_tokens=100)
    free = scheduler.allocator.num_free
    out = scheduler.schedule()
    scheduler.add_drafts(out, 0, [5, 6, 7, 8, 9, 10])  # positions 3..9: pages 0..2
    assert len(seq.page_table) == 3 and scheduler.allocator.num_free == free - 2
    scheduler.postprocess(out, [[5, 11]])  # one accepted, then 11: 4 tokens computed, 6 in all
    assert seq.all_token_ids == [1, 2, 3, 9, 5, 11] and seq.num_computed_tokens == 5
    assert len(seq.page_table) == 2 and scheduler.allocator.num_free == free - 1
    assert scheduler.page_tables.lengths[seq.page_table_row] == 2


def test_a_step_held_for_a_proposal_that_does_not_come_starts_a_cooldown():
    class Never(_Always):
        def propose(self, asks):
            return [[] for _ in asks]

    scheduler, seq = _one_decoding()
    speculator = Speculator(Never(7), max_tokens=4, max_rows=64)
    speculator._ready = True  # as if the last look-ahead found a proposal
    assert speculator.hold_next_step()
    out = scheduler.schedule()
    assert speculator.extend(scheduler, out) == 0
    assert speculator._cooldown == 8
    speculator._ready = True
    assert not speculator.hold_next_step()  # cooling down: overlap goes on


def test_a_costly_proposer_re_probes_a_sequence_it_gave_up_on():
    class Costly(_Always):
        free = False

    scheduler, seq = _one_decoding()
    speculator = Speculator(Costly(7), max_tokens=4, max_rows=64)
    ks = _speculate(scheduler, speculator, 70, lambda _, drafts: [9] if drafts else 9)  # every draft wrong
    assert ks[0] > 0 and ks[10:].count(1) >= 1 and sum(ks[10:]) <= 3  # off, probed now and then
