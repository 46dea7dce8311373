"""Scheduler: Dynamic SplitFuse and prefill-first steps, admission, preemption, finish and abort."""

import collections
import dataclasses
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgen_jax.config import SCHEDULING_POLICIES, ConfigError, EngineConfig
from fastgen_jax.engine import Scheduler, Sequence, SequenceStatus, StepPlanner, pages_for
from fastgen_jax.engine.limits import RequestError
from fastgen_jax.engine.speculative import Speculator

TOKEN = 7  # every "sampled" token in these tests


def make_scheduler(
    policy="splitfuse", budget=8, max_num_seqs=4, page_size=4, num_pages=33, max_model_len=64, caching=True
):
    config = EngineConfig(
        enable_prefix_caching=caching,
        token_budget=budget,
        max_num_seqs=max_num_seqs,
        page_size=page_size,
        num_pages=num_pages,
        max_model_len=max_model_len,
        policy=policy,
    )
    return Scheduler(config)


def add(scheduler, request_id, prompt_len, max_tokens=8):
    """A request whose prompt shares no prefix with any other (the prefix cache stays out of it)."""
    first = 1000 * (1 + sum(map(ord, request_id)))
    seq = Sequence(request_id, range(first, first + prompt_len), max_tokens)
    scheduler.add(seq)
    return seq


def step(scheduler):
    """Runs one step with every sample = TOKEN; returns (id, num_new, start, needs_sample) rows."""
    output = scheduler.schedule()
    scheduler.postprocess(output, {e.seq.request_id: TOKEN for e in output.scheduled})
    for e in output.scheduled:  # as the engine notes the tokens it hands out
        if e.needs_sample:
            e.seq.timing.tokens(1, scheduler.clock())
    return [(e.seq.request_id, e.num_new_tokens, e.start_position, e.needs_sample) for e in output.scheduled]


# -- splitfuse ----------------------------------------------------------------------------------


def test_a_long_prompt_is_split_by_the_budget_and_only_its_last_chunk_samples():
    s = make_scheduler(budget=8)
    seq = add(s, "a", 20)
    assert step(s) == [("a", 8, 0, False)]
    assert step(s) == [("a", 8, 8, False)]
    assert step(s) == [("a", 4, 16, True)]
    assert seq.output_token_ids == [TOKEN]
    assert step(s) == [("a", 1, 20, True)]
    assert seq.num_computed_tokens == 21 and seq.all_token_ids[-2:] == [TOKEN, TOKEN]


def test_a_step_budget_below_the_configured_one_cuts_prompts_shorter_but_never_a_decode():
    s = make_scheduler(budget=8, max_num_seqs=4)
    for rid in "abc":
        add(s, rid, 1)
    add(s, "d", 20)
    assert step(s) == [("a", 1, 0, True), ("b", 1, 0, True), ("c", 1, 0, True), ("d", 5, 0, False)]
    output = s.schedule(token_budget=2)  # fewer than the 4 running: all of them still get a token
    assert [(e.seq.request_id, e.num_new_tokens) for e in output.scheduled] == [
        ("a", 1),
        ("b", 1),
        ("c", 1),
        ("d", 1),
    ]
    s.postprocess(output, {e.seq.request_id: TOKEN for e in output.scheduled})
    output = s.schedule(token_budget=64)  # capped at the configured 8
    assert output.num_tokens == 8


def test_decodes_come_first_then_the_cut_prompt_then_waiting_prompts_fill_the_budget():
    s = make_scheduler(budget=8)
    add(s, "a", 3)
    add(s, "b", 9)
    assert step(s) == [("a", 3, 0, True), ("b", 5, 0, False)]
    add(s, "c", 6)
    assert step(s) == [("a", 1, 3, True), ("b", 4, 5, True), ("c", 3, 0, False)]
    assert step(s) == [("a", 1, 4, True), ("b", 1, 9, True), ("c", 3, 3, True)]


def test_the_sequence_limit_caps_a_step():
    s = make_scheduler(budget=16, max_num_seqs=2)
    for request_id in "abc":
        add(s, request_id, 2)
    assert step(s) == [("a", 2, 0, True), ("b", 2, 0, True)]
    assert step(s) == [("a", 1, 2, True), ("b", 1, 2, True)]
    assert s.num_waiting == 1


def test_running_sequences_are_capped_by_the_budget_so_every_decode_fits():
    s = make_scheduler(budget=2, max_num_seqs=4)
    for request_id in "abc":
        add(s, request_id, 1)
    assert step(s) == [("a", 1, 0, True), ("b", 1, 0, True)]
    assert step(s) == [("a", 1, 1, True), ("b", 1, 1, True)]
    assert (s.num_running, s.num_waiting) == (2, 1)


