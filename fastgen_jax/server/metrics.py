"""Prometheus metrics for `GET /metrics`, in a registry of the server's own.

Queue, KV-page and token counts and the token budget of the last step are read from the engines'
stats at scrape time (each engine thread keeps them current after every step and every add or abort):
unlabelled families are the sums over the replicas (the budget: the largest), and
`fastgen_replica_*{replica="i"}` families give each replica's own figures, including the outstanding
work the load balancer compares, how many requests it was sent, its failed forward passes
(`fastgen_replica_step_failures_total`) and whether it is ready (`fastgen_replica_ready`).
Everything else is observed by the engine threads as each request finishes: time to first token,
time per output token after the first, end-to-end latency, the prompt and generation lengths
(`fastgen_request_prompt_tokens`, `fastgen_request_generation_tokens`: what the traffic looks like),
and the SLA verdict (`fastgen.sla`, judged on the times the server emitted the tokens):

  fastgen_sla_requests_total{part="prompt"|"generation"|"both", outcome="met"|"missed"}

counts every request that finished with "stop" or "length" once per part. Aborted requests (the client
left, or the server shut down) are not judged: they show up in
`fastgen_requests_finished_total{finish_reason="abort"}` only. SLA attainment right now is
`rate(fastgen_sla_requests_total{part="both",outcome="met"}[5m]) /
rate(fastgen_requests_judged_total[5m])`; the SLA itself is exported as `fastgen_sla_prompt_rate` and
`fastgen_sla_token_rate`. A request that set its own SLA (`priority`, `sla_prompt_rate`,
`sla_token_rate`) is judged by it, and counted in `fastgen_sla_requests_total` and, besides, in
`fastgen_sla_own_requests_total{part, outcome}`. Under `--policy=sla`,
`fastgen_sla_deferred_decodes_total` counts decode steps deferred for prompts that needed the room and
`fastgen_sla_prompts_past_deadline_total` the requests whose prompt ran past its first-token deadline.
Under `--speculative`, `fastgen_spec_decode_num_draft_tokens_total` counts the draft tokens the model
verified, `fastgen_spec_decode_num_accepted_tokens_total` those it accepted and
`fastgen_spec_decode_num_verifications_total` the sequence-steps that verified any; the mean accepted
length is `fastgen_spec_decode_mean_accepted_length` (accepted per verification, since start-up).
Names follow vLLM's, with the `fastgen_` prefix.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from fastgen_jax.engine.sla_policy import RequestSLA
from fastgen_jax.output_processor import RequestOutput
from fastgen_jax.server.async_engine import AsyncEngine
from fastgen_jax.sla import SLA, Verdict

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_GAP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
_LENGTH_BUCKETS = tuple(2**i for i in range(16))  # 1 ... 32768 tokens


def _figures(r: AsyncEngine) -> tuple[dict, dict]:
    """(gauges, counters) of one replica: name -> (help, value)."""
    s = r.engine.stats
    used = s.total_pages - s.free_pages
    gauges = {
        "requests_running": ("Requests with KV pages in the engine", s.running),
        "requests_waiting": ("Requests queued for their first pass", s.waiting),
        "requests_in_flight": ("Requests admitted by the server and not finished", r.num_outstanding),
        "kv_pages_used": ("KV pages in use by running requests", used),
        "kv_pages_cached": (
            "KV pages no request owns that hold a cached prefix (reused by later prompts, evicted when "
            "pages run out)",
            s.cached_pages,
        ),
        "kv_pages_total": ("KV pages in the pool", s.total_pages),
        "token_budget": (
            "Token budget of the last step (chosen step by step with --token_budget=auto)",
            s.token_budget,
        ),
    }
    counters = {
        "preemptions": ("Sequences evicted to free KV pages", s.preemptions),
        "prompt_tokens": ("Prompt tokens computed (recomputed ones count again)", s.prompt_tokens),
        "generation_tokens": ("Tokens generated", s.generation_tokens),
        "prefix_cache_queries": (
            "Tokens looked up in the prefix cache at admission (prompts; prompt and generated tokens "
            "of preempted requests readmitted)",
            s.prefix_cache_queries,
        ),
        "prefix_cache_hits": (
            "Tokens of those found in the prefix cache instead of computed",
            s.prefix_cache_hits,
        ),
        "steps": ("Forward passes run", s.steps),
        "token_budget_changes": (
            "Steps whose token budget differed from the step before",
            s.token_budget_changes,
        ),
        "sla_deferred_decodes": (
            "Decode steps the SLA policy deferred for prompts that needed the room",
            s.deferred_decodes,
        ),
        "sla_prompts_past_deadline": (
            "Requests whose prompt the SLA policy scheduled past its first-token deadline",
            s.prompts_past_deadline,
        ),
        "spec_decode_num_draft_tokens": (
            "Speculative decoding: draft tokens the model verified",
            s.spec_proposed_tokens,
        ),
        "spec_decode_num_accepted_tokens": (
            "Speculative decoding: draft tokens accepted (each saved one forward pass of its sequence)",
            s.spec_accepted_tokens,
        ),
        "spec_decode_num_verifications": (
            "Speculative decoding: sequence-steps that verified at least one draft token",
            s.spec_verifications,
        ),
    }
    return gauges, counters


_PER_REPLICA = (
    "requests_running",
    "requests_waiting",
    "requests_in_flight",
    "kv_pages_used",
    "kv_pages_cached",
    "generation_tokens",
    "prefix_cache_queries",
    "prefix_cache_hits",
    "token_budget",
)


def judge_of(own: RequestSLA, server: SLA) -> SLA:
    """The judge of a request that set its own SLA (the server's EMA span)."""
    return SLA(own.prompt_rate, own.token_rate, server.ema_span)


class _EngineCollector:
    def __init__(self, replicas: list[AsyncEngine], sla: SLA):
        self.replicas, self.sla = replicas, sla

    def collect(self):
        figures = [_figures(r) for r in self.replicas]  # [(gauges, counters)] per replica
        for kind, family in ((0, GaugeMetricFamily), (1, CounterMetricFamily)):
            for name, (doc, _) in figures[0][kind].items():
                total = (max if name == "token_budget" else sum)(f[kind][name][1] for f in figures)
                yield family(f"fastgen_{name}", doc, value=total)
                if name in _PER_REPLICA:
                    metric = family(f"fastgen_replica_{name}", f"{doc}, per replica", labels=["replica"])
                    for i, f in enumerate(figures):
                        metric.add_metric([str(i)], f[kind][name][1])
                    yield metric
        accepted = sum(f[1]["spec_decode_num_accepted_tokens"][1] for f in figures)
        verifications = sum(f[1]["spec_decode_num_verifications"][1] for f in figures)
        yield GaugeMetricFamily(
            "fastgen_spec_decode_mean_accepted_length",
            "Speculative decoding: draft tokens accepted per verification since start-up",
            value=accepted / verifications if verifications else 0.0,
        )
        used = sum(f[0]["kv_pages_used"][1] for f in figures)
        total = sum(f[0]["kv_pages_total"][1] for f in figures)
        usage = used / max(total, 1)
        yield GaugeMetricFamily("fastgen_kv_cache_usage", "Fraction of KV pages in use", value=usage)
        yield GaugeMetricFamily(
            "fastgen_sla_prompt_rate",
            "SLA: prompt tokens/s the first token may take",
            value=self.sla.prompt_rate,
        )
        yield GaugeMetricFamily(
            "fastgen_sla_token_rate",
            "SLA: tokens/s the EMA of token gaps must sustain",
            value=self.sla.token_rate,
        )
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
        failures = CounterMetricFamily(
            "fastgen_replica_step_failures",
            "Forward passes (and probes after one) that failed on the replica",
            labels=["replica"],
        )
        ready = GaugeMetricFamily(
            "fastgen_replica_ready", "1 while the replica's last forward pass worked", labels=["replica"]
        )
        for i, r in enumerate(self.replicas):
            work.add_metric([str(i)], r.outstanding_work)
            routed.add_metric([str(i)], r.routed)
            failures.add_metric([str(i)], r.failed_steps)
            ready.add_metric([str(i)], float(r.ready))
        yield from (work, routed, failures, ready)


class ServerMetrics:
    def __init__(self, replicas: list[AsyncEngine], sla: SLA):
        self.sla = sla
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(replicas, sla))
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

        self.prompt_tokens = Histogram(
            "fastgen_request_prompt_tokens",
            "Prompt length of each finished request",
            buckets=_LENGTH_BUCKETS,
            registry=self.registry,
        )
        self.generation_tokens = Histogram(
            "fastgen_request_generation_tokens",
            "Tokens generated for each finished request (aborted ones: until the abort)",
            buckets=_LENGTH_BUCKETS,
            registry=self.registry,
        )
        self.judged = Counter(
            "fastgen_requests_judged",
            "Requests judged against the SLA (finished with stop or length)",
            registry=self.registry,
        )
        self.sla_requests = Counter(
            "fastgen_sla_requests",
            "Judged requests by SLA part (prompt: first-token time; generation: EMA of token gaps; both)"
            " and outcome (met, missed)",
            ["part", "outcome"],
            registry=self.registry,
        )
        self.sla_own_requests = Counter(
            "fastgen_sla_own_requests",
            "Judged requests that set their own SLA, by part and outcome (also in fastgen_sla_requests)",
            ["part", "outcome"],
            registry=self.registry,
        )
        for part in ("prompt", "generation", "both"):  # every series exists from the start
            for outcome in ("met", "missed"):
                self.sla_requests.labels(part, outcome)
                self.sla_own_requests.labels(part, outcome)

    def request_finished(
        self, out: RequestOutput, now: float, own_sla: RequestSLA | None = None
    ) -> Verdict | None:
        """Observes a request as it finishes (`out.timing`: when it arrived and when its tokens were
        emitted, on the engine's clock); returns its SLA verdict (by `own_sla` when it set one), None
        when it was not judged."""
        arrival, token_times = out.timing.arrival, out.timing.token_times
        reason = out.finish_reason or "abort"
        self.finished.labels(reason).inc()
        self.prompt_tokens.observe(out.prompt_length)
        self.generation_tokens.observe(out.generated_length)
        if not token_times:
            return None
        first_token = token_times[0]
        self.ttft.observe(first_token - arrival)
        self.e2e.observe(now - arrival)
        if out.generated_length > 1:
            self.tpot.observe((now - first_token) / (out.generated_length - 1))
        return None if reason == "abort" else self._judge(arrival, token_times, out.prompt_length, own_sla)

    def _judge(
        self, arrival: float, token_times: list[float], prompt_tokens: int, own_sla: RequestSLA | None
    ) -> Verdict:
        sla = self.sla if own_sla is None else judge_of(own_sla, self.sla)
        verdict = sla.judge(arrival, prompt_tokens, token_times)
        self.judged.inc()
        for part, met in verdict.parts().items():
            self.sla_requests.labels(part, "met" if met else "missed").inc()
            if own_sla is not None:
                self.sla_own_requests.labels(part, "met" if met else "missed").inc()
        return verdict

    def render(self) -> bytes:
        return generate_latest(self.registry)
