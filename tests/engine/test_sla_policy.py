"""The "sla" policy: the composer's choices on hand-made cases, and the scheduler's promises under it on
random workloads with random per-request SLAs and a simulated clock (step seconds = a + b x tokens)."""

import collections
import dataclasses
import math
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgen_jax.engine import Sequence
from fastgen_jax.engine.scheduler import _PromptPairs, attended_pairs
from fastgen_jax.engine.sla_policy import STEP_MARGIN, PromptCandidate, RequestSLA, RequestTiming, SlaComposer
from fastgen_jax.engine.timing import ALPHA
from fastgen_jax.sla import SLA
from tests.engine.test_scheduler import Simulation, make_scheduler, prompt_of, step, workloads


@dataclasses.dataclass
class LinearMachine:
    """Step seconds = a + b x tokens, the step's token bucket (an accelerator's padded slab) or, with
    `real_rows`, its real tokens (the CPU kernels); also the composer's step-time model
    (predict(bucket, pairs, tokens))."""

    a: float = 0.05
    b: float = 0.01
    real_rows: bool = False
    error: float = 0.0  # the model's recent RMS error (StepTimeModel.error)

    def predict(self, bucket, pairs, tokens=None):
        return self.a + self.b * (tokens if self.real_rows and tokens is not None else bucket)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


DEFAULT_SLA = RequestSLA(prompt_rate=100.0, token_rate=4.0)


def composer(clock, **kwargs):
    return SlaComposer(LinearMachine(), clock, **kwargs)


def arrived(c, tokens, sla=None):
    """A request's timing record as `Scheduler.add` starts it, arriving now on the composer's clock."""
    return RequestTiming.start(sla or DEFAULT_SLA, c.clock(), tokens)


def decoding(c, rid, last, ema):
    record = arrived(c, 1)
    record.token_times, record.ema = [last], ema
    return (rid, record)


def prompt(c, rid, tokens, running=False, sla=None):
    return PromptCandidate(rid, arrived(c, tokens, sla), tokens, running)


# -- the composer on hand-made cases --------------------------------------------------------------


def test_prompts_go_by_deadline_and_hopeless_ones_last_in_arrival_order():
    clock = Clock()
    c = composer(clock)  # 100 prompt tokens/s
    late = prompt(c, "late", 20)  # due at 0.2 s
    clock.now = 0.1
    tight = prompt(c, "tight", 4)  # due at 0.14 s
    loose = prompt(c, "loose", 60)  # due at 0.7 s
    mid = prompt(c, "mid", 20)  # due at 0.3 s
    clock.now = 0.15
    choice = c.compose([], [late, tight, loose, mid], budget=16, step_seconds=lambda n: 0.05)
    # "late" needs 2 steps (0.1 s) and has 0.05 s; "tight" is past due; "mid" needs 2 steps of its
    # 0.15 s; "loose" after it 5 steps (80 tokens) of its 0.55 s
    assert [p.key for p in choice.prompts] == ["mid", "loose", "late", "tight"]
    assert not any(p.urgent for p in choice.prompts)


def test_prompts_keep_arrival_order_when_it_lands_every_feasible_one_with_a_step_to_spare():
    clock = Clock()
    c = composer(clock)  # 100 prompt tokens/s
    first = prompt(c, "first", 16)  # due at 0.16 s
    clock.now = 0.01
    second = prompt(c, "second", 8)  # due at 0.09 s: the earlier deadline
    # in arrival order: "first" done after one step (0.05 s), "second" after two (0.1 s): a step to
    # spare for "first" only, so "second" goes first
    choice = c.compose([], [first, second], budget=16, step_seconds=lambda n: 0.05)
    assert [p.key for p in choice.prompts] == ["second", "first"]
    # a looser second prompt: arrival order lands both with a step to spare, so it is kept
    clock.now = 0.0
    c = composer(clock)
    first = prompt(c, "first", 16)  # due at 0.16 s
    clock.now = 0.01
    second = prompt(c, "second", 14)  # due at 0.15 s: still the earlier deadline
    choice = c.compose([], [first, second], budget=32, step_seconds=lambda n: 0.05)
    assert [p.key for p in choice.prompts] == ["first", "second"]