def test_admission_waits_until_the_whole_prompt_and_one_more_token_fit_in_free_pages():
    s = make_scheduler(budget=64, page_size=4, num_pages=9, max_model_len=32)  # 8 usable pages
    add(s, "a", 12)  # 12 + 1 tokens -> 4 pages
    add(s, "b", 16)  # 16 + 1 tokens -> 5 pages: waits for "a"
    add(s, "c", 1)  # behind "b": first come, first served
    assert step(s) == [("a", 12, 0, True)]
    assert s.num_free_pages == 4 and s.num_waiting == 2
    s.finish("a")
    assert step(s) == [("b", 16, 0, True), ("c", 1, 0, True)]


def test_a_decode_that_needs_a_page_preempts_the_newest_sequence():
    s = make_scheduler(budget=16, page_size=4, num_pages=5, max_model_len=16)  # 4 usable pages
    a = add(s, "a", 3)  # pages for 4 tokens: 1 page
    b = add(s, "b", 7)  # pages for 8 tokens: 2 pages
    assert step(s) == [("a", 3, 0, True), ("b", 7, 0, True)]
    assert step(s) == [("a", 1, 3, True), ("b", 1, 7, True)]  # a fills its page, b its second
    output = s.schedule()  # a needs a 2nd page (1 free); b a 3rd: b has to go
    assert [(e.seq.request_id, e.start_position) for e in output.scheduled] == [("a", 4)]
    assert output.preempted == [b] and s.num_preemptions == 1
    assert b.status is SequenceStatus.WAITING and b.page_table == []
    assert b.num_computed_tokens == 0 and b.num_prefill_tokens == 9
    assert list(s.waiting) == [b] and a.status is SequenceStatus.RUNNING


@pytest.mark.parametrize("caching", [False, True])
def test_a_preempted_sequence_recomputes_its_prompt_and_generated_tokens_then_decodes(caching):
    s = make_scheduler(budget=16, page_size=4, num_pages=5, max_model_len=16, caching=caching)
    add(s, "a", 3)
    b = add(s, "b", 7)
    step(s)
    step(s)
    step(s)  # b preempted with 9 tokens
    s.finish("a")
    # With the prefix cache, b's two full pages (8 tokens) were cached when it was preempted, and
    # nothing evicted them: it recomputes only its last token.
    assert step(s) == ([("b", 1, 8, True)] if caching else [("b", 9, 0, True)])
    assert b.all_token_ids[7:] == [TOKEN, TOKEN, TOKEN]
    assert step(s) == [("b", 1, 9, True)]


def test_a_preempted_sequence_returns_to_the_front_of_the_queue_in_arrival_order():
    s = make_scheduler(budget=16, max_num_seqs=2, page_size=4, num_pages=5, max_model_len=16)
    add(s, "a", 3)
    b = add(s, "b", 7)
    c = add(s, "c", 2)
    step(s)
    step(s)
    output = s.schedule()
    assert output.preempted == [b]
    assert list(s.waiting) == [b, c]


def test_a_sequence_alone_in_the_pool_always_finds_a_page():
    s = make_scheduler(budget=16, page_size=4, num_pages=5, max_model_len=16)
    seq = add(s, "a", 8, max_tokens=8)
    for _ in range(8):
        step(s)
    assert seq.num_output_tokens == 8 and s.num_preemptions == 0 and s.num_free_pages == 0


# -- prefill_first --------------------------------------------------------------------------------


def test_prefill_first_runs_whole_prompts_while_decodes_wait():
    s = make_scheduler(policy="prefill_first", budget=8)
    add(s, "a", 3)
    assert step(s) == [("a", 3, 0, True)]
    add(s, "b", 4)
    add(s, "c", 5)  # does not fit beside "b" whole: waits for the next step
    assert step(s) == [("b", 4, 0, True)]
    assert step(s) == [("c", 5, 0, True)]
    assert step(s) == [("a", 1, 3, True), ("b", 1, 4, True), ("c", 1, 5, True)]


def test_prefill_first_splits_a_prompt_longer_than_the_budget_with_no_decode_until_it_is_done():
    s = make_scheduler(policy="prefill_first", budget=8)
    add(s, "a", 2)
    step(s)
    add(s, "b", 12)
    assert step(s) == [("b", 8, 0, False)]
    assert step(s) == [("b", 4, 8, True)]
    assert step(s) == [("a", 1, 2, True), ("b", 1, 12, True)]


