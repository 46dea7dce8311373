"""A simulated machine for comparing composer policies (`scripts/simulate_policies.py`, the tests):
the real `Scheduler` on a clock where a step takes a + b x (tokens in the step) seconds, requests
arriving at given times, every request judged by the SLA judge (`fastgen_jax.sla`) on the times its
tokens came. No model, no device.

The "sla" policy's step-time model is learnt online from the simulated steps (`StepTimeModel`, as
the engine does), and its clock is the simulated one.
"""

from __future__ import annotations

import dataclasses
import math

from fastgen_jax.benchmarks import trace
from fastgen_jax.config import EngineConfig
from fastgen_jax.engine import BudgetController, Scheduler, Sequence, SequenceStatus, StepTimeModel
from fastgen_jax.engine.budget import observe_step
from fastgen_jax.engine.scheduler import token_bucket
from fastgen_jax.engine.sla_policy import RequestSLA
from fastgen_jax.sla import SLA


@dataclasses.dataclass(frozen=True)
class Arrival:
    time: float
    prompt_tokens: int
    output_tokens: int
    sla: RequestSLA | None = None  # its own SLA, else the workload's


@dataclasses.dataclass(frozen=True)
class Machine:
    seconds_per_step: float = 0.03
    seconds_per_token: float = 0.0012
    padded: bool = False  # a step costs its token bucket's tokens (as the engine pads the slab)
    overlap: bool = False  # step N+1 is composed when step N starts (the engine's async scheduling)
    # With `overlap`: step N+1 is composed as step N ends instead (`launch_timing=late`), still before
    # N's tokens are read, so requests that arrived while N ran are in it.
    late: bool = False
    # A closed-loop client sends its next request this long after its last one finished (the
    # response's and the next request's trip): with overlap it misses a step composed as N ends.
    client_delay: float = 0.0

    def bucket(self, tokens: int, buckets: tuple[int, ...]) -> int:
        """The tokens a step of `tokens` costs: its bucket's when `padded`, else its real ones (as the
        CPU kernels multiply only a slab's real rows)."""
        return token_bucket(tokens, buckets) if self.padded else tokens

    def step_seconds(self, tokens: int) -> float:
        return self.seconds_per_step + self.seconds_per_token * tokens


def fastgen_shaped(n, rate, seed=0, prompt_mean=512, gen_mean=32, prompt_max=900):
    """FastGen's workload scaled to a CPU, as the benchmarks' synthetic trace draws it."""
    entries = trace.fastgen_shaped(n, rate, seed, prompt_mean, gen_mean, prompt_max)
    return [Arrival(e.arrival, e.prompt_tokens, e.output_tokens) for e in entries]


def run(
    policy,
    arrivals,
    sla: SLA,
    machine=Machine(),
    budget=256,
    adaptive=False,
    max_num_seqs=32,
):
    """Serves `arrivals` under `policy`; returns the verdicts (SLA met, both parts) in arrival order.
    With `adaptive`, a `BudgetController` picks each step's budget (`--token_budget=auto`)."""
    return _serve(policy, arrivals, sla, machine, budget, adaptive, max_num_seqs, None)[0]


def run_closed_loop(policy, shapes, clients: int, sla: SLA, machine=Machine(), budget=256, adaptive=False):
    """A closed loop, as `bench_serving.py`'s sweep: `clients` clients each send the next of `shapes`
    (their arrival times are ignored) as soon as their previous request finished. Returns the
    verdicts in order and the seconds until the last request finished."""
    return _serve(policy, shapes, sla, machine, budget, adaptive, 32, clients)


def _serve(policy, arrivals, sla, machine, budget, adaptive, max_num_seqs, clients, max_steps=200_000):
    config = EngineConfig(
        token_budget=budget,
        max_num_seqs=max_num_seqs,
        page_size=16,
        num_pages=2048,
        max_model_len=2048,
        policy=policy,
        sla_prompt_rate=sla.prompt_rate,
        sla_token_rate=sla.token_rate,
    )
    scheduler = Scheduler(config)
    now = [0.0]
    scheduler.clock = lambda: now[0]
    controller = BudgetController(config.token_buckets)
    model = controller.model if adaptive else StepTimeModel(budget)
    if scheduler.sla is not None:
        scheduler.sla.model = model
    for bucket in config.token_buckets:  # as the engine's warm-up: full, and with no real row
        empty = machine.step_seconds(bucket if machine.padded else 0)
        model.seed(bucket, machine.step_seconds(bucket), empty)
    seqs: dict[int, Sequence] = {}
    if clients is not None:  # arrival times are set as the loop goes (`arrival_time`)
        arrivals = [
            dataclasses.replace(a, time=0.0 if i < clients else math.inf) for i, a in enumerate(arrivals)
        ]

    def compose():
        return scheduler.schedule(controller.choose_for(scheduler.running) if adaptive else None)

    pending = sorted(enumerate(arrivals), key=lambda a: a[1].time)
    in_flight = None  # (output, when it started): composed, not yet postprocessed

    def admit(until):
        while pending and pending[0][1].time <= until:
            i, a = pending.pop(0)
            seqs[i] = Sequence(str(i), range(1000 * i, 1000 * i + a.prompt_tokens), a.output_tokens)
            scheduler.add(seqs[i], a.sla, a.time)

    for _ in range(max_steps):
        admit(now[0])
        if in_flight is None:
            if not scheduler.has_unfinished():
                if not pending:
                    break
                now[0] = pending[0][1].time
                continue
            in_flight = compose(), now[0]
        output, start = in_flight
        seconds = machine.step_seconds(machine.bucket(output.num_tokens, config.token_buckets))
        end = start + seconds
        # With overlap the next step is composed before this one's tokens are read: at its start
        # (eager), or as it ends, with the requests that arrived while it ran (late).
        following = None
        if machine.overlap and machine.late:
            now[0] = end
            admit(end)
        if machine.overlap and not output.is_empty:
            scheduler.in_flight_end = end if machine.late else None
            following = compose()
        now[0] = end
        observe_step(model, token_bucket(output.num_tokens, config.token_buckets), output, seconds)
        scheduler.postprocess(output, [1] * output.num_seqs)
        in_flight = None if following is None or following.is_empty else (following, now[0])
        for e in output.scheduled:
            if e.needs_sample and not e.seq.is_finished:
                e.seq.timing.tokens(1, now[0])  # as the engine notes a token it hands out
            if e.needs_sample and e.seq.num_output_tokens == e.seq.max_tokens and not e.seq.is_finished:
                scheduler.finish(e.seq, SequenceStatus.FINISHED_LENGTH)
                unsent = [k for k, (_, a) in enumerate(pending) if a.time == math.inf]
                if clients is not None and unsent:  # its client sends the next request now
                    i, a = pending.pop(unsent[0])
                    arrivals[i] = dataclasses.replace(a, time=now[0] + machine.client_delay)
                    pending.insert(unsent[0], (i, arrivals[i]))  # after those already due: in order
    else:
        raise AssertionError("the simulation did not end")
    return [_judge(sla, a, seqs[i].timing.token_times) for i, a in enumerate(arrivals)], now[0]


def _judge(default: SLA, a: Arrival, token_times: list[float]) -> bool:
    sla = default if a.sla is None else SLA(a.sla.prompt_rate, a.sla.token_rate, default.ema_span)
    return sla.judge(a.time, a.prompt_tokens, token_times).both
