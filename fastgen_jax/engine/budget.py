"""The adaptive token budget (`--token_budget=auto`): each step's budget, chosen among the compiled ones.

A bigger budget moves prompts faster (first tokens sooner, more throughput) but makes the step longer,
and every decoding sequence waits that long for its next token. The SLA bounds that wait through the
EMA (span 16) of each request's token gaps: at most 1 / R seconds (`fastgen_jax.sla`). So before each
step the controller

1. predicts the step's seconds for every token bucket from an online model (`StepTimeModel`): least
   squares of measured step seconds on [1, bucket tokens, real tokens, attended (query, key) pairs],
   weighted towards recent steps, so it follows a load change or a machine that slows down; warm-up
   timings of each bucket may seed it, but nothing needs profiling offline. Both sizes count because
   the devices differ: an accelerator's step costs its padded bucket, while the CPU kernels multiply
   only a slab's real rows, so there a half-filled bucket costs about half a full one;
2. works out the longest gap every decoding sequence can take, from the request's timing record
   (`engine.timing`, the one the SLA judge and the server read): a sequence whose gap EMA is e can
   take a gap g with alpha * g + (1 - alpha) * e <= margin / R, one with no gap yet g <= margin / R
   (R its own token rate), and a sequence that already missed its SLA does not count (its EMA went
   above 1 / R, or its first token came later than prompt_tokens / P after it arrived: slowing steps
   for it would delay prompts and buy nothing); never more than `max_burst` x margin / R, so
   a step that runs longer than predicted cannot cost much (and the choice settles on the buckets
   either side of margin / R instead of swinging between the smallest and the largest);
3. picks the largest bucket predicted to fit that gap (moving up needs `hysteresis` of slack, so
   noise does not flip it), the smallest bucket with room beside the decodes when none fits, and the
   largest bucket when nothing is decoding.

It only ever picks from `token_buckets`, so nothing new is compiled. numpy only, like all of
`fastgen_jax.engine`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from fastgen_jax.engine.scheduler import SchedulerOutput, attended_pairs, step_pairs
from fastgen_jax.engine.sequence import Sequence as Seq
from fastgen_jax.engine.timing import ALPHA, RequestTiming
from fastgen_jax.sla import ema_alpha, ema_update

ERROR_SPAN = 16  # steps the model's recent prediction error spans


def observe_step(model: StepTimeModel, bucket: int, step: SchedulerOutput, seconds: float) -> None:
    """Teaches `model` a finished step: padded to `bucket`, its real tokens and attended pairs."""
    model.observe(bucket, step_pairs(step.scheduled), seconds, step.num_tokens)


class _Moments:
    """Exponentially weighted sums x x^T and x t of a least-squares fit."""

    def __init__(self, dim: int, forgetting: float):
        self.forgetting = forgetting
        self.gram = np.zeros((dim, dim))
        self.moment = np.zeros(dim)

    def add(self, x: np.ndarray, t: float) -> None:
        self.gram = self.forgetting * self.gram + np.outer(x, x)
        self.moment = self.forgetting * self.moment + x * t

    def solve(self, ridge: float, prior: np.ndarray) -> np.ndarray:
        return np.linalg.solve(self.gram + ridge * np.eye(len(prior)), self.moment + ridge * prior)


class StepTimeModel:
    """Step seconds ~ theta . [1, bucket / scale, tokens / scale, pairs / scale^2], fitted online.

    `bucket` is the slab's padded size (what an accelerator's step costs), `tokens` its real rows
    (what the CPU kernels' matmuls cost; a full step's when not given). The engine's warm-up seeds it
    with each bucket timed full and with no real row, which tells the two apart from the start;
    with full steps only, the fit splits their weight (a half-filled bucket is predicted between the
    two devices' costs) until part-filled steps settle it.

    Two fits: every step ever seen (the prior) and recent steps (forgetting factor `forgetting`, about
    1 / (1 - forgetting) steps of memory) regularized towards the prior, so a bucket that has not run
    lately is still predicted from what was learnt of it before. `error` is the root mean square of
    seconds - prediction over recent steps (an EMA of span `ERROR_SPAN`, each step predicted before
    it was learnt; from the `DIM`-th step on, when the fit is first determined; warm-up seeds do not
    count), for callers that
    need a margin: a square so that the rare step a busy machine makes much slower than its kind
    (a shared CPU's neighbours, the server's own threads) widens it more than steady jitter does.
    """

    DIM = 4

    def __init__(self, token_scale: int, forgetting: float = 0.95, ridge: float = 0.5):
        self.token_scale = float(token_scale)
        self.ridge = ridge
        self._all = _Moments(self.DIM, 1.0)
        self._recent = _Moments(self.DIM, forgetting)
        self._theta: np.ndarray | None = np.zeros(self.DIM)
        self.observed = 0
        self._square_error: float | None = None

    def features(self, bucket: int, pairs: float, tokens: int | None = None) -> np.ndarray:
        scale = self.token_scale
        real = bucket if tokens is None else min(tokens, bucket)
        return np.array([1.0, bucket / scale, real / scale, pairs / scale**2])

    def observe(
        self, bucket: int, pairs: float, seconds: float, tokens: int | None = None, seed: bool = False
    ) -> None:
        """Learns a step. A `seed` (a warm-up timing, not a served step) does not count in `error`."""
        if self.observed >= self.DIM and not seed:
            miss = abs(seconds - self.predict(bucket, pairs, tokens))
            self._square_error = ema_update(self._square_error, miss * miss, ema_alpha(ERROR_SPAN))
        self.observed += 1
        x = self.features(bucket, pairs, tokens)
        self._all.add(x, seconds)
        self._recent.add(x, seconds)
        self._theta = None

    def seed(self, bucket: int, full_seconds: float, empty_seconds: float) -> None:
        """A warm-up timing of `bucket`: a step with every row real, and one with none (no context
        either way), so the fit tells padding from real rows from the start."""
        self.observe(bucket, 0, full_seconds, bucket, seed=True)
        self.observe(bucket, 0, empty_seconds, 0, seed=True)

    @property
    def error(self) -> float:
        """Recent root-mean-square prediction error, in seconds (see the class docstring)."""
        return 0.0 if self._square_error is None else math.sqrt(self._square_error)

    def predict(self, bucket: int, pairs: float, tokens: int | None = None) -> float:
        """Seconds of a step padded to `bucket` with `tokens` real rows (all of them when None)."""
        if self._theta is None:
            prior = self._all.solve(1e-6, np.zeros(self.DIM))
            self._theta = self._recent.solve(self.ridge, prior)
        return float(self.features(bucket, pairs, tokens) @ self._theta)


class BudgetController:
    """Chooses each step's token budget (see the module docstring)."""

    def __init__(
        self,
        buckets: Sequence[int],
        margin: float = 0.85,
        hysteresis: float = 0.1,
        max_burst: float = 2.0,
        model: StepTimeModel | None = None,
    ):
        self.buckets = tuple(sorted(buckets))
        self.margin = margin
        self.hysteresis = hysteresis
        self.max_burst = max_burst
        self.model = model or StepTimeModel(self.buckets[-1])
        self.budget = self.buckets[-1]
        self.changes = 0

    # -- choosing ---------------------------------------------------------------------------------

    def allowed_gap(self, timings: Iterable[RequestTiming]) -> float:
        """The longest next gap that keeps every listed request's gap EMA within `margin` / R (its
        own R; inf when none of them can still meet its SLA)."""
        allowed, tightest = math.inf, math.inf
        for t in timings:
            if t.missed:
                continue
            target = self.margin * t.max_gap
            tightest = min(tightest, target)
            if t.ema is None:
                allowed = min(allowed, target)
            else:
                allowed = min(allowed, (target - (1 - ALPHA) * t.ema) / ALPHA)
        return allowed if allowed == math.inf else min(allowed, self.max_burst * tightest)

    def choose(self, num_decodes: int, decode_pairs: int, prompt_start: int, allowed_gap: float) -> int:
        """The budget of the next step: `num_decodes` sequences decode (attending `decode_pairs`
        pairs), and the prompt to continue has `prompt_start` tokens computed already."""
        if num_decodes == 0 or allowed_gap == math.inf:
            return self._set(self.buckets[-1])
        room = [b for b in self.buckets if b > num_decodes] or [self.buckets[-1]]
        fitting = [b for b in room if self._fits(b, num_decodes, decode_pairs, prompt_start, allowed_gap)]
        return self._set(fitting[-1] if fitting else room[0])

    def choose_for(self, running: Iterable[Seq]) -> int:
        """`choose` for the scheduler's running sequences."""
        decoding, prompt_start = [], None
        for seq in running:
            if not seq.is_prefilling:
                decoding.append(seq)
            elif prompt_start is None:
                prompt_start = seq.num_computed_tokens
        pairs = sum(s.num_computed_tokens + 1 for s in decoding)
        allowed = self.allowed_gap(s.timing for s in decoding)
        return self.choose(len(decoding), pairs, prompt_start or 0, allowed)

    def _fits(self, bucket: int, num_decodes: int, decode_pairs: int, prompt_start: int, gap: float) -> bool:
        """Whether a full step of `bucket` tokens is predicted to fit `gap` (with hysteresis upwards)."""
        pairs = decode_pairs + attended_pairs(bucket - num_decodes, prompt_start)
        seconds = self.model.predict(bucket, pairs)
        slack = 1 + self.hysteresis if bucket > self.budget else 1.0
        return seconds * slack <= gap

    def _set(self, budget: int) -> int:
        self.changes += budget != self.budget
        self.budget = budget
        return budget
