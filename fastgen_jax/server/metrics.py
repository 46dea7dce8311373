"""Prometheus metrics for `GET /metrics`, in a registry of the server's own.

Queue, KV-page and token counts are read from the engines' stats at scrape time (each engine thread
keeps them current after every step and every add or abort): unlabelled families are the sums over
the replicas, and `fastgen_replica_*{replica="i"}` families give each replica's own figures, including
the outstanding work the load balancer compares and how many requests it was sent. Latency histograms
are observed by the engine threads as each request finishes: time to first token, time per output
token after the first, end-to-end latency. Names follow vLLM's, with the `fastgen_` prefix.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from fastgen_jax.output_processor import RequestOutput
from fastgen_jax.server.async_engine import AsyncEngine

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_GAP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


def _figures(r: AsyncEngine) -> tuple[dict, dict]:
    """(gauges, counters) of one replica: name -> (help, value)."""
    s = r.engine.stats
    used = s.total_pages - s.free_pages
    gauges = {
        "requests_running": ("Requests with KV pages in the engine", s.running),
        "requests_waiting": ("Requests queued for their first pass", s.waiting),
        "requests_in_flight": ("Requests admitted by the server and not finished", r.num_outstanding),
        "kv_pages_used": ("KV pages holding tokens", used),
        "kv_pages_total": ("KV pages in the pool", s.total_pages),
    }
    counters = {
        "preemptions": ("Sequences evicted to free KV pages", s.preemptions),
        "prompt_tokens": ("Prompt tokens computed (recomputed ones count again)", s.prompt_tokens),
        "generation_tokens": ("Tokens generated", s.generation_tokens),
        "steps": ("Forward passes run", s.steps),
    }
    return gauges, counters


_PER_REPLICA = (
    "requests_running",
    "requests_waiting",
    "requests_in_flight",
    "kv_pages_used",
    "generation_tokens",
)


class _EngineCollector:
    def __init__(self, replicas: list[AsyncEngine]):
        self.replicas = replicas

    def collect(self):
        figures = [_figures(r) for r in self.replicas]  # [(gauges, counters)] per replica
        for kind, family in ((0, GaugeMetricFamily), (1, CounterMetricFamily)):
            for name, (doc, _) in figures[0][kind].items():
                total = sum(f[kind][name][1] for f in figures)
                yield family(f"fastgen_{name}", doc, value=total)
                if name in _PER_REPLICA:
                    metric = family(f"fastgen_replica_{name}", f"{doc}, per replica", labels=["replica"])
                    for i, f in enumerate(figures):
                        metric.add_metric([str(i)], f[kind][name][1])
                    yield metric
        used = sum(f[0]["kv_pages_used"][1] for f in figures)
        total = sum(f[0]["kv_pages_total"][1] for f in figures)
        usage = used / max(total, 1)
        yield GaugeMetricFamily("fastgen_kv_cache_usage", "Fraction of KV pages in use", value=usage)
        work = GaugeMetricFamily(
            "fastgen_replica_outstanding_work_tokens",
            "Tokens the replica's admitted requests still need (what the load balancer compares)",
            labels=["replica"],
        )
        routed = CounterMetricFamily(
            "fastgen_replica_requests_routed",
            "Requests the load balancer sent to the replica",
            labels=["replica"],
        )
        for i, r in enumerate(self.replicas):
            work.add_metric([str(i)], r.outstanding_work)
            routed.add_metric([str(i)], r.routed)
        yield work
        yield routed


class ServerMetrics:
    def __init__(self, replicas: list[AsyncEngine]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(replicas))
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