def test_a_lower_priority_value_goes_before_an_earlier_deadline():
    clock = Clock()
    c = composer(clock)
    normal = prompt(c, "normal", 10)
    premium = prompt(c, "premium", 50, sla=RequestSLA(100.0, 4.0, priority=-1))
    choice = c.compose([], [normal, premium], budget=64, step_seconds=lambda n: 0.1)
    assert [p.key for p in choice.prompts] == ["premium", "normal"]


def test_decodes_are_deferred_only_when_feasible_prompts_need_their_room():
    clock = Clock()
    c = composer(clock)
    clock.now = 1.0
    relaxed = [decoding(c, f"d{i}", last=0.95, ema=0.05) for i in range(4)]  # far under 0.25 s
    roomy = prompt(c, "roomy", 100)  # due at 2 s: 9 steps of 0.1 s needed, 10 available
    choice = c.compose(relaxed, [roomy], budget=16, step_seconds=lambda n: 0.1)
    assert choice.deferred == [] and [p.key for p in choice.prompts] == ["roomy"]
    tight = prompt(c, "tight", 14)  # due at 1.14 s: needs all 14 tokens in this step
    choice = c.compose(relaxed, [tight], budget=16, step_seconds=lambda n: 0.1)
    assert len(choice.deferred) == 2 and len(choice.decodes) == 2  # 16 - 4 = 12 room, 14 needed


def test_decodes_wait_for_a_leaner_step_only_when_it_is_shorter_and_lands_the_first_token():
    clock = Clock()
    c = composer(clock)
    clock.now = 1.0
    relaxed = [decoding(c, f"d{i}", last=0.99, ema=0.05) for i in range(4)]
    quick = RequestSLA(prompt_rate=50.0, token_rate=4.0)  # 4 tokens due in 0.08 s

    def step(n):  # 0.1 s with the 4 decodes, 0.07 s without
        return 0.04 + 0.0075 * n

    choice = c.compose(relaxed, [prompt(c, "tight", 4, sla=quick)], budget=16, step_seconds=step)
    assert len(choice.deferred) == 4  # the lean step lands it, the full one does not
    # Another prompt would take the room the decodes leave: the step is as long either way, so no
    # decode waits (deferring them would cost each a step and land nothing).
    big = prompt(c, "big", 100)
    choice = c.compose(relaxed, [prompt(c, "tight", 4, sla=quick), big], budget=16, step_seconds=step)
    assert choice.deferred == [] and len(choice.decodes) == 4


def test_a_decode_is_not_deferred_when_its_gap_would_pass_the_bound_even_with_ema_slack():
    clock = Clock()
    c = composer(clock)
    clock.now = 1.0
    quick = RequestSLA(prompt_rate=50.0, token_rate=4.0)
    low_ema = [decoding(c, f"d{i}", last=1.0, ema=0.01) for i in range(4)]  # the EMA could take 0.3 s
    choice = c.compose(low_ema, [prompt(c, "tight", 4, sla=quick)], budget=16, step_seconds=lambda n: 0.13)
    assert choice.deferred == []  # deferred, its next gap would be 0.26 s, past 1 / R = 0.25 s


def test_a_decode_the_step_in_flight_serves_counts_its_gap_from_that_token():
    clock = Clock()
    c = composer(clock)
    clock.now = 1.0
    record = RequestTiming.start(RequestSLA(prompt_rate=100.0, token_rate=2.0), 0.0, 1)  # gaps <= 0.5 s
    record.token_times, record.ema = [0.9], 0.05
    tight = prompt(c, "tight", 10, sla=RequestSLA(prompt_rate=40.0, token_rate=4.0))  # due at 1.25 s

    def step(n):  # 0.21 s with the decode, 0.2 s without
        return 0.1 + 0.01 * n

    # 0.045 s in flight: this step ends at 1.255 s with the decode, 1.245 s without, so "tight" needs
    # the decode to wait. Its token from the step in flight comes at 1.045 s and the next one 2 steps
    # later (a gap of 0.42 s): it may wait. Not counting that token, the gap would be 0.565 s: not.
    choice = c.compose([("d", record)], [tight], budget=16, step_seconds=step, ahead=0.045, in_flight={"d"})
    assert choice.deferred == ["d"]
    choice = c.compose([("d", record)], [tight], budget=16, step_seconds=step, ahead=0.045)
    assert choice.deferred == []