# -- finish, abort, postprocess -------------------------------------------------------------------


def test_finish_frees_the_pages_at_once():
    s = make_scheduler()
    seq = add(s, "a", 5)
    step(s)
    s.finish(seq, SequenceStatus.FINISHED_LENGTH)
    assert seq.status is SequenceStatus.FINISHED_LENGTH and seq.page_table == []
    assert s.num_free_pages == 32 and not s.has_unfinished()
    s.finish(seq)  # a second finish is a no-op
    assert seq.status is SequenceStatus.FINISHED_LENGTH


def test_abort_drops_waiting_and_running_requests():
    s = make_scheduler(max_num_seqs=1)
    running = add(s, "a", 5)
    waiting = add(s, "b", 5)
    step(s)
    assert s.abort("b") is waiting and s.abort("a") is running
    assert running.status is waiting.status is SequenceStatus.FINISHED_ABORTED
    assert (s.num_running, s.num_waiting, s.num_free_pages) == (0, 0, 32)
    assert s.abort("a") is None and s.abort("unknown") is None


def test_a_request_aborted_while_its_step_runs_is_skipped_by_postprocess():
    s = make_scheduler()
    seq = add(s, "a", 5)
    output = s.schedule()
    s.abort("a")
    s.postprocess(output, [TOKEN])
    assert seq.output_token_ids == [] and seq.page_table == [] and s.allocator.num_cached == 0


def test_postprocess_takes_tokens_aligned_with_the_slots():
    s = make_scheduler(budget=8)
    a = add(s, "a", 2)
    b = add(s, "b", 10)
    output = s.schedule()
    s.postprocess(output, [41, 42, 43])  # slot 1 is a cut prompt: its token is ignored
    assert a.output_token_ids == [41] and b.output_token_ids == []
    assert b.num_computed_tokens == 6


def test_at_most_two_steps_are_in_flight_and_they_are_postprocessed_oldest_first():
    s = make_scheduler()
    add(s, "a", 5)
    first, second = s.schedule(), s.schedule()  # overlap: the second is scheduled while the first runs
    with pytest.raises(RuntimeError, match="2 steps in flight"):
        s.schedule()
    with pytest.raises(RuntimeError, match="not the oldest step in flight"):
        s.postprocess(second, [TOKEN])
    s.postprocess(first, [TOKEN])
    s.postprocess(second, [TOKEN + 1])
    with pytest.raises(RuntimeError, match="not the oldest step in flight"):
        s.postprocess(second, [TOKEN])


def test_the_step_scheduled_beside_one_in_flight_decodes_the_token_that_step_samples():
    s = make_scheduler()
    a, b = add(s, "a", 5), add(s, "b", 3)
    first = s.schedule()  # both prompts; b in slot 1
    assert (a.num_computed_tokens, a.num_pending_tokens) == (5, 1)  # counted at once; token pending
    second = s.schedule()
    rows = [(e.seq.request_id, e.start_position, e.previous_slot, e.output_index) for e in second.scheduled]
    assert rows == [("a", 5, 0, 1), ("b", 3, 1, 1)]  # inputs: the first step's slots 0 and 1
    s.postprocess(first, [41, 42])
    s.postprocess(second, [43, 44])
    assert a.output_token_ids == [41, 43] and b.output_token_ids == [42, 44]
    assert (a.num_computed_tokens, a.num_pending_tokens) == (6, 0)


def test_a_sequence_whose_last_token_is_in_flight_is_not_scheduled_again():
    s = make_scheduler()
    add(s, "a", 5, max_tokens=1)
    s.schedule()
    assert s.schedule().is_empty  # its one token is being sampled: the engine will finish it


def test_a_sequence_needing_its_last_token_on_the_host_sits_out_the_step_beside_it():
    """A grammar-constrained sequence (needs_host_sync) is left out of the step composed while its
    token is in flight, and decodes again once that token is read back."""
    s = make_scheduler()
    a, b = add(s, "a", 5), add(s, "b", 3)
    b.needs_host_sync = True
    first = s.schedule()
    second = s.schedule()
    assert [e.seq.request_id for e in second.scheduled] == ["a"]
    s.postprocess(first, [41, 42])
    third = s.schedule()  # b's token is on the host now; a's of the second step is still in flight
    assert [(e.seq.request_id, e.previous_slot) for e in third.scheduled] == [("a", 0), ("b", -1)]
    s.postprocess(second, [43])
    s.postprocess(third, [44, 45])
    assert a.output_token_ids == [41, 43, 44] and b.output_token_ids == [42, 45]


