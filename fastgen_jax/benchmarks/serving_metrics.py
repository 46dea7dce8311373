"""Serving metrics from per-request timelines, as FastGen and `vllm bench serve` report them.

A `RequestRecord` holds when a request was sent, when each streamed chunk arrived, and its token
counts. `summarize(records, wall_seconds, sla)` gives throughput, latency percentiles, time to first
token (TTFT), time per output token (TPOT: (end - first token) / (output tokens - 1)), inter-token
latency (ITL: gaps between chunk arrivals) and FastGen's **effective throughput**: requests per second
times the fraction that meet the SLA (`fastgen_jax.sla`, the definition the server's /metrics judges
by too): TTFT <= prompt_tokens / prompt_rate and the EMA (span 16) of inter-token latencies <=
1 / token_rate.

Pure Python and numpy: no jax, no HTTP; the unit tests feed it hand-made timelines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from fastgen_jax.sla import SLA, ema_series

__all__ = ["SLA", "RequestRecord", "ema_series", "percentile", "summarize"]


@dataclasses.dataclass
class RequestRecord:
    send_time: float
    chunk_times: list[float]  # arrival of each streamed chunk that carried tokens
    prompt_tokens: int
    output_tokens: int
    end_time: float | None = None  # when the response ended (defaults to the last chunk)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.send_time

    @property
    def latency(self) -> float:
        end = self.end_time if self.end_time is not None else self.chunk_times[-1]
        return end - self.send_time

    @property
    def itls(self) -> list[float]:
        return list(np.diff(self.chunk_times)) if len(self.chunk_times) > 1 else []

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile by linear interpolation (numpy's default); None for no values."""
    return float(np.percentile(np.asarray(values, np.float64), q)) if len(values) else None


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def summarize(records: Sequence[RequestRecord], wall_seconds: float, sla: SLA) -> dict[str, float | None]:
    """One benchmark point: every figure FastGen and vLLM report, over the measured requests."""
    done = [r for r in records if r.ok]
    latencies = [r.latency for r in done]
    ttfts = [r.ttft for r in done]
    tpots = [t for r in done if (t := r.tpot) is not None]
    itls = [gap for r in done for gap in r.itls]
    verdicts = [sla.judge(r.send_time, r.prompt_tokens, r.chunk_times) for r in done]
    met = sum(v.both for v in verdicts)
    rps = len(done) / wall_seconds if wall_seconds > 0 else 0.0
    summary = {
        "requests": len(records),
        "failed": len(records) - len(done),
        "wall_seconds": wall_seconds,
        "throughput_rps": rps,
        "output_tokens_per_s": sum(r.output_tokens for r in done) / wall_seconds if wall_seconds > 0 else 0.0,
        "prompt_tokens_per_s": sum(r.prompt_tokens for r in done) / wall_seconds if wall_seconds > 0 else 0.0,
        "sla_fraction": met / len(records) if records else 0.0,
        "sla_prompt_fraction": sum(v.prompt for v in verdicts) / len(records) if records else 0.0,
        "sla_generation_fraction": sum(v.generation for v in verdicts) / len(records) if records else 0.0,
        "effective_throughput_rps": met / wall_seconds if wall_seconds > 0 else 0.0,
        "latency_mean": _mean(latencies),
        "ttft_mean": _mean(ttfts),
        "tpot_mean": _mean(tpots),
        "itl_mean": _mean(itls),
    }
    for name, values, qs in (
        ("latency", latencies, (50, 90, 99)),
        ("ttft", ttfts, (50, 90, 99)),
        ("tpot", tpots, (50, 90, 99)),
        ("itl", itls, (50, 95, 99)),
    ):
        for q in qs:
            summary[f"{name}_p{q}"] = percentile(values, q)
    return summary
