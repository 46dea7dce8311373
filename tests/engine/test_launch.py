"""`LateLaunch`: when the engine launches the next step under overlap with `launch_timing="late"`."""

from __future__ import annotations

import pytest

from fastgen_jax.engine.launch import MARGIN_SECONDS, POLL_SECONDS, LateLaunch
from fastgen_jax.engine.scheduler import ScheduledSeq, SchedulerOutput
from fastgen_jax.engine.sequence import Sequence


class Clock:
    def __init__(self):
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds


def decodes(n: int, context: int = 10) -> SchedulerOutput:
    out = []
    for i in range(n):
        seq = Sequence(str(i), range(context), 4)
        out.append(ScheduledSeq(seq, num_new_tokens=1, start_position=context, needs_sample=True))
    return SchedulerOutput(out, num_tokens=n)


def teach(late: LateLaunch, clock: Clock, a: float, b: float, steps: int = 40) -> None:
    """Steps of bucket 16..256 that each take a + b x bucket seconds on the device, read back as
    they end (each launched while the one before ran)."""
    for i in range(steps):
        bucket = (16, 64, 128, 256)[i % 4]
        launched_at = clock.now
        clock.now = max(launched_at, late.device_free) + a + b * bucket
        late.read(bucket, decodes(2), launched_at, clock.now)


def test_nothing_learnt_means_launch_at_once():
    clock = Clock()
    late = LateLaunch(256, clock, clock.sleep)
    end = late.predicted_end(256, decodes(4), clock.now)
    assert end == clock.now
    late.wait(end, None)
    assert clock.sleeps == [] and late.expected_end(end) == end


def test_predicts_the_device_time_it_learnt_and_leaves_the_host_time():
    clock = Clock()
    late = LateLaunch(256, clock, clock.sleep)
    teach(late, clock, a=0.05, b=0.001)
    late.host_seconds = 0.004
    launched_at = clock.now - 0.01  # launched before the step before it ended
    end = late.predicted_end(256, decodes(2), launched_at)
    assert end == pytest.approx(late.device_free + 0.05 + 0.256, abs=1e-3)
    late.wait(end, lambda: False)
    assert late.expected_end(end) == end
    # it slept in polls, up to the host's launch time and the margin before the end
    assert clock.now == pytest.approx(end - 1.5 * 0.004 - MARGIN_SECONDS, abs=1e-9)
    assert max(clock.sleeps) <= POLL_SECONDS + 1e-12


def test_a_step_that_is_ready_early_ends_the_wait():
    clock = Clock()
    late = LateLaunch(256, clock, clock.sleep)
    teach(late, clock, a=0.05, b=0.001)
    end = late.predicted_end(256, decodes(2), clock.now)
    ready_at = clock.now + 0.05  # the device finished long before the prediction
    late.wait(end, lambda: clock.now >= ready_at)
    assert ready_at <= clock.now <= ready_at + POLL_SECONDS + 1e-9
    assert late.expected_end(end) == clock.now


def test_a_failing_is_ready_counts_as_done():
    clock = Clock()
    late = LateLaunch(256, clock, clock.sleep)
    teach(late, clock, a=0.05, b=0.001)

    def broken():
        raise RuntimeError("device lost")

    end = late.predicted_end(256, decodes(2), clock.now)
    late.wait(end, broken)
    assert clock.sleeps == [] and late.poll() and late.expected_end(end) == clock.now


def test_a_launch_that_overran_the_steps_end_does_not_lengthen_the_model():
    """Seen done during the wait (or at a poll after the intake or the launch), a step is learnt as
    ending then, not when its tokens were read after a slow launch."""
    clock = Clock()
    late = LateLaunch(256, clock, clock.sleep)
    teach(late, clock, a=0.05, b=0.001)
    before = late.model.predict(256, 2 * 11)
    for _ in range(20):
        launched_at = clock.now
        true_end = max(launched_at, late.device_free) + 0.05 + 0.256
        late.wait(true_end + 1.0, lambda end=true_end: clock.now >= end, launched_at)  # far too long
        clock.now += 0.05  # then a slow intake and launch
        late.read(256, decodes(2), launched_at, clock.now)
    assert late.model.predict(256, 2 * 11) == pytest.approx(before, abs=POLL_SECONDS)


def test_a_late_launch_does_not_teach_the_model_its_own_idle_time():
    """The device time counts from when the step could start (its launch, if that came after the
    step before ended), so waiting too long never makes the next wait longer."""
    clock = Clock()
    late = LateLaunch(256, clock, clock.sleep)
    teach(late, clock, a=0.05, b=0.001)
    before = late.model.predict(256, 2 * 11)
    for _ in range(20):  # every launch 0.1 s after the device became free
        launched_at = late.device_free + 0.1
        clock.now = launched_at + 0.05 + 0.256
        late.read(256, decodes(2), launched_at, clock.now)
    assert late.model.predict(256, 2 * 11) == pytest.approx(before, rel=0.02)


def test_host_time_is_an_average_of_launches():
    late = LateLaunch(256)
    for _ in range(100):
        late.launched(0.010)
    assert late.host_seconds == pytest.approx(0.010, rel=1e-3)


def test_a_step_seen_done_teaches_only_its_own_read():
    """A step whose read failed (rolled back) leaves its sighting behind; the next step read without
    a wait must not take it as its own end."""
    clock = Clock()
    late = LateLaunch(256, clock, clock.sleep)
    teach(late, clock, a=0.05, b=0.001)
    failed_at = clock.now
    late.wait(clock.now + 1.0, lambda: True, failed_at)  # seen done at once; its read then fails
    clock.now += 0.01
    launched_at, free = clock.now, late.device_free
    clock.now += 0.3
    late.read(256, decodes(2), launched_at, clock.now)  # the next step, read without a wait
    assert late.device_free == clock.now and late.device_free > free


def test_auto_launches_late_under_the_sla_policy_only():
    from fastgen_jax.config import ConfigError, EngineConfig

    assert EngineConfig(policy="sla").launches_late
    assert not EngineConfig(policy="splitfuse").launches_late
    assert not EngineConfig(policy="prefill_first").launches_late
    assert EngineConfig(policy="splitfuse", launch_timing="late").launches_late
    assert not EngineConfig(policy="sla", launch_timing="early").launches_late
    assert not EngineConfig(policy="sla", async_scheduling=False).launches_late  # nothing overlaps
    with pytest.raises(ConfigError, match="launch_timing"):
        EngineConfig(launch_timing="soon")
