"""The adaptive token budget on a simulated machine (no model): step seconds = a + b x bucket + c x
attended pairs, with noise. Decoding sequences get a token every step and are replaced by new ones
when done; there is always prompt work to fill the budget. Each finished sequence is judged with the
SLA's own generation test."""

import dataclasses
import math
import types

import numpy as np
import pytest

from fastgen_jax.engine.budget import BudgetController, StepTimeModel, attended_pairs, observe_step
from fastgen_jax.engine.scheduler import ScheduledSeq, SchedulerOutput
from fastgen_jax.engine.timing import RequestSLA, RequestTiming
from fastgen_jax.sla import SLA

BUCKETS = (16, 32, 64, 128, 256, 512)
RATE = 4.0  # tokens/s: EMA of gaps <= 0.25 s; the controller aims at 0.85 x 0.25 = 0.2125 s
TARGET = 0.85 / RATE
JUDGE = SLA(prompt_rate=1.0, token_rate=RATE)
REQUEST_SLA = RequestSLA(prompt_rate=100.0, token_rate=RATE)


def timing(arrival=0.0, prompt_tokens=0, *token_times):
    """A request's timing record (as `Scheduler.add` starts it) that got tokens at `token_times`."""
    t = RequestTiming.start(REQUEST_SLA, arrival, prompt_tokens)
    for now in token_times:
        t.tokens(1, now)
    return t


@dataclasses.dataclass
class Machine:
    seconds_per_step: float = 0.05
    seconds_per_token: float = 0.0008  # buckets 64, 128, 256, 512: 0.10, 0.15, 0.25, 0.46 s
    seconds_per_pair: float = 0.0
    noise: float = 0.0

    def mean_seconds(self, bucket, pairs):
        return self.seconds_per_step + self.seconds_per_token * bucket + self.seconds_per_pair * pairs

    def step_seconds(self, bucket, pairs, rng):
        return self.mean_seconds(bucket, pairs) * (1 + self.noise * rng.standard_normal())


class Simulation:
    """`num_decodes` sequences decoding `gen_len` tokens each, prompt work always waiting."""

    def __init__(self, controller, machine, num_decodes=8, gen_len=40, seed=0):
        self.controller, self.machine = controller, machine
        self.rng = np.random.default_rng(seed)
        self.now, self.next_id = 0.0, 0
        self.decoding = {}  # request id -> its timing record
        self.finished = []  # token times of finished requests
        self.choices = []
        self.num_decodes, self.gen_len = num_decodes, gen_len
        self._top_up()

    def _top_up(self):
        while len(self.decoding) < self.num_decodes:
            rid = f"r{self.next_id}"
            self.next_id += 1
            self.decoding[rid] = timing(
                self.now, 0, self.now
            )  # its first token, from the prompt's last chunk

    def step(self):
        n = len(self.decoding)
        contexts = {rid: 100 + len(t.token_times) for rid, t in self.decoding.items()}
        pairs = sum(c + 1 for c in contexts.values())
        budget = self.controller.choose(n, pairs, 0, self.controller.allowed_gap(self.decoding.values()))
        self.choices.append(budget)
        scheduled = [
            ScheduledSeq(types.SimpleNamespace(request_id=r), 1, c, True) for r, c in contexts.items()
        ]
        scheduled.append(ScheduledSeq(types.SimpleNamespace(request_id="prompt"), budget - n, 0, False))
        seconds = self.machine.step_seconds(budget, pairs + attended_pairs(budget - n, 0), self.rng)
        self.now += seconds
        observe_step(self.controller.model, budget, SchedulerOutput(scheduled, budget), seconds)
        for rid, t in list(self.decoding.items()):
            t.tokens(1, self.now)
            if len(t.token_times) == self.gen_len:
                self.finished.append(t.token_times)
                del self.decoding[rid]
        self._top_up()

    def run(self, steps):
        for _ in range(steps):
            self.step()
        return self

    def generation_sla_met(self, since=0.0):
        return [JUDGE.judge(t[0], 0, t).generation for t in self.finished if t[0] >= since]


def seeded(machine):
    controller = BudgetController(BUCKETS)
    for bucket in BUCKETS:
        controller.model.observe(bucket, 0, machine.mean_seconds(bucket, 0))  # an empty step's time
    return controller


