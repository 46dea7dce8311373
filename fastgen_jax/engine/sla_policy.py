"""The deadline-aware composer (`--policy=sla`): each step's tokens go by SLA slack, not by kind.

FastGen judges a request by two deadlines (`fastgen_jax.sla`): its first token within
prompt_tokens / P seconds of arrival, and the EMA of its token gaps within 1 / R. Dynamic SplitFuse
gives every decode its token and then fills the step with prompts in arrival order; on a machine
where every token of a step costs time, prompts beside decodes then reach their first token late.
This policy looks at who can still meet their SLA, using the step-time model the budget controller
learns (`budget.StepTimeModel`: the predicted seconds of a step of n tokens):

1. Prompts (chunks of running prefills and waiting prompts) in order of (priority, first-token
   deadline), earliest first. Walking that order, a prompt is *feasible* if its uncached remainder
   plus the work of the feasible prompts before it is predicted done before its deadline: full steps,
   then a last step holding the rest and whatever of the other prompts fits beside it (a last step
   that is not full is shorter: a smaller token bucket, and fewer real rows where the step's cost
   follows them, as on the CPU kernels); the others are *hopeless* (they count for nothing in
   effective throughput) and are served after every feasible prompt, in arrival order, with what is
   left. Each prompt takes all the room it can use, so its first token comes as early as the order
   allows. When no decode is deferred and
   arrival order (SplitFuse's) is predicted to land every feasible prompt with a full step to spare,
   the prompts keep arrival order: reordering would gain nothing and cost the prompts it delays.
2. Decodes get their token unless the feasible prompts need their room this step: the EDF
   feasibility test gives the fewest prompt tokens this step that keeps every feasible prompt on time
   (max over i of work_i - (steps_i - 1) x room), or a prompt that ends in this step is due before a
   step carrying every decode would end but not before the lean step (every decode that can wait
   waiting) would, and that step is predicted shorter (what prefill-first gets right). Only then are
   decodes deferred, those already lost first (their gap EMA went above 1 / R or their first token
   was late), then those that can take one more step: the gap if served next step (now + 2T - last
   token) stays within 1 / R itself and keeps the EMA within `margin` / R, most slack first. A decode
   whose next gap would break its bound is never deferred, so no deferral is predicted to make an
   inter-token gap longer than the bound (on a CPU whose full step is longer than 1 / (2R), a decode
   is never deferred beside a full step: the tail of the token gaps stays SplitFuse's).

Predictions start where the composed step will: after the steps in flight (with overlap, step N+1
is composed as step N starts, so the scheduler passes N's predicted seconds as `ahead`, and a decode
that N serves gets its token then, `in_flight`), and a step of n tokens is predicted at the token
bucket the engine will pad it to and at its n real rows (the step-time model learns how much each
costs on this device). Planning as if the step started when it
was composed puts every prediction a step early (docs/benchmarks/sla_policy.md, section 2).

Guarantees (what replaces "decodes first" for this policy):
  - a decode is deferred at most `max_skips` steps in a row;
  - a prompt is passed over (gets no token while it could) at most `max_pass_over` steps in a row
    before it is served first, in arrival order: each such running prefill gets at least one token
    in that step (the scheduler reserves one token for each, and the budget always holds every
    running sequence), and such a waiting prompt blocks every later admission until it is admitted,
    exactly as first-come first-served admission does. So every request still finishes.

Per-request SLAs (`RequestSLA`: a priority, and the request's own P and R) replace the engine's
defaults where given. With a prefix cache the scheduler passes each waiting prompt's uncached
remainder, so predictions count only the tokens that will be computed.

What the policy knows of a request is its `RequestTiming` (`engine.timing`: the one record the
budget controller and the server read too), on its sequence; the policy's own counters (skips, steps
passed over, slack at admission) live there as well. Times come from the scheduler's clock
(`time.monotonic` in the engine, the server's clock, so the server can pass the time a request really
arrived; a simulated one in tests). numpy only, like all of `fastgen_jax.engine`.

With overlap scheduling (step N+1 composed while step N runs), a deferred decode gets no token in
step N: a composer must not assume it has one in step N+1; its record's skip count says so.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Hashable

from fastgen_jax.engine.timing import ALPHA, RequestSLA, RequestTiming
from fastgen_jax.sla import ema_update

# A step is kept short enough for every served decode's gap EMA to stay within this share of 1 / R
# (a looser margin than for deferring a decode: a cut step costs prompts a bucket's worth of tokens;
# on the simulated CPU of scripts/simulate_policies.py 0.9 cost 6% of the requests within the SLA at 8
# clients where a full step takes 0.46 s against a 0.5 s bound, and 0.95 nothing).
STEP_MARGIN = 0.95
# A first gap alone seeds the gap EMA, so a step that overruns its prediction beside a fresh decode
# loses that request: its step is kept this many times the model's recent RMS error shorter
# (`StepTimeModel.error`). Later gaps move the EMA by 1 / 8.5 of an overrun, and take no margin.
FIRST_GAP_ERRORS = 2.0

__all__ = ["Composition", "PromptCandidate", "PromptChoice", "RequestSLA", "RequestTiming", "SlaComposer"]


@dataclasses.dataclass(frozen=True)
class PromptCandidate:
    key: Hashable  # the scheduler's handle (a Sequence)
    record: RequestTiming
    remaining: int  # prompt tokens still to compute (the uncached remainder)
    running: bool  # a started prefill (pages held) rather than a waiting prompt


@dataclasses.dataclass(frozen=True)
class PromptChoice:
    key: Hashable
    urgent: bool  # passed over `max_pass_over` steps: goes first, and a waiting one blocks admissions


@dataclasses.dataclass
class Composition:
    """The policy's answer: decodes to run and to defer, then prompts in the order to serve them."""

    decodes: list[Hashable]
    deferred: list[Hashable]
    prompts: list[PromptChoice]
    records: dict[Hashable, RequestTiming] = dataclasses.field(default_factory=dict)  # of the decodes