def test_the_step_in_flight_comes_first_in_every_prediction():
    clock = Clock()
    c = composer(clock)
    loose = prompt(c, "loose", 10)  # arrived first, due at 0.1 s
    clock.now = 0.05
    tight = prompt(c, "tight", 4)  # due at 0.09 s
    choice = c.compose([], [loose, tight], budget=16, step_seconds=lambda n: 0.03)
    assert [p.key for p in choice.prompts] == ["tight", "loose"]  # both land by 0.08 s
    # with 0.05 s of a step in flight, this step ends at 0.13 s: both are hopeless (arrival order)
    choice = c.compose([], [loose, tight], budget=16, step_seconds=lambda n: 0.03, ahead=0.05)
    assert [p.key for p in choice.prompts] == ["loose", "tight"]


def test_a_prompts_last_chunk_counts_as_the_short_step_it_is():
    clock = Clock()
    c = composer(clock)
    stale = prompt(c, "stale", 1, sla=RequestSLA(prompt_rate=1e6, token_rate=4.0))  # due at once
    early = prompt(c, "early", 40)  # due at 0.4 s
    clock.now = 0.01
    short = prompt(c, "short", 20, sla=RequestSLA(prompt_rate=60.0, token_rate=4.0))  # due at 0.343 s
    step = LinearMachine().predict
    choice = c.compose([], [stale, short], budget=16, step_seconds=lambda n: step(n, 0))
    # 16 tokens (0.21 s), then its last 4 and stale's 1 (0.10 s): done at 0.32 s, in time (two full
    # steps would end at 0.43 s); stale is hopeless, so goes after it
    assert [p.key for p in choice.prompts] == ["short", "stale"]
    choice = c.compose([], [stale, early, short], budget=16, step_seconds=lambda n: step(n, 0))
    # now its last chunk shares a full step with early's tokens: done at 0.43 s, too late; early
    # needs 0.21 + 0.21 s, then its last 8 tokens share a full step with the others: 0.64 s, too late
    assert [p.key for p in choice.prompts] == ["stale", "early", "short"]


def test_a_decode_whose_next_gap_would_break_its_bound_is_never_deferred():
    clock = Clock()
    c = composer(clock)
    clock.now = 1.0
    near = decoding(c, "near", last=0.9, ema=0.24)  # one more 0.3 s gap takes its EMA past 0.9 x 0.25
    lost = decoding(c, "lost", last=0.9, ema=0.3)
    lost[1].missed = True
    far = decoding(c, "far", last=0.99, ema=0.02)
    tight = prompt(c, "tight", 15)  # due 1.15 s
    choice = c.compose([near, lost, far], [tight], budget=16, step_seconds=lambda n: 0.1)
    assert choice.decodes == ["near"] and set(choice.deferred) == {"lost", "far"}


def test_a_decode_is_deferred_at_most_max_skips_steps_in_a_row():
    clock = Clock()
    c = composer(clock, max_skips=2)
    lost = decoding(c, "lost", last=0.0, ema=1.0)
    lost[1].missed = True
    for expected in (["lost"], ["lost"], []):
        tight = prompt(c, "tight", 16)
        choice = c.compose([lost], [tight], budget=16, step_seconds=lambda n: 0.1)
        assert choice.deferred == expected
        c.served(choice, [tight], {"tight"}, clock.now)


def test_a_prompt_passed_over_max_pass_over_steps_goes_first_as_urgent():
    clock = Clock()
    c = composer(clock, max_pass_over=3)
    old = prompt(c, "old", 500)  # hopeless: due at 5 s, needs 32 steps of 0.21 s
    quick = RequestSLA(prompt_rate=10.0)
    for _ in range(3):
        fresh = prompt(c, "fresh", 10, sla=quick)  # due at 1 s: feasible
        choice = c.compose([], [old, fresh], budget=16, step_seconds=lambda n: 0.21)
        assert choice.prompts[0].key == "fresh"
        c.served(choice, [old, fresh], {"fresh"}, clock.now)
    choice = c.compose([], [old, prompt(c, "fresh", 10, sla=quick)], budget=16, step_seconds=lambda n: 0.21)
    assert choice.prompts[0] == type(choice.prompts[0])("old", True)