def switches(choices, far_only=False):
    pairs = zip(choices, choices[1:], strict=False)
    if far_only:
        return sum(abs(BUCKETS.index(a) - BUCKETS.index(b)) > 1 for a, b in pairs)
    return sum(a != b for a, b in pairs)


def test_from_no_knowledge_it_settles_on_the_buckets_either_side_of_the_target():
    sim = Simulation(BudgetController(BUCKETS), Machine()).run(400)
    settled = sim.choices[50:]
    assert set(settled) == {128, 256}  # 0.15 s fits 0.2125 s; 0.25 s only with EMA slack
    assert switches(settled, far_only=True) == 0
    assert sim.controller.changes == switches([512, *sim.choices])


def test_it_does_not_swing_between_extremes_under_noise():
    sim = Simulation(BudgetController(BUCKETS), Machine(noise=0.1), seed=1).run(600)
    settled = sim.choices[50:]
    assert 16 not in settled and 32 not in settled and 512 not in settled
    assert switches(settled, far_only=True) == 0


def test_every_request_meets_the_generation_sla_when_a_bucket_fits():
    machine = Machine(noise=0.05)
    sim = Simulation(seeded(machine), machine, seed=2).run(500)
    met = sim.generation_sla_met()
    assert len(met) > 80 and all(met)


def test_slack_is_spent_on_bigger_steps_than_the_per_step_bound_allows():
    sim = Simulation(BudgetController(BUCKETS), Machine()).run(400)
    assert np.mean(sim.choices[50:]) > 128  # a fixed per-step bound of 0.2125 s would pick 128
    assert all(sim.generation_sla_met(since=sim.now / 4))


def test_when_no_bucket_fits_it_takes_the_smallest_with_room_beside_the_decodes():
    controller = seeded(Machine(seconds_per_step=1.0))  # every step misses 0.25 s
    target = TARGET
    assert controller.choose(8, 800, 0, target) == 16
    assert controller.choose(16, 1600, 0, target) == 32
    assert controller.choose(512, 51200, 0, target) == 512  # the budget always holds every decode


def test_with_nothing_decoding_or_nothing_left_to_protect_it_takes_the_largest_budget():
    controller = seeded(Machine())
    assert controller.choose(0, 0, 0, math.inf) == 512
    assert controller.choose(8, 800, 0, math.inf) == 512  # every decoding request already missed


def test_it_follows_a_load_step_to_smaller_budgets_and_back():
    machine = Machine(seconds_per_pair=2e-6)
    sim = Simulation(BudgetController(BUCKETS), machine, num_decodes=2).run(300)
    light = sim.choices[-100:]
    assert set(light) == {128, 256}
    sim.num_decodes = 16  # clients jump from 2 to 16; the machine also slows down
    machine.seconds_per_step = 0.1
    sim.run(300)
    heavy = sim.choices[-100:]
    assert 64 in heavy and set(heavy) <= {64, 128, 256} and np.mean(heavy) < np.mean(light)
    assert all(sim.generation_sla_met(since=sim.now - 30))
    sim.num_decodes = 2
    machine.seconds_per_step = 0.05
    sim.run(300)
    assert set(sim.choices[-100:]) == {128, 256}


def test_the_step_time_model_learns_a_linear_machine():
    model = StepTimeModel(token_scale=512)
    rng = np.random.default_rng(0)
    for _ in range(200):
        bucket, pairs = int(rng.choice(BUCKETS)), int(rng.integers(0, 200_000))
        model.observe(bucket, pairs, 0.02 + 0.001 * bucket + 1e-6 * pairs)
    assert model.predict(256, 50_000) == pytest.approx(0.02 + 0.256 + 0.05, rel=0.01)
    assert model.predict(16, 0) == pytest.approx(0.036, rel=0.05)


@pytest.mark.parametrize("noise", [0.0, 0.02])
def test_the_step_time_model_knows_its_recent_error(noise):
    model = StepTimeModel(token_scale=512)
    rng = np.random.default_rng(2)
    for _ in range(300):
        bucket = int(rng.choice(BUCKETS))
        tokens = int(rng.integers(1, bucket + 1))
        model.observe(bucket, 0, 0.02 + 0.001 * tokens + rng.uniform(-noise, noise), tokens)
    if noise:
        assert 0.3 * noise < model.error < noise  # uniform noise: its RMS is noise / sqrt(3)
    else:
        assert model.error < 1e-3