class SlaComposer:
    """Orders a step's candidates by SLA slack (see the module docstring)."""

    def __init__(
        self,
        model,
        clock: Callable[[], float],  # the scheduler's, which every request's timing is on
        margin: float = 0.9,
        max_skips: int = 4,
        max_pass_over: int = 8,
    ):
        if max_skips < 0 or max_pass_over < 0 or not 0 < margin <= 1:
            raise ValueError(f"bad SLA policy settings: {max_skips=}, {max_pass_over=}, {margin=}")
        # a StepTimeModel (predict(bucket, pairs, tokens) -> seconds), or None: set by the owner
        self.model = model
        self.clock = clock
        self.margin = margin
        self.max_skips = max_skips
        self.max_pass_over = max_pass_over
        self.deferred_decodes = 0  # decode steps deferred, in all
        self.prompts_past_deadline = 0  # requests with a prompt chunk scheduled past its deadline

    # -- composing --------------------------------------------------------------------------------

    def step_seconds(self, bucket: int, pairs: float, tokens: int | None = None) -> float:
        """Predicted seconds of a step padded to `bucket` holding `tokens` real ones (all of them
        when None; 0 while nothing is known)."""
        return 0.0 if self.model is None else max(0.0, self.model.predict(bucket, pairs, tokens))

    def compose(
        self,
        decodes: list[tuple[Hashable, RequestTiming]],
        prompts: list[PromptCandidate],
        budget: int,
        step_seconds: Callable[[int], float],
        ahead: float = 0.0,
        in_flight: Collection[Hashable] = (),
    ) -> Composition:
        """Chooses this step's work: `decodes` want one token each, `prompts` their remainders, in a
        step of at most `budget` tokens; a step of n tokens is predicted to take step_seconds(n). The
        step starts `ahead` seconds from now (the steps in flight, with overlap), when the decodes in
        `in_flight` get the token those steps bring them."""
        now = self.clock() + ahead
        work = sum(p.remaining for p in prompts)
        full = step_seconds(min(budget, len(decodes) + work))  # every decode served
        deferrable = self._deferrable(decodes, now, full, in_flight)
        room = budget - len(decodes) + len(deferrable)  # for prompts, when every deferrable decode waits
        lean = step_seconds(min(budget, budget - room + work))
        finish = _Finish(step_seconds, budget, budget - room, work)
        feasible, hopeless, urgent = self._triage(prompts, finish, now)
        shortfall = _prompt_tokens_needed(feasible, room, now, lean) - (budget - len(decodes))
        if _first_token_needs_lean_step(feasible, budget - len(decodes), now, full, lean):
            shortfall = len(deferrable)
        deferred = set(deferrable[: max(shortfall, 0)])
        ranked = feasible + hopeless
        if not deferred and _arrival_order_suffices(
            feasible, ranked, _Finish(step_seconds, budget, len(decodes), work), now
        ):
            ranked.sort(key=_by_arrival)  # SplitFuse's order already lands every prompt that can land
        order = [PromptChoice(p.key, True) for p in urgent]
        order += [PromptChoice(p.key, False) for p in ranked]
        return Composition(
            [key for key, _ in decodes if key not in deferred],
            [key for key, _ in decodes if key in deferred],
            order,
            dict(decodes),
        )

    def longest_step(
        self,
        decodes: list[tuple[Hashable, RequestTiming]],
        start: float,
        in_flight: Collection[Hashable] = (),
        shortest: float = 0.0,
    ) -> float:
        """The longest a step starting at `start` may take for each of `decodes` (those that can join
        it) to keep its gap EMA within `STEP_MARGIN` / R: its first gap seeds the EMA, so it alone
        must be within the bound, less `FIRST_GAP_ERRORS` x the model's error, but never less than
        `shortest` (inf: no limit). Decodes already lost, and those whose gap would break even a step
        of `shortest` seconds (the least the step can be), do not limit it. The scheduler keeps the
        step's budget to the most tokens predicted to fit, before the composer fills it, so deferrals
        are decided within that budget."""
        now, longest = start, math.inf
        first_margin = 0.0 if self.model is None else FIRST_GAP_ERRORS * self.model.error
        for key, r in decodes:
            if r.missed:
                continue
            ema, last = _after_in_flight(r, now, key in in_flight)
            if last is None:
                continue
            bound = STEP_MARGIN * r.max_gap
            gap = bound if ema is None else (bound - (1 - ALPHA) * ema) / ALPHA
            if (slack := gap - (now - last)) >= shortest:  # the margin narrows it, never drops it
                longest = min(longest, max(slack - (first_margin if ema is None else 0.0), shortest))
        return longest

    def _triage(self, prompts: list[PromptCandidate], finish: _Finish, now: float):
        """(feasible by priority then deadline, hopeless by priority then arrival, urgent by arrival)."""
        urgent = sorted((p for p in prompts if p.record.passed_over >= self.max_pass_over), key=_by_arrival)
        rest = [p for p in prompts if p.record.passed_over < self.max_pass_over]
        feasible, hopeless, work = [], [], 0
        for p in sorted(rest, key=lambda p: (p.record.sla.priority, p.record.due())):
            if finish.seconds(work + p.remaining) <= p.record.due() - now and not p.record.missed:
                feasible.append(p)
                work += p.remaining
            else:
                hopeless.append(p)
        hopeless.sort(key=lambda p: (p.record.sla.priority, p.record.arrival))
        return feasible, hopeless, urgent

    def _deferrable(
        self, decodes: list[tuple[Hashable, RequestTiming]], now: float, step: float, in_flight: Collection
    ) -> list:
        """Keys of the decodes that may wait a step, lost ones first, then most slack first."""
        if step <= 0:
            return []
        candidates = []
        for i, (key, r) in enumerate(decodes):
            if r.skips >= self.max_skips:
                continue
            if r.missed:
                candidates.append((-math.inf, i, key))
            elif (slack := self._slack_after_skip(r, now, step, key in in_flight)) >= 0:
                candidates.append((-slack, i, key))
        return [key for *_, key in sorted(candidates, key=lambda c: c[:2])]

    def _slack_after_skip(self, r: RequestTiming, now: float, step: float, pending: bool) -> float:
        """How far under `margin` / R the gap EMA stays, and under 1 / R the gap itself, if the token
        comes a step later (< 0: one breaks). `pending`: a step in flight brings it a token at `now`."""
        ema, last = _after_in_flight(r, now, pending)
        if last is None:
            return -1.0
        gap = now + 2 * step - last
        return min(self.margin * r.max_gap - ema_update(ema, gap, ALPHA), r.max_gap - gap)

    # -- after the scheduler served the composition -----------------------------------------------

    def served(
        self, composition: Composition, prompts: list[PromptCandidate], given: set, now: float
    ) -> None:
        """Updates skip and pass-over counts: `given` holds the keys of the prompts that got tokens."""
        for key in composition.decodes:
            composition.records[key].skips = 0
        for key in composition.deferred:
            composition.records[key].skips += 1
        self.deferred_decodes += len(composition.deferred)
        for p in prompts:
            r = p.record
            if p.key not in given:
                r.passed_over += 1
                continue
            r.passed_over = 0
            if not r.late and r.last is None and now > r.deadline:
                r.late = True
                self.prompts_past_deadline += 1

    def admitted(self, record: RequestTiming, remaining: int, room: int, step: float) -> None:
        """Notes a prompt's slack when it is first admitted: deadline - now - predicted prefill time."""
        if record.admission_slack is None:
            predicted = _steps_for(remaining, max(room, 1)) * step
            record.admission_slack = record.deadline - self.clock() - predicted