def test_the_step_is_kept_within_the_gap_each_decode_can_take():
    """A decode's first gap seeds its EMA, so it alone must stay within the bound; a decode with EMA
    slack can take a longer step; one already lost, or one that even the shortest step would break,
    does not limit the step; one whose token the step in flight brings counts its gap from then."""
    clock = Clock()
    c = composer(clock)  # R = 4 tokens/s: gaps within 0.25 s
    clock.now = 1.0
    first = decoding(c, "first", last=1.0, ema=None)  # its first token came just now
    steady = decoding(c, "steady", last=1.0, ema=0.05)
    lost = decoding(c, "lost", last=1.0, ema=0.5)
    lost[1].missed = True
    bound = STEP_MARGIN * 0.25
    assert c.longest_step([first, steady, lost], 1.0) == pytest.approx(bound)
    assert c.longest_step([steady, lost], 1.0) == pytest.approx(
        (bound - (1 - ALPHA) * 0.05) / ALPHA
    )  # 1.64 s
    assert c.longest_step([lost], 1.0) == math.inf
    assert c.longest_step([first], 1.1) == pytest.approx(bound - 0.1)  # 0.1 s since its first token
    assert c.longest_step([first, steady], 1.1, shortest=0.2) == pytest.approx(1.64 - 0.1, abs=0.01)
    # "first" decoded in the step in flight, which ends at 1.3: a gap of 0.3 s from 1.0, then its own
    ema = (1 - ALPHA) * 0.05 + ALPHA * 0.3
    expected = (bound - (1 - ALPHA) * ema) / ALPHA
    assert c.longest_step([steady], 1.3, in_flight={"steady"}) == pytest.approx(expected)


@pytest.mark.parametrize("error", [0.0, 0.014])  # 0.2375 s less a 0.028 s margin is under 0.21 s
def test_the_scheduler_keeps_a_step_to_the_bucket_within_a_fresh_decodes_gap(error):
    s = make_scheduler(policy="sla", budget=64, max_num_seqs=4, num_pages=65)  # buckets 16, 32, 64
    clock = Clock()
    s.clock, s.sla.model = clock, LinearMachine(a=0.05, b=0.01, error=error)  # 16: 0.21 s, 32: 0.37, 64: 0.69
    s.add(Sequence("d", range(100, 104), 8), RequestSLA(prompt_rate=1000.0, token_rate=4.0))
    assert step(s) == [("d", 4, 0, True)]  # its first token: the next gap must be within 0.2375 s
    s.add(Sequence("p", range(200, 260), 4), RequestSLA(prompt_rate=10.0, token_rate=4.0))
    assert step(s) == [("d", 1, 4, True), ("p", 15, 0, False)]  # a 16-token step, not 64
    s.get("d").timing.missed = True  # once "d" cannot count any more, the budget is the step's again
    assert step(s) == [("d", 1, 5, True), ("p", 45, 15, True)]


@pytest.mark.parametrize("error, tokens", [(0.0, 18), (0.01, 16)])
def test_where_steps_cost_their_real_rows_the_step_limit_keeps_part_of_a_bucket(error, tokens):
    s = make_scheduler(policy="sla", budget=64, max_num_seqs=4, num_pages=65)
    clock = Clock()
    s.clock, s.sla.model = clock, LinearMachine(a=0.05, b=0.01, real_rows=True, error=error)
    s.add(Sequence("d", range(100, 104), 8), RequestSLA(prompt_rate=1000.0, token_rate=4.0))
    assert step(s) == [("d", 4, 0, True)]  # its first token: the next gap must be within 0.2375 s
    s.add(Sequence("p", range(200, 260), 4), RequestSLA(prompt_rate=10.0, token_rate=4.0))
    # 0.05 + 0.01 x 18 = 0.23 s (bucket 32, not 16); with a margin of twice the model's error, 0.2175 s
    assert step(s) == [("d", 1, 4, True), ("p", tokens - 1, 0, False)]