def test_allowed_gap_is_the_ema_headroom_of_the_tightest_request_capped():
    c = BudgetController(BUCKETS, margin=0.8, max_burst=2.0)  # target 0.2 s, cap 0.4 s
    alpha = 2 / 17
    a = timing(0.0, 0, 0.0, 0.1)  # EMA 0.1
    b = timing(0.0, 0, 0.0, 0.19)  # EMA 0.19
    new = timing(0.0, 0, 0.0)  # no gap yet
    lost = timing(0.0, 0, 0.0, 1.0)  # a first gap of 1 s: the SLA is gone for it
    assert c.allowed_gap([a]) == pytest.approx(0.4)  # headroom (0.2 - 0.1 (1 - alpha)) / alpha: 0.95
    assert c.allowed_gap([a, b]) == pytest.approx((0.2 - 0.19 * (1 - alpha)) / alpha)
    assert c.allowed_gap([a, new]) == pytest.approx(0.2)
    assert c.allowed_gap([lost]) == math.inf
    own = RequestTiming.start(RequestSLA(token_rate=2.0), 0.0, 0)  # its own SLA: gaps up to 0.5 s
    assert c.allowed_gap([own]) == pytest.approx(0.4)  # its target 0.8 x 0.5 s


def test_observe_step_learns_the_padded_bucket_the_real_tokens_and_the_attended_pairs():
    c = BudgetController(BUCKETS)
    seq = types.SimpleNamespace(request_id="a")
    step = SchedulerOutput([ScheduledSeq(seq, 1, 9, True), ScheduledSeq(seq, 20, 0, False)], 21)
    observe_step(c.model, 64, step, 0.3)
    assert attended_pairs(1, 9) == 10 and attended_pairs(20, 0) == 210
    assert c.model.predict(64, 220, 21) == pytest.approx(0.3, rel=0.01)


@pytest.mark.parametrize("follows", ["bucket", "tokens"])
def test_the_step_time_model_tells_padding_from_real_rows(follows):
    """An accelerator's step costs its padded bucket, the CPU kernels' its real rows: after a mix of
    full and part-filled steps the model predicts a part-filled bucket as the device costs it, and
    before any part-filled step it predicts one between the two."""
    machine = {
        "bucket": lambda bucket, tokens: 0.02 + 0.001 * bucket,
        "tokens": lambda bucket, tokens: 0.02 + 0.001 * tokens,
    }[follows]
    model = StepTimeModel(token_scale=512)
    rng = np.random.default_rng(1)
    for bucket in BUCKETS:  # warm-up: full steps only
        model.observe(bucket, 0, machine(bucket, bucket), bucket)
    by_tokens, by_bucket = 0.02 + 0.001 * 130, 0.02 + 0.001 * 256  # the two devices' costs
    assert by_tokens + 0.03 < model.predict(256, 0, 130) < by_bucket - 0.03
    for _ in range(100):
        bucket = int(rng.choice(BUCKETS))
        tokens = int(rng.integers(bucket // 2 + 1, bucket + 1))
        model.observe(bucket, 0, machine(bucket, tokens), tokens)
    assert model.predict(256, 0, 130) == pytest.approx(machine(256, 130), rel=0.03)
    assert model.predict(64, 0, 40) == pytest.approx(machine(64, 40), rel=0.05)
    assert model.predict(256, 0) == pytest.approx(machine(256, 256), rel=0.03)  # a full step


def test_a_request_whose_first_token_missed_the_prompt_sla_is_not_protected():
    c = BudgetController(BUCKETS)
    late = timing(0.0, 100, 1.5)  # first token due at 100 / 100 = 1.0 s
    on_time = timing(0.0, 100, 0.9)
    assert late.missed and not on_time.missed
    assert c.allowed_gap([late]) == math.inf  # nothing to protect: the largest budget is allowed
    assert c.allowed_gap([late, on_time]) == pytest.approx(TARGET)
    assert c.choose(1, 100, 0, c.allowed_gap([late])) == 512