@dataclasses.dataclass(frozen=True)
class _Finish:
    """Predicts when prompt work is done: served first, `budget - fixed` prompt tokens a step beside
    `fixed` decode tokens, in full steps, then one step holding the rest and as much of the other
    prompts' work (`total`) as fits. (A last step that is not full is shorter: at 4 clients on a CPU,
    a prompt's last chunk often runs in a step a quarter as long as a full one.)"""

    step_seconds: Callable[[int], float]
    budget: int
    fixed: int
    total: int

    def seconds(self, work: int) -> float:
        room = self.budget - self.fixed
        if room <= 0:
            return 0.0 if work == 0 else math.inf
        full, rest = divmod(work, room)
        last = self.step_seconds(min(self.budget, self.fixed + rest + self.total - work)) if rest else 0.0
        return full * self.step_seconds(self.budget) + last


def _after_in_flight(r: RequestTiming, now: float, pending: bool) -> tuple[float | None, float | None]:
    """A decode's gap EMA and last token time once the step in flight brings it a token at `now`
    (`pending`), else as they are."""
    if not pending:
        return r.ema, r.last
    return (r.ema if r.last is None else ema_update(r.ema, now - r.last, ALPHA)), now


def _by_arrival(p: PromptCandidate) -> float:
    return p.record.arrival