def test_where_steps_cost_their_real_rows_the_step_limit_can_go_below_the_floors_bucket():
    s = make_scheduler(policy="sla", budget=64, max_num_seqs=4, num_pages=65)
    clock = Clock()
    s.clock, s.sla.model = clock, LinearMachine(a=0.05, b=0.01, real_rows=True)
    s.add(Sequence("d", range(100, 104), 8), RequestSLA(prompt_rate=1000.0, token_rate=4.0))
    assert step(s) == [("d", 4, 0, True)]
    clock.now += 0.1  # 0.1375 s of its first gap left: 8 tokens (0.13 s), not the 16 of its bucket
    s.add(Sequence("p", range(200, 260), 4), RequestSLA(prompt_rate=10.0, token_rate=4.0))
    assert step(s) == [("d", 1, 4, True), ("p", 7, 0, False)]


def test_the_record_follows_the_sla_judge():
    a = RequestTiming.start(DEFAULT_SLA, 0.0, 50)  # first token due at 0.5 s
    a.tokens(1, 0.6)
    assert a.missed  # late first token
    b = RequestTiming.start(DEFAULT_SLA, 0.6, 50)  # due at 1.1 s
    b.tokens(1, 0.7)
    b.tokens(1, 0.9)
    assert not b.missed and b.ema == pytest.approx(0.2) and b.due() == pytest.approx(1.15)
    assert b.token_times == [0.7, 0.9] and b.last == 0.9
    verdict = SLA(DEFAULT_SLA.prompt_rate, DEFAULT_SLA.token_rate).judge(0.6, 50, b.token_times)
    assert verdict.both  # the server's judge agrees with the record
    b.tokens(2, 2.0)  # two tokens of one step (an accepted draft): a gap of 1.1 s, then none
    assert b.token_times[-2:] == [2.0, 2.0] and b.missed  # the EMA passed 1 / R = 0.25 s


def test_bad_settings_and_rates_are_rejected():
    with pytest.raises(ValueError, match="token_rate"):
        RequestSLA(token_rate=0)
    with pytest.raises(ValueError, match="max_skips"):
        SlaComposer(None, Clock(), max_skips=-1)


# -- the scheduler under the policy ---------------------------------------------------------------


def test_the_scheduler_defers_a_decode_for_a_prompt_that_needs_the_room_and_counts_it():
    s = make_scheduler(policy="sla", budget=8, max_num_seqs=4)
    clock = Clock()
    s.clock, s.sla.model = clock, LinearMachine(a=0.05, b=0.01)  # full step 0.13 s
    s.add(Sequence("d", range(100, 104), 8), RequestSLA(prompt_rate=1000.0, token_rate=0.5))
    assert step(s) == [("d", 4, 0, True)]
    clock.now = 0.1
    s.add(Sequence("p", range(200, 208), 8), RequestSLA(prompt_rate=40.0, token_rate=4.0))  # due 0.3 s
    assert step(s) == [("p", 8, 0, True)]  # 8 tokens of a 0.13 s step: "d" waits, it has 2 s of slack
    assert s.sla.deferred_decodes == 1 and s.sla.prompts_past_deadline == 0
    assert s.get("p").timing.admission_slack == pytest.approx(0.3 - 0.1 - 0.13)
    assert step(s) == [("d", 1, 4, True), ("p", 1, 8, True)]


# -- properties -----------------------------------------------------------------------------------


