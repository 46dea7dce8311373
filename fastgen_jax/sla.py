"""The service-level agreement (SLA) of FastGen's effective throughput, judged the same way everywhere:
by the benchmark on the chunk times a client saw, and by the server on the times it emitted tokens.

A request meets the SLA when both parts hold:

  prompt:     its first token came within prompt_tokens / prompt_rate seconds of its arrival
              (FastGen: prompt_rate 512 tokens/s);
  generation: the exponential moving average (span 16, alpha = 2 / (span + 1), seeded with the first
              gap) of its inter-token gaps never exceeds 1 / token_rate seconds
              (FastGen: token_rate 2, 4 or 6 tokens/s).

Pure Python: no numpy needed, no jax, no HTTP.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


def ema_series(values: Sequence[float], span: int) -> list[float]:
    """Exponential moving average with alpha = 2 / (span + 1), seeded with the first value."""
    alpha, out = ema_alpha(span), []
    for v in values:
        out.append(ema_update(out[-1] if out else None, v, alpha))
    return out


def ema_update(previous: float | None, value: float, alpha: float) -> float:
    """The next EMA after `value`; the first value seeds it."""
    return value if previous is None else alpha * value + (1 - alpha) * previous


def ema_alpha(span: int) -> float:
    return 2.0 / (span + 1)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Which parts of the SLA one request met."""

    prompt: bool
    generation: bool

    @property
    def both(self) -> bool:
        return self.prompt and self.generation

    def parts(self) -> dict[str, bool]:
        return {"prompt": self.prompt, "generation": self.generation, "both": self.both}


@dataclasses.dataclass(frozen=True)
class SLA:
    prompt_rate: float = 512.0  # tokens/s of prompt the first token may take
    token_rate: float = 4.0  # generated tokens/s the EMA of token gaps must keep up with
    ema_span: int = 16

    def __post_init__(self):
        if self.prompt_rate <= 0 or self.token_rate <= 0 or self.ema_span < 1:
            raise ValueError(f"SLA rates and span must be positive: {self}")

    @property
    def max_token_gap(self) -> float:
        """Seconds the EMA of token gaps may reach."""
        return 1.0 / self.token_rate

    def judge(self, arrival: float, prompt_tokens: int, token_times: Sequence[float]) -> Verdict:
        """The verdict for a request that arrived at `arrival` and got tokens at `token_times` (at
        least one; the same clock)."""
        if not token_times:
            raise ValueError("a request with no token cannot be judged")
        prompt = token_times[0] - arrival <= prompt_tokens / self.prompt_rate
        gaps = [b - a for a, b in zip(token_times, token_times[1:], strict=False)]
        ema = ema_series(gaps, self.ema_span)
        return Verdict(prompt, not ema or max(ema) <= self.max_token_gap)

    def met(self, record) -> bool:
        """Whether a benchmark `RequestRecord` (send time, chunk times, prompt tokens) meets both parts;
        a failed request never does."""
        return record.ok and self.judge(record.send_time, record.prompt_tokens, record.chunk_times).both
