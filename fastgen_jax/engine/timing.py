"""One request's SLA and its timing: the one record every part of the engine reads.

`RequestTiming` lives on the request's `Sequence` (`seq.timing`, set by `Scheduler.add`). The
scheduler writes each token's time into it once, on the engine's clock (`time.monotonic`, or a
simulated clock in tests), and everything that judges or protects the SLA reads it from there: the
budget controller (how long the next step may take), the SLA composer (who can wait), and the server
(the request's first-token time and gaps, from the record its final `RequestOutput` carries). Nothing
keeps a second map of request ids to times. numpy-free, jax-free.
"""

from __future__ import annotations

import dataclasses

from fastgen_jax.sla import ema_alpha, ema_update

EMA_SPAN = 16  # of token gaps, as FastGen's SLA judges them (`fastgen_jax.sla.SLA`)


@dataclasses.dataclass(frozen=True)
class RequestSLA:
    """One request's SLA: first token within prompt_tokens / prompt_rate s, token-gap EMA within
    1 / token_rate s. A lower `priority` is served earlier among the prompts that can still meet
    their deadline (vLLM's convention; default 0)."""

    prompt_rate: float = 512.0
    token_rate: float = 4.0
    priority: int = 0

    def __post_init__(self):
        if not (self.prompt_rate > 0 and self.token_rate > 0):
            raise ValueError(f"SLA rates must be positive, got {self.prompt_rate=}, {self.token_rate=}")


@dataclasses.dataclass
class RequestTiming:
    """When a request arrived, when each of its tokens came, and what that means for its SLA."""

    sla: RequestSLA
    arrival: float  # when its SLA's clock started (e.g. when the server received it)
    deadline: float  # when its first token is due: arrival + prompt_tokens / P
    token_times: list[float] = dataclasses.field(default_factory=list)  # one per token handed out
    ema: float | None = None  # EMA (span EMA_SPAN) of its token gaps
    missed: bool = False  # the SLA is lost for it: a late first token, or the gap EMA above 1 / R
    # kept by the SLA composer (policy "sla") only
    skips: int = 0  # decode steps deferred in a row
    passed_over: int = 0  # steps in a row it was a prompt candidate and got no token
    admission_slack: float | None = None  # deadline - now - predicted prefill time, at admission
    late: bool = False  # a chunk of its prompt was scheduled past its deadline

    @classmethod
    def start(cls, sla: RequestSLA, arrival: float, prompt_tokens: int) -> RequestTiming:
        return cls(sla, arrival, arrival + prompt_tokens / sla.prompt_rate)

    @property
    def max_gap(self) -> float:
        """The bound on the gap EMA: 1 / R."""
        return 1.0 / self.sla.token_rate

    @property
    def last(self) -> float | None:
        """When its last token came (None before the first)."""
        return self.token_times[-1] if self.token_times else None

    def due(self) -> float:
        """When its next token is due: the first-token deadline, or (a preempted request
        recomputing its tokens) its last token plus the gap bound."""
        return self.deadline if not self.token_times else self.token_times[-1] + self.max_gap

    def tokens(self, count: int, now: float) -> None:
        """Notes `count` tokens that came at `now` (a step's later tokens, accepted speculative
        drafts, come with no gap)."""
        for _ in range(count):
            if not self.token_times:
                self.missed |= now > self.deadline
            else:
                self.ema = ema_update(self.ema, now - self.token_times[-1], ALPHA)
                self.missed |= self.ema > self.max_gap
            self.token_times.append(now)


ALPHA = ema_alpha(EMA_SPAN)