class SlaSimulation(Simulation):
    """The scheduler's promises (test_scheduler's `Simulation`) plus the policy's bounds, on a clock
    that advances a + b x tokens per step, with each request's own SLA."""

    def __init__(self, workload, slas, machine):
        super().__init__(workload)
        self.slas, self.machine, self.clock = slas, machine, Clock()
        self.scheduler.clock, self.scheduler.sla.model = self.clock, machine
        self.skipped = collections.Counter()  # consecutive steps a decode got no token
        self.passed = collections.Counter()  # consecutive steps a started prefill got no token
        self.overtaken = collections.Counter()  # steps a later prompt was admitted while it waited
        self.pending = set()

    def add_arrivals(self, step):
        for r in self.requests:
            if r.arrival_step == step:
                seq = Sequence(r.request_id, prompt_of(r), r.max_tokens, cache_salt=r.cache_salt)
                self.scheduler.add(seq, self.slas[int(r.request_id) % len(self.slas)])
                self.seqs[r.request_id] = seq
                self.next_position[r.request_id] = 0
                self.tokens[r.request_id] = list(seq.prompt_token_ids)

    def step(self, step):
        s = self.scheduler
        self.pending = {w.request_id for w in s.waiting if s._cached_prefix(w) is None}
        self.waiting_before = list(s.waiting)
        super().step(step)

    def check_policy(self, output, decoding):
        is_decode = [e.seq.request_id in decoding for e in output.scheduled]
        assert is_decode == sorted(is_decode, reverse=True), "decodes come first in the slab"
        composer = self.scheduler.sla
        served = {e.seq.request_id for e in output.scheduled} | {q.request_id for q in output.preempted}
        for rid in decoding:
            self.skipped[rid] = 0 if rid in served else self.skipped[rid] + 1
            assert self.skipped[rid] <= composer.max_skips, "a decode was deferred too many steps in a row"
        for seq in self.scheduler.running:
            if seq.is_prefilling and seq.request_id not in served:
                self.passed[seq.request_id] += 1
                assert self.passed[seq.request_id] <= composer.max_pass_over, "a prefill was starved"
            else:
                self.passed[seq.request_id] = 0
        self.check_overtaking(output)
        self.clock.now += self.machine.predict(output.num_tokens, 0)

    def check_overtaking(self, output):
        admitted = [e.seq for e in output.scheduled if e.seq in self.waiting_before]
        latest = max((seq.arrival_index for seq in admitted), default=-1)
        for w in self.waiting_before:
            if w in admitted:
                self.overtaken[w.request_id] = 0
            elif w.arrival_index < latest and w.request_id not in self.pending:
                self.overtaken[w.request_id] += 1
                assert self.overtaken[w.request_id] <= self.scheduler.sla.max_pass_over


slas = st.lists(
    st.builds(
        RequestSLA,
        prompt_rate=st.sampled_from([0.5, 2.0, 20.0, 1000.0]),
        token_rate=st.sampled_from([0.5, 2.0, 8.0]),
        priority=st.integers(-1, 1),
    ),
    min_size=1,
    max_size=4,
)
machines = st.builds(LinearMachine, a=st.sampled_from([0.0, 0.05, 0.5]), b=st.sampled_from([0.0, 0.01, 0.1]))


@settings(max_examples=300, deadline=None)
@given(workloads(policy="sla"), slas, machines)
def test_sla_keeps_every_promise_on_random_workloads(workload, slas, machine):
    SlaSimulation(workload, slas, machine).run()


@settings(max_examples=100, deadline=None)
@given(workloads(policy="sla", max_spare_pages=0, max_requests=12), slas, machines)
def test_sla_in_a_pool_of_one_sequence_never_deadlocks(workload, slas, machine):
    SlaSimulation(workload, slas, machine).run()


def test_no_model_means_no_deferral():
    c = SlaComposer(None, Clock())
    assert c.step_seconds(64, 0) == 0.0
    choice = c.compose(
        [decoding(c, "d", 0.0, 0.1)], [prompt(c, "p", 10**6)], budget=2, step_seconds=lambda n: 0.0
    )
    assert choice.decodes == ["d"]


def test_a_record_is_a_plain_dataclass():
    record = RequestTiming(RequestSLA(), arrival=0.0, deadline=1.0)
    assert record.due() == 1.0 and record.max_gap == 0.25 and record.last is None


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 300), st.integers(0, 200), st.floats(0, 5)), max_size=6),
    st.integers(-5, 1500),
)
def test_a_steps_prompt_pairs_are_those_its_tokens_attend_in_deadline_order(shapes, tokens):
    prompts = [
        PromptCandidate(
            types.SimpleNamespace(num_prefill_tokens=computed + remaining),
            RequestTiming.start(DEFAULT_SLA, arrival, computed + remaining),
            remaining,
            bool(computed),
        )
        for remaining, computed, arrival in shapes
    ]
    expected, left = 0, max(tokens, 0)
    for p in sorted(prompts, key=lambda p: p.record.due()):
        take = min(left, p.remaining)
        expected += attended_pairs(take, p.key.num_prefill_tokens - p.remaining)
        left -= take
    assert _PromptPairs(prompts)(tokens) == expected