def _arrival_order_suffices(
    feasible: list[PromptCandidate], prompts: list[PromptCandidate], finish: _Finish, now: float
) -> bool:
    """Whether serving `prompts` in arrival order (SplitFuse's) is predicted to land every feasible
    one with a full step to spare (against the step-time model's error): then earliest-deadline order
    would only reorder for nothing."""
    keep, work, spare = {id(p) for p in feasible}, 0, finish.step_seconds(finish.budget)
    for p in sorted(prompts, key=_by_arrival):
        work += p.remaining
        if id(p) in keep and finish.seconds(work) + spare > p.record.due() - now:
            return False
    return True


def _steps_for(tokens: int, room: int) -> int:
    return -(-tokens // room) if room > 0 else (0 if tokens == 0 else 1 << 30)


def _first_token_needs_lean_step(
    feasible: list[PromptCandidate], room: int, now: float, full: float, lean: float
) -> bool:
    """Whether a prompt that ends in this step is due before a step with every decode would end but
    not before the lean step (every decode that can wait waiting) would: only then do the decodes
    that can wait wait, to make the step shorter. Not when the lean step is predicted no shorter (the
    other prompts fill the room the decodes leave, or the step stays in its token bucket)."""
    if lean >= full:
        return False
    work = 0
    for p in feasible:
        work += p.remaining
        if work > room:
            return False
        if now + lean <= p.record.due() < now + full:
            return True
    return False


def _prompt_tokens_needed(feasible: list[PromptCandidate], room: int, now: float, step: float) -> int:
    """The fewest prompt tokens this step that keep every feasible prompt on time, if every later step
    gives prompts `room` tokens (EDF: the i-th needs the work up to it done within its whole steps)."""
    if step <= 0:
        return 0
    need, work = 0, 0
    for p in sorted(feasible, key=lambda p: p.record.due()):
        work += p.remaining
        steps = max(1, math.floor((p.record.due() - now) / step))
        need = max(need, work - (steps - 1) * room)
    return need