def test_abandoning_both_steps_in_flight_rolls_every_sequence_back():
    s = make_scheduler()
    a = add(s, "a", 5)
    first = s.schedule()
    second = s.schedule()
    s.abandon(second)
    s.abandon(first)
    assert (a.num_computed_tokens, a.num_pending_tokens, a.output_token_ids) == (0, 0, [])
    assert step(s) == [("a", 5, 0, True)]  # the prompt runs again


def test_a_sequence_preempted_while_its_step_runs_keeps_that_token_and_recomputes_it():
    s = make_scheduler(budget=16, page_size=4, num_pages=4, max_model_len=8)  # 3 usable pages
    a, b = add(s, "a", 3, max_tokens=5), add(s, "b", 6, max_tokens=2)  # a: 1 page, b: 2
    first = s.schedule()
    second = s.schedule()  # both decode, inputs pending
    s.postprocess(first, [41, 42])
    third = s.schedule()  # a's next token needs a page; none is free: b (newest) goes, mid-flight
    assert [e.seq.request_id for e in third.scheduled] == ["a"] and third.preempted == [b]
    s.postprocess(second, [43, 44])  # b's token of the second step is kept and joins its recompute
    assert b.output_token_ids == [42, 44] and b.status is SequenceStatus.WAITING
    assert (b.num_prefill_tokens, b.num_computed_tokens, b.num_pending_tokens) == (8, 0, 0)
    s.postprocess(third, [45])
    assert a.output_token_ids == [41, 43, 45]


def test_an_empty_step_means_nothing_to_do():
    s = make_scheduler()
    output = s.schedule()
    assert output.is_empty and output.num_tokens == 0
    s.postprocess(output, [])
    assert s.schedule().is_empty


def test_decoding_past_max_tokens_is_an_engine_bug():
    s = make_scheduler()
    add(s, "a", 2, max_tokens=1)
    step(s)
    with pytest.raises(RuntimeError, match="must finish"):
        s.schedule()


# -- validation -----------------------------------------------------------------------------------


def test_add_rejects_a_request_longer_than_max_model_len():
    s = make_scheduler(max_model_len=16)
    with pytest.raises(
        RequestError, match="prompt \\(10 tokens\\) \\+ max_tokens \\(7\\) exceeds the context of 16"
    ):
        add(s, "a", 10, max_tokens=7)
    with pytest.raises(RequestError, match="prompt is empty"):
        add(s, "b", 0)


def test_add_rejects_a_duplicate_request_id():
    s = make_scheduler()
    add(s, "a", 3)
    with pytest.raises(ValueError, match="already scheduled"):
        add(s, "a", 3)


def test_a_sequence_needs_max_tokens():  # an empty prompt: the add test above (`check_length`)
    with pytest.raises(ValueError, match="max_tokens >= 1"):
        Sequence("a", [1], 0)


def test_the_pool_must_hold_one_sequence_of_max_model_len():
    with pytest.raises(ConfigError, match="num_pages=4 .* max_model_len=16 at page_size=4"):
        make_scheduler(page_size=4, num_pages=4, max_model_len=16)
    make_scheduler(page_size=4, num_pages=5, max_model_len=16)


def test_num_pages_and_max_model_len_must_be_known():
    with pytest.raises(ConfigError, match="num_pages is unset"):
        Scheduler(EngineConfig(max_model_len=64))
    scheduler = Scheduler(EngineConfig(), num_pages=8, max_model_len=64)
    assert (scheduler.num_pages, scheduler.max_model_len) == (8, 64)


# -- properties: random workloads driven to completion --------------------------------------------

EOS = 0  # sampled tokens are uniform in [0, VOCAB): one in VOCAB stops its sequence
VOCAB = 30
MAX_STEPS = 20_000


@dataclasses.dataclass(frozen=True)
class Request:
    request_id: str
    arrival_step: int
    prompt_len: int
    max_tokens: int
    abort_step: int | None  # abort at this step, if still unfinished
    abort_in_flight: bool  # ... between schedule() and postprocess()
    family: int = 0
    shared: int = 0
    cache_salt: str | None = None


@dataclasses.dataclass(frozen=True)
class Workload:
    config: EngineConfig
    requests: list[Request]
    seed: int
    speculative_tokens: int = 0  # > 0: a Speculator adds up to this many random draft tokens per decode
    speculative_rows: int = 0


