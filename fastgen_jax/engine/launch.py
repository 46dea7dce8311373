"""When to launch the next step under overlap (`EngineConfig.launch_timing`).

With overlap the engine launches step N+1 before it reads step N's tokens, so the host's work hides
behind the device's. Launched as N starts ("early"), N+1 is composed without the requests that
arrive while N runs: they wait for N and then for all of N+1 before their first step. On a machine
whose steps take 0.1-0.5 s (a CPU) that is a whole step of every new request's time to first
token, against a host's share of a few milliseconds. Launched "late", N+1 is composed just before N
is predicted to end (the engine's caller hands it the requests that arrived meanwhile through the
`intake` of `LLMEngine.step`), so those requests are in N+1, and the launch still comes before N
ends, so the device does not wait for the host.

`LateLaunch` predicts N's end from a model of device seconds per step (`StepTimeModel` over the
step's token bucket, real tokens and attended pairs, learnt from the steps read back: the time from
when a step could start, its launch or the previous step's end, to when its tokens were read) and
leaves the host's launch time (an average of the intakes and launches measured) plus a margin
(twice the model's recent RMS error, at least `MARGIN_SECONDS`). It stops waiting as soon as
N's results are ready, so a prediction that is too long costs at most a poll interval and one launch
of device idle; one that is too short makes the launch early, as "early" would be. A step seen done
before it was read is learnt as ending then (within a poll, or the intake and launch when it ended
during those), so a launch that overran its end does not lengthen the model's steps by the overrun.
Host-side only: no jax here (the engine passes `is_ready`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastgen_jax.engine.budget import StepTimeModel
from fastgen_jax.engine.scheduler import SchedulerOutput, step_pairs
from fastgen_jax.sla import ema_alpha, ema_update

POLL_SECONDS = 0.002  # how often the wait looks at whether the step in flight is done
MARGIN_SECONDS = 0.002  # launch this much before the predicted end, besides the host's launch time
HOST_SPAN = 16  # steps the host's launch-time average spans


class LateLaunch:
    """Predicts when the step in flight ends and waits until it is time to launch the next one."""

    def __init__(self, token_scale: int, clock: Callable[[], float] = time.monotonic, sleep=time.sleep):
        self.model = StepTimeModel(token_scale)  # device seconds of a step
        self.clock, self.sleep = clock, sleep
        self.host_seconds = 0.005  # average seconds to compose, plan and launch a step
        self.device_free = 0.0  # when the last step read back ended on the device (about)
        self._is_ready: Callable[[], bool] | None = None  # the step in flight's, while waiting on it
        self._ready_at: float | None = None  # when it was first seen done
        self._waiting_on = 0.0  # the launch time of the step waited on (a failed read leaves it set)
        self.waits = 0  # late launches
        self.idle_seconds = 0.0  # device idle they caused: from a step seen done to the next launch

    def predicted_end(self, bucket: int, step: SchedulerOutput, launched_at: float) -> float:
        """When a step launched at `launched_at` is predicted to end: it starts once the step before
        it ended."""
        if not self.model.observed:
            return launched_at  # nothing learnt yet: launch at once (as "early" does)
        seconds = self.model.predict(bucket, step_pairs(step.scheduled), step.num_tokens)
        return max(launched_at, self.device_free) + max(seconds, 0.0)

    def wait(self, end: float, is_ready: Callable[[], bool] | None, launched_at: float = 0.0) -> None:
        """Waits until the next launch is due: `end` less the host's launch time and a margin, or
        until the step in flight (launched at `launched_at`) is ready (`poll`), whichever first."""
        self._is_ready, self._ready_at, self._waiting_on = is_ready, None, launched_at
        self.waits += 1
        due = end - (1.5 * self.host_seconds + max(MARGIN_SECONDS, 2.0 * self.model.error))
        while (left := due - self.clock()) > 0 and not self.poll():
            self.sleep(min(left, POLL_SECONDS))

    def poll(self) -> bool:
        """Whether the step in flight is done, noting when it was first seen so (its end, within a
        poll: what `read` learns, so a launch that overran the step's end does not teach the model a
        longer step). A failing `is_ready` counts as done: reading the step raises."""
        if self._ready_at is None and self._is_ready is not None:
            try:
                ready = self._is_ready()
            except Exception:  # noqa: BLE001 - the read reports it
                ready = True
            if ready:
                self._ready_at = self.clock()
        return self._ready_at is not None

    def expected_end(self, end: float) -> float:
        """When the step in flight ends: when it was seen done, else the prediction `end`."""
        return end if self._ready_at is None else self._ready_at

    def launched(self, seconds: float) -> None:
        """Notes how long it took from the end of the wait to the launch (intake, schedule, plan,
        dispatch), and the device's idle time if the step in flight was seen done before it."""
        self.host_seconds = ema_update(self.host_seconds, seconds, ema_alpha(HOST_SPAN))
        if self._ready_at is not None:
            self.idle_seconds += max(0.0, self.clock() - self._ready_at)

    def read(self, bucket: int, step: SchedulerOutput, launched_at: float, returned: float) -> None:
        """Teaches the model a step whose tokens were read at `returned` (or seen done earlier)."""
        if self._ready_at is not None and self._waiting_on == launched_at:  # seen done: it ended then
            returned = min(returned, self._ready_at)
        self._is_ready, self._ready_at = None, None
        start = max(launched_at, self.device_free)
        if returned > start:
            self.model.observe(bucket, step_pairs(step.scheduled), returned - start, step.num_tokens)
        self.device_free = returned
