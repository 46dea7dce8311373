"""Prometheus metrics for `GET /metrics`, in a registry of the server's own.

Queue, KV-page and token counts are read from the engine's stats at scrape time (the engine thread
keeps them current after every step and every add or abort). Latency histograms are observed by the
engine thread as each request finishes: time to first token, time per output token after the first,
end-to-end latency. Names follow vLLM's, with the `fastgen_` prefix.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from fastgen_jax.llm_engine import LLMEngine
from fastgen_jax.output_processor import RequestOutput

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_GAP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


class _EngineCollector:
    def __init__(self, engine: LLMEngine, in_flight):
        self.engine, self.in_flight = engine, in_flight

    def collect(self):
        s = self.engine.stats
        used = s.total_pages - s.free_pages
        gauges = {
            "requests_running": ("Requests with KV pages in the engine", s.running),
            "requests_waiting": ("Requests queued for their first pass", s.waiting),
            "requests_in_flight": ("Requests admitted by the server and not finished", self.in_flight()),
            "kv_pages_used": ("KV pages holding tokens", used),
            "kv_pages_total": ("KV pages in the pool", s.total_pages),
            "kv_cache_usage": ("Fraction of KV pages in use", used / max(s.total_pages, 1)),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"fastgen_{name}", doc, value=value)
        counters = {
            "preemptions": ("Sequences evicted to free KV pages", s.preemptions),
            "prompt_tokens": ("Prompt tokens computed (recomputed ones count again)", s.prompt_tokens),
            "generation_tokens": ("Tokens generated", s.generation_tokens),
            "steps": ("Forward passes run", s.steps),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"fastgen_{name}", doc, value=value)


class ServerMetrics:
    def __init__(self, engine: LLMEngine, in_flight):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, in_flight))
        self.ttft = Histogram(
            "fastgen_time_to_first_token_seconds",
            "From arrival to the first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "fastgen_time_per_output_token_seconds",
            "Mean gap between generated tokens after the first, per request",
            buckets=_TOKEN_GAP_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "fastgen_e2e_request_latency_seconds",
            "From arrival to the last token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.finished = Counter(
            "fastgen_requests_finished",
            "Requests finished, by reason (stop, length, abort)",
            ["finish_reason"],
            registry=self.registry,
        )

    def request_finished(self, arrival: float, first_token: float | None, out: RequestOutput, now: float):
        self.finished.labels(out.finish_reason or "abort").inc()
        if first_token is None:
            return
        self.ttft.observe(first_token - arrival)
        self.e2e.observe(now - arrival)
        if out.generated_length > 1:
            self.tpot.observe((now - first_token) / (out.generated_length - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
