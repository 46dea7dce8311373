"""The "sla" policy against FastGen's two on a simulated machine (step seconds = a + b x tokens, the
real Scheduler, the SLA judge: `fastgen_jax.benchmarks.simulated_machine`): it meets the SLA for at
least as many requests as the better of splitfuse and prefill_first on several arrival patterns, and
for strictly more on FastGen's workload shape. The simulation is deterministic; a pattern where it
does not hold (decode-heavy traffic, see docs/benchmarks/sla_policy.md) is not among these."""

import dataclasses

import pytest

from fastgen_jax.benchmarks.simulated_machine import Arrival, Machine, fastgen_shaped, run, run_closed_loop
from fastgen_jax.engine.sla_policy import RequestSLA
from fastgen_jax.sla import SLA

SLA_CPU = SLA(prompt_rate=256, token_rate=2)  # scripts/compare_policies.sh's CPU preset


def met(arrivals, **kwargs):
    return {p: sum(run(p, arrivals, SLA_CPU, **kwargs)) for p in ("splitfuse", "prefill_first", "sla")}


def bursts(n, every, size, seed):
    """`size` requests at once every `every` seconds (a batch job, a retry storm)."""
    shapes = fastgen_shaped(n, 1.0, seed=seed)
    return [Arrival(every * (i // size), a.prompt_tokens, a.output_tokens) for i, a in enumerate(shapes)]


def premium_mix(n, rate, seed):
    """A quarter of the requests with a tighter SLA of their own and priority -1 (served earlier)."""
    shapes = fastgen_shaped(n, rate, seed=seed)
    tight = RequestSLA(prompt_rate=512, token_rate=4, priority=-1)
    return [dataclasses.replace(a, sla=tight if i % 4 == 0 else None) for i, a in enumerate(shapes)]


@pytest.mark.parametrize("seed", [1, 3, 7])
def test_on_fastgen_shaped_traffic_sla_meets_the_sla_for_strictly_more_requests(seed):
    counts = met(fastgen_shaped(80, 0.9, seed=seed))
    assert counts["sla"] > max(counts["splitfuse"], counts["prefill_first"]), counts


@pytest.mark.parametrize(
    "name, arrivals, kwargs",
    [
        ("light load", fastgen_shaped(60, 0.3, seed=1), {}),
        ("bursts of 8", bursts(64, every=6.0, size=8, seed=2), {}),
        (
            "long prompts",
            fastgen_shaped(48, 0.4, seed=4, prompt_mean=1200, prompt_max=1800),
            {},
        ),
        ("overload", fastgen_shaped(80, 1.2, seed=1), {}),
        ("adaptive budget", fastgen_shaped(80, 0.7, seed=5), {"adaptive": True}),
        ("premium tenants", premium_mix(80, 0.8, seed=6), {}),
    ],
)
def test_sla_meets_the_sla_for_at_least_as_many_requests_as_the_better_fastgen_policy(name, arrivals, kwargs):
    counts = met(arrivals, **kwargs)
    assert counts["sla"] >= max(counts["splitfuse"], counts["prefill_first"]), (name, counts)


@pytest.mark.parametrize("overlap", [False, True])
def test_every_request_finishes_under_every_policy_even_when_most_are_hopeless(overlap):
    arrivals = fastgen_shaped(60, 4.0, seed=9)  # far past capacity: almost nobody can meet the SLA
    machine = Machine(overlap=overlap)  # with overlap, each step is composed while the one before runs
    for policy in ("splitfuse", "prefill_first", "sla"):
        assert len(run(policy, arrivals, SLA_CPU, machine)) == len(arrivals)  # raises if one never ends


@pytest.mark.parametrize("clients", [4, 8])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_in_a_closed_loop_sla_has_at_least_the_best_effective_throughput(clients, seed):
    """The sweep's shape (`compare_policies.sh`: each client sends its next request when its last one
    finished) on a machine that pads each step to its token bucket: requests within the SLA per
    second, at least the better FastGen policy's."""
    machine, sla = Machine(0.08, 0.0022, padded=True), SLA(prompt_rate=128, token_rate=1)
    shapes = fastgen_shaped(40, 1.0, seed=seed)
    rates = {}
    for policy in ("splitfuse", "prefill_first", "sla"):
        verdicts, seconds = run_closed_loop(policy, shapes, clients, sla, machine)
        assert len(verdicts) == 40 and seconds > 0
        rates[policy] = sum(verdicts) / seconds
    assert rates["sla"] >= max(rates["splitfuse"], rates["prefill_first"]), rates


# The quiet CPU sweep's shape (docs/benchmarks/sla_policy.md, section 2): SmolLM2 on 2 cores, a step
# padded to its token bucket takes about 60 ms + 1.55 ms per token (0.46 s at 256, from the sweep's
# token times), the engine composes step N+1 while step N runs (overlap), the CPU preset's SLA.
CPU_OVERLAP = Machine(0.06, 0.00155, padded=True, overlap=True)


def closed_loop_rates(clients, seed, policies=("splitfuse", "sla")):
    shapes = fastgen_shaped(40, 1.0, seed=seed)
    out = {}
    for policy in policies:
        verdicts, seconds = run_closed_loop(policy, shapes, clients, SLA_CPU, CPU_OVERLAP)
        out[policy] = (sum(verdicts), seconds)
    return out


@pytest.mark.parametrize("clients, margin", [(4, 1.02), (8, 1.05)])
def test_with_overlap_sla_beats_splitfuses_effective_throughput_over_ten_draws(clients, margin):
    """Requests within the SLA per second over ten arrival draws. A composer that planned as if its
    step started when it was composed (not after the step in flight) and counted a prompt's last chunk
    as a full step was 1.008x SplitFuse here at 4 clients and 1.010x at 8 (the real sweep: 0.78-0.83x
    at 4); this one is 1.04x and 1.12x. Single draws still go either way by a request or two."""
    totals = {"splitfuse": [0, 0.0], "sla": [0, 0.0]}
    for seed in range(1, 11):
        for policy, (met, seconds) in closed_loop_rates(clients, seed).items():
            totals[policy][0] += met
            totals[policy][1] += seconds
    rates = {p: met / seconds for p, (met, seconds) in totals.items()}
    assert rates["sla"] >= margin * rates["splitfuse"], (clients, totals)


@pytest.mark.parametrize("clients", [4, 8])
def test_launching_late_meets_more_slas_than_launching_early_and_sla_keeps_its_edge(clients):
    """A closed-loop client sends its next request a few milliseconds after its last one ended, when
    an early launch has already composed the step after the one running: the request waits for that
    whole step too. Launched late (`launch_timing="late"`), the step is composed as the one running
    ends, with it. Over ten draws, every policy meets the SLA for more requests launched late (about
    7% more for SplitFuse at 4 clients, 16% at 8, on this machine), and "sla" still beats SplitFuse
    when both launch late."""
    early = dataclasses.replace(CPU_OVERLAP, client_delay=0.005)
    late = dataclasses.replace(early, late=True)
    met = {}
    for name, machine in (("early", early), ("late", late)):
        for policy in ("splitfuse", "prefill_first", "sla"):
            count = seconds = 0
            for seed in range(1, 11):
                verdicts, s = run_closed_loop(
                    policy, fastgen_shaped(40, 1.0, seed=seed), clients, SLA_CPU, machine
                )
                count, seconds = count + sum(verdicts), seconds + s
            met[name, policy] = count / seconds
    for policy in ("splitfuse", "prefill_first", "sla"):
        assert met["late", policy] > met["early", policy], (policy, met)
    assert met["late", "sla"] >= 1.02 * met["late", "splitfuse"], met


# This CPU on a slower day (the late-launch sweep's; its simulated rows are the last table of
# docs/benchmarks/sla_policy_simulated.md): a full step of 256 tokens takes about 0.56 s, longer than
# the CPU preset's 0.5 s gap bound; launched late.
SLOW_CPU = Machine(0.07, 0.0019, padded=True, overlap=True, late=True, client_delay=0.005)


@pytest.mark.parametrize("clients, margin", [(4, 1.15), (8, 1.4)])
def test_where_a_full_step_breaks_a_fresh_decodes_gap_sla_keeps_the_step_within_it(clients, margin):
    """A request's first gap seeds its gap EMA, so a full step right after its first token loses it
    under SplitFuse (0.56 s against 0.5 s allowed). "sla" keeps such a step to the token bucket that
    fits (`SlaComposer.longest_step`): over ten draws about 1.27x SplitFuse's effective throughput
    at 4 clients and 1.7x at 8 here; without that limit it was 1.02x at both."""
    rates = {}
    for policy in ("splitfuse", "sla"):
        met = seconds = 0
        for seed in range(1, 11):
            verdicts, s = run_closed_loop(
                policy, fastgen_shaped(40, 1.0, seed=seed), clients, SLA_CPU, SLOW_CPU
            )
            met, seconds = met + sum(verdicts), seconds + s
        rates[policy] = met / seconds
    assert rates["sla"] >= margin * rates["splitfuse"], rates