@st.composite
def workloads(draw, policy, max_spare_pages=4, max_requests=8):
    page_size = draw(st.sampled_from([1, 2, 4, 8]))
    max_model_len = draw(st.integers(2, 40))
    num_pages = pages_for(max_model_len, page_size) + 1 + draw(st.integers(0, max_spare_pages))
    config = EngineConfig(
        token_budget=draw(st.integers(1, 24)),
        max_num_seqs=draw(st.integers(1, 6)),
        page_size=page_size,
        num_pages=num_pages,
        max_model_len=max_model_len,
        policy=policy,
        enable_prefix_caching=draw(st.sampled_from([True, True, False])),
    )
    requests = [draw(requests_of(str(i), max_model_len)) for i in range(draw(st.integers(1, max_requests)))]
    return Workload(config, requests, draw(st.integers(0, 2**32)))


@st.composite
def requests_of(draw, request_id, max_model_len):
    # Short prompts and long generations half the time: that is what fills a pool by decoding.
    prompt_len = draw(st.integers(1, max_model_len - 1) | st.integers(1, max(1, max_model_len // 4)))
    longest = max_model_len - prompt_len
    arrival = draw(st.integers(0, 12))
    return Request(
        request_id,
        arrival,
        prompt_len,
        max_tokens=draw(st.integers(1, longest) | st.just(longest)),
        abort_step=draw(st.none() | st.none() | st.integers(arrival, arrival + 20)),
        abort_in_flight=draw(st.booleans()),
        # Prompts of one family share their first `shared` tokens, so the prefix cache has hits.
        family=draw(st.integers(0, 2)),
        shared=draw(st.integers(0, prompt_len)),
        cache_salt=draw(st.sampled_from([None, None, "tenant"])),
    )


def prompt_of(r):
    """Tokens 1-9 in the family's pattern for the shared part, then 10-14 depending on the request."""
    return [
        1 + (i * 7 + r.family) % 9 if i < r.shared else 10 + (i + int(r.request_id)) % 5
        for i in range(r.prompt_len)
    ]


class Simulation:
    """Plays the engine around a Scheduler and checks the scheduler's promises at every step."""

    def __init__(self, workload: Workload):
        self.config = config = workload.config
        self.scheduler = Scheduler(config)
        self.builder = StepPlanner.for_scheduler(self.scheduler)
        self.requests = workload.requests
        self.rng = random.Random(workload.seed)
        self.seqs: dict[str, Sequence] = {}
        self.next_position: dict[str, int] = {}  # where the next scheduled chunk must start
        self.tokens: dict[str, list[int]] = {}  # what each sequence must hold
        # What the device's KV cache holds: (page, offset) -> (salt, every token up to that position),
        # which is what the KV of a token depends on. Written as the steps run.
        self.kv: dict[tuple[int, int], tuple] = {}
        self.cached_tokens = 0  # tokens admissions took from the prefix cache
        self.speculator = None
        if workload.speculative_tokens:
            proposer = _RandomProposer(random.Random(workload.seed + 1))
            self.speculator = Speculator(proposer, workload.speculative_tokens, workload.speculative_rows)
        self.drafts = 0  # draft tokens added in all

    def run(self) -> int:
        """Steps until every request is done; returns the number of steps."""
        for step in range(MAX_STEPS):
            self.add_arrivals(step)
            self.abort_due(step, in_flight=False)
            if step > max(r.arrival_step for r in self.requests) and not self.scheduler.has_unfinished():
                self.check_all_done()
                return step
            self.step(step)
        raise AssertionError(f"no end after {MAX_STEPS} steps: {self.scheduler.running}")

    def add_arrivals(self, step):
        for r in self.requests:
            if r.arrival_step == step:
                seq = Sequence(r.request_id, prompt_of(r), r.max_tokens, cache_salt=r.cache_salt)
                self.scheduler.add(seq)
                self.seqs[r.request_id] = seq
                self.next_position[r.request_id] = 0
                self.tokens[r.request_id] = list(seq.prompt_token_ids)

    def abort_due(self, step, in_flight):
        for r in self.requests:
            if r.abort_step == step and r.abort_in_flight == in_flight:
                self.scheduler.abort(r.request_id)

    def step(self, step):
        s = self.scheduler
        decoding = {seq.request_id for seq in s.running if not seq.is_prefilling}
        had_work = s.has_unfinished()
        output = s.schedule()
        assert output.is_empty == (not had_work), "a step with work to do scheduled nothing"
        if self.speculator is not None and not output.is_empty:
            budget_left = s.budget_left(output)
            added = self.speculator.extend(s, output)
            assert added <= min(budget_left, self.speculator.max_rows), "drafts took more than the room left"
            self.drafts += added
        self.check_limits(output)
        self.check_positions(output)
        self.check_pages(output)
        self.check_kv(output)
        self.check_queues()
        self.check_policy(output, decoding)
        if not output.is_empty:
            self.check_plan(output)
        self.abort_due(step, in_flight=True)
        sampled = [self.sample(e) for e in output.scheduled]
        s.postprocess(output, sampled)
        if self.speculator is not None:
            self.speculator.observe(output, sampled)
        self.record_and_finish(output, sampled)

    def sample(self, entry):
        """A random token, or for a slot with draft tokens what verification would emit: a random
        number of them accepted, then a token that differs from the next draft (or a bonus token)."""
        if not entry.draft_token_ids:
            return self.rng.randrange(VOCAB)
        drafts = entry.draft_token_ids
        accepted = self.rng.randint(0, len(drafts))
        last = self.rng.randrange(VOCAB)
        if accepted < len(drafts) and last == drafts[accepted]:
            last = (last + 1) % VOCAB
        return [*drafts[:accepted], last]

    def check_limits(self, output):
        assert output.num_tokens == sum(e.num_new_tokens for e in output.scheduled)
        assert output.num_tokens <= self.config.token_budget
        assert output.num_seqs <= self.config.max_num_seqs
        assert self.scheduler.num_running <= min(self.config.max_num_seqs, self.config.token_budget)

    def check_positions(self, output):
        preempted = {seq.request_id for seq in output.preempted}
        for request_id in preempted:
            self.next_position[request_id] = 0
        ids = [e.seq.request_id for e in output.scheduled]
        assert len(set(ids)) == len(ids) and not preempted & set(ids)
        for e in output.scheduled:
            end = e.start_position + e.num_new_tokens
            assert e.num_new_tokens >= 1
            expected = self.next_position[e.seq.request_id]
            if e.start_position != expected:  # admitted with a prefix-cache hit of whole pages
                assert self.config.enable_prefix_caching and expected == 0
                assert e.start_position % self.config.page_size == 0
                assert e.start_position < e.seq.num_prefill_tokens, "the last token is always computed"
                self.cached_tokens += e.start_position
            # schedule() counts a step's tokens as computed at once (so the next step can be scheduled
            # while this one runs); abandon() would roll them back
            assert end == e.seq.num_computed_tokens
            drafts = len(e.draft_token_ids)
            assert end - drafts <= e.seq.num_tokens
            assert e.needs_sample == (end - drafts == e.seq.num_tokens)
            assert not drafts or e.num_new_tokens == drafts + 1, "drafts only follow a decode's input token"
            self.next_position[e.seq.request_id] = end - drafts  # + the accepted ones, once known

    def check_kv(self, output):
        """Every token a step attends to has the KV of exactly its sequence's tokens (and salt), and a
        step writes only pages its sequence owns alone."""
        s, page_size = self.scheduler, self.config.page_size
        for e in output.scheduled:
            seq, tokens = e.seq, self.tokens[e.seq.request_id]
            for pos in range(e.start_position):
                slot = (seq.page_table[pos // page_size], pos % page_size)
                assert self.kv.get(slot) == (seq.cache_salt, tuple(tokens[: pos + 1])), "wrong KV read"
        for e in output.scheduled:  # then the step writes its new tokens (draft tokens' too)
            seq, tokens = e.seq, self.tokens[e.seq.request_id] + list(e.draft_token_ids)
            for pos in range(e.start_position, e.start_position + e.num_new_tokens):
                page = seq.page_table[pos // page_size]
                assert s.allocator.refcount(page) == 1, "a shared page was written"
                self.kv[(page, pos % page_size)] = (seq.cache_salt, tuple(tokens[: pos + 1]))

    def check_pages(self, output):
        s, page_size = self.scheduler, self.config.page_size
        allocator = s.allocator
        owners = collections.Counter(page for seq in s.running for page in seq.page_table)
        assert 0 not in owners and all(len(set(seq.page_table)) == len(seq.page_table) for seq in s.running)
        assert len(owners) + s.num_free_pages == self.config.num_pages - 1
        for page, n in owners.items():  # a page in use is owned exactly by the sequences holding it
            assert allocator.refcount(page) == n
            salts = {seq.cache_salt for seq in s.running if page in seq.page_table}
            assert len(salts) == 1, "different cache salts share a page"
        free, cached = set(allocator._free), set(allocator._evictable)
        in_use = {p for p in range(1, self.config.num_pages) if allocator.refcount(p) > 0}
        assert not (free & cached) and not (free & in_use) and not (cached & in_use), "one state per page"
        assert free | cached | in_use == set(range(1, self.config.num_pages))
        assert all(allocator.key(p) is not None for p in cached) and all(
            allocator.key(p) is None for p in free
        )
        assert all(seq.page_table == [] and seq.page_table_row == -1 for seq in s.waiting)
        rows = [seq.page_table_row for seq in s.running]
        assert len(set(rows)) == len(rows) and min(rows, default=0) >= 0
        tables = s.page_tables
        for seq in s.running:  # the matrix the slab builder reads agrees with the lists
            row = seq.page_table_row
            assert tables.array[row, : tables.lengths[row]].tolist() == seq.page_table
        for seq in s.running:
            if seq.is_prefilling:  # the whole prompt's pages were taken at admission
                tokens = min(seq.num_prefill_tokens + 1, self.config.max_model_len)
                assert len(seq.page_table) >= pages_for(tokens, page_size)
        for e in output.scheduled:
            assert len(e.seq.page_table) * page_size >= e.start_position + e.num_new_tokens

    def check_queues(self):
        waiting = [seq.arrival_index for seq in self.scheduler.waiting]
        running = [seq.arrival_index for seq in self.scheduler.running]
        assert waiting == sorted(waiting) and running == sorted(running), "queues keep arrival order"

    def check_policy(self, output, decoding):
        is_decode = [e.seq.request_id in decoding for e in output.scheduled]
        assert is_decode == sorted(is_decode, reverse=True), "decodes come first in the slab"
        if self.config.policy == "splitfuse":
            served = {e.seq.request_id for e in output.scheduled}
            served |= {seq.request_id for seq in output.preempted}
            assert decoding <= served, "a decoding sequence was starved"
            if self.has_room_left(output):  # then every started prompt got all it needs
                prefilling = {seq.request_id for seq in self.scheduler.running if seq.is_prefilling}
                assert prefilling <= served and all(e.needs_sample for e in output.scheduled)
        elif self.config.policy == "prefill_first":
            assert all(is_decode) or not any(is_decode), "prefill_first mixed prompts and decodes"
            for e in output.scheduled:
                if not e.needs_sample:  # a cut prompt: only when it alone exceeds the budget
                    assert output.num_seqs == 1
                    assert e.num_new_tokens == self.config.token_budget

    def has_room_left(self, output):
        return output.num_tokens < self.config.token_budget and output.num_seqs < self.config.max_num_seqs

    def check_plan(self, output):
        plan = self.builder.build(output)
        md, page_size, n = plan.attention, self.config.page_size, output.num_seqs
        assert plan.bucket == self.builder.bucket_for(output.num_tokens)
        assert md.cu_q_lens.shape == (min(self.config.max_num_seqs, plan.bucket) + 1,)
        assert plan.page_table_width in self.builder.page_table_widths
        assert md.num_seqs.tolist() == [n] and md.cu_q_lens[n] == output.num_tokens
        logit_rows = plan.sampling.cu_logit_rows
        assert logit_rows[n] <= plan.num_logit_rows <= plan.bucket
        for i, e in enumerate(output.scheduled):
            rows = slice(md.cu_q_lens[i], md.cu_q_lens[i + 1])
            pos = np.arange(e.start_position, e.start_position + e.num_new_tokens)
            pages = np.array(e.seq.page_table)[pos // page_size]
            tokens = self.tokens[e.seq.request_id] + list(e.draft_token_ids)
            assert plan.token_ids[rows].tolist() == tokens[pos[0] : pos[-1] + 1]
            assert md.positions[rows].tolist() == pos.tolist()
            assert md.slot_mapping[rows].tolist() == (pages * page_size + pos % page_size).tolist()
            # a slot's logit rows: its last 1 + drafts slab rows, contiguous and in order
            k = len(e.draft_token_ids)
            mine = slice(logit_rows[i], logit_rows[i + 1])
            assert mine.stop - mine.start == k + 1
            assert md.logits_indices[mine].tolist() == list(range(rows.stop - k - 1, rows.stop))
            assert plan.sampling.draft_token_ids[mine].tolist() == [*e.draft_token_ids, -1]
            assert md.kv_lens[i] == pos[-1] + 1
            first = e.seq.num_output_tokens
            assert plan.sampling.step[mine].tolist() == list(range(first, first + k + 1))
        padding = slice(output.num_tokens, None)
        assert (md.slot_mapping[padding] == self.config.num_pages * page_size).all()
        assert not md.kv_lens[n:].any() and (md.cu_q_lens[n:] == md.cu_q_lens[n]).all()

    def record_and_finish(self, output, sampled):
        for e, token in zip(output.scheduled, sampled, strict=True):
            seq = e.seq
            if seq.is_finished:
                continue
            emitted = token if e.draft_token_ids else [token]
            if e.needs_sample:
                self.tokens[seq.request_id] += emitted
                self.next_position[seq.request_id] += len(emitted) - 1  # the accepted drafts' KV stays
                seq.timing.tokens(len(emitted), self.scheduler.clock())  # as the engine notes them
            assert seq.all_token_ids == self.tokens[seq.request_id]
            assert seq.num_output_tokens <= seq.max_tokens, "drafts ran past max_tokens"
            if e.needs_sample and EOS in emitted:
                self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
            elif seq.num_output_tokens == seq.max_tokens:
                self.scheduler.finish(seq, SequenceStatus.FINISHED_LENGTH)

    def check_all_done(self):
        assert self.scheduler.num_free_pages == self.config.num_pages - 1
        assert self.scheduler.allocator.num_used == 0, "a page is in use after every request ended"
        for seq in self.seqs.values():
            assert seq.is_finished and seq.page_table == []
            if seq.status is SequenceStatus.FINISHED_LENGTH:
                assert seq.num_output_tokens == seq.max_tokens
            elif seq.status is SequenceStatus.FINISHED_STOPPED:
                last_step = self.speculator.max_tokens + 1 if self.speculator else 1
                assert EOS in seq.output_token_ids[-last_step:]


@settings(max_examples=300, deadline=None)
@given(workloads(policy="splitfuse"))
def test_splitfuse_keeps_every_promise_on_random_workloads(workload):
    Simulation(workload).run()


@settings(max_examples=200, deadline=None)
@given(workloads(policy="prefill_first"))
def test_prefill_first_keeps_every_promise_on_random_workloads(workload):
    Simulation(workload).run()


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(SCHEDULING_POLICIES).flatmap(
        lambda policy: workloads(policy, max_spare_pages=0, max_requests=12)
    )
)
def test_a_pool_of_one_sequence_never_deadlocks(workload):
    Simulation(workload).run()


class _RandomProposer:
    """Proposes random tokens (the simulation decides at random how many are accepted)."""

    free = True

    def __init__(self, rng):
        self.rng = rng

    def propose(self, asks):
        return [[self.rng.randrange(VOCAB) for _ in range(self.rng.randint(0, k))] for _, k in asks]

    def forget(self, request_id):
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(SCHEDULING_POLICIES).flatmap(lambda policy: workloads(policy)),
    st.integers(1, 5),
    st.integers(1, 12),
)
def test_speculation_keeps_every_promise_on_random_workloads(workload, k, rows):
    """Draft tokens never exceed the budget or the verification rows, never starve a decode, sit
    contiguous and in order after their decode's input token, and the KV every step reads is right
    although rejected drafts' KV was written (`check_kv`)."""
    config = dataclasses.replace(workload.config, speculative="ngram", speculative_logit_rows=rows)
    workload = dataclasses.replace(workload, config=config, speculative_tokens=k, speculative_rows=rows)
    Simulation(workload).run()


def test_speculation_happens_in_the_random_workloads():
    """The property test above is not vacuous: a plain workload gets draft tokens."""
    config = EngineConfig(
        token_budget=16, max_num_seqs=4, page_size=2, num_pages=40, max_model_len=32, speculative="ngram"
    )
    requests = [Request(str(i), i, 3, 20, None, False) for i in range(4)]
    rows = config.verification_rows
    simulation = Simulation(Workload(config, requests, 0, speculative_tokens=3, speculative_rows=rows))
    simulation.run()
    assert simulation.drafts > 10


@pytest.mark.parametrize("policy", SCHEDULING_POLICIES)
def test_a_crowded_pool_preempts_often_and_still_finishes_everything(policy):
    config = EngineConfig(
        token_budget=16, max_num_seqs=8, page_size=2, num_pages=17, max_model_len=32, policy=policy
    )
    requests = [
        Request(
            str(i),
            arrival_step=i % 5,
            prompt_len=4 + i % 9,
            max_tokens=16,
            abort_step=None,
            abort_in_flight=False,
        )
        for i in range(30)
    ]
    simulation = Simulation(Workload(config, requests, seed=0))
    simulation.rng = random.Random(0)
    simulation.run()
    assert simulation.scheduler.num_preemptions >= 10
