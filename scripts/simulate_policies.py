"""SLA attainment of the three composer policies on a simulated machine (step seconds = a + b x tokens,
the real Scheduler, the SLA judge; `fastgen_jax.benchmarks.simulated_machine`), over arrival patterns.
Deterministic: the same table every run, in seconds, on any machine.

    python scripts/simulate_policies.py > docs/benchmarks/sla_policy_simulated.md
"""

from __future__ import annotations

import dataclasses

from fastgen_jax.benchmarks.simulated_machine import Arrival, Machine, fastgen_shaped, run, run_closed_loop
from fastgen_jax.engine.sla_policy import RequestSLA
from fastgen_jax.sla import SLA

POLICIES = ("splitfuse", "prefill_first", "sla")
SLA_CPU = SLA(prompt_rate=256, token_rate=2)
# The closed loop of `compare_policies.sh` on a machine like this CPU on SmolLM2 (a step padded to its
# token bucket costs 80 ms + 2.2 ms per token: 0.64 s at 256; a guess, not a measurement).
CLOSED_MACHINE = Machine(0.08, 0.0022, padded=True)
SLA_CLOSED = SLA(prompt_rate=128, token_rate=1)
# The quiet CPU sweep itself: its SLA, a step of 60 ms + 1.55 ms per padded token (0.46 s at 256, as the
# sweep's token times show), and the engine's overlap (step N+1 composed as step N starts).
CPU_OVERLAP = Machine(0.06, 0.00155, padded=True, overlap=True)


def bursts(n, every, size, seed):
    shapes = fastgen_shaped(n, 1.0, seed=seed)
    return [Arrival(every * (i // size), a.prompt_tokens, a.output_tokens) for i, a in enumerate(shapes)]


def premium_mix(n, rate, seed):
    tight = RequestSLA(prompt_rate=512, token_rate=4, priority=-1)
    shapes = fastgen_shaped(n, rate, seed=seed)
    return [dataclasses.replace(a, sla=tight if i % 4 == 0 else None) for i, a in enumerate(shapes)]


def patterns():
    for seed in (1, 3, 7, 11, 13):
        yield f"FastGen-shaped, Poisson 0.9/s, seed {seed}", fastgen_shaped(80, 0.9, seed=seed), {}
    yield "light load, Poisson 0.3/s", fastgen_shaped(60, 0.3, seed=1), {}
    yield "bursts of 8 every 6 s", bursts(64, 6.0, 8, seed=2), {}
    yield "long prompts (mean 1200), 0.4/s", fastgen_shaped(48, 0.4, 4, prompt_mean=1200, prompt_max=1800), {}
    yield "overload, Poisson 1.2/s", fastgen_shaped(80, 1.2, seed=1), {}
    yield "token_budget=auto, Poisson 0.7/s", fastgen_shaped(80, 0.7, seed=5), {"adaptive": True}
    yield "premium quarter (own SLA 512/4, priority -1), 0.8/s", premium_mix(80, 0.8, seed=6), {}
    yield "decode-heavy (prompt 128, gen 96), 1.5/s", fastgen_shaped(64, 1.5, 3, 128, 96), {}
    yield "decode-heavy (prompt 64, gen 96), 1.5/s", fastgen_shaped(64, 1.5, 3, 64, 96), {}
    yield (
        "slow machine (b = 3 ms/token), 0.2/s",
        fastgen_shaped(80, 0.2, seed=1),
        {"machine": Machine(0.03, 0.003)},
    )


def main() -> None:
    m, sla = Machine(), SLA_CPU
    print(
        f"SLA met (both parts) per policy; machine: step = {m.seconds_per_step} s + "
        f"{m.seconds_per_token * 1e3:g} ms x tokens, token_budget 256, max_num_seqs 32; SLA: first token "
        f"within prompt/{sla.prompt_rate:g} s, token-gap EMA <= 1/{sla.token_rate:g} s.\n"
    )
    print("| pattern | requests | splitfuse | prefill_first | sla | sla vs best |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, arrivals, kwargs in patterns():
        met = [sum(run(p, arrivals, SLA_CPU, **kwargs)) for p in POLICIES]
        best = max(met[:2])
        print(
            f"| {name} | {len(arrivals)} | {met[0]} | {met[1]} | {met[2]} | {met[2] - best:+d} |", flush=True
        )


def closed_loop(m=CLOSED_MACHINE, sla=SLA_CLOSED, seeds=(1, 2, 3)) -> None:
    overlap = ", the next step composed as each starts (overlap)" if m.overlap else ""
    print(
        f"\nClosed loop (each client sends its next request when the last one finished), 40 FastGen-shaped "
        f"requests per run; machine: a step padded to its token bucket takes {m.seconds_per_step} s + "
        f"{m.seconds_per_token * 1e3:g} ms x tokens{overlap}; SLA: first token within "
        f"prompt/{sla.prompt_rate:g} s, token-gap EMA <= 1/{sla.token_rate:g} s. Requests within the SLA / "
        "seconds = effective throughput (req/s).\n"
    )
    print("| clients | seed | splitfuse | prefill_first | sla | sla / best FastGen | sla / prefill_first |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for clients in (4, 8):
        for seed in seeds:
            shapes = fastgen_shaped(40, 1.0, seed=seed)
            cells, rates = [], []
            for policy in POLICIES:
                verdicts, seconds = run_closed_loop(policy, shapes, clients, sla, m)
                rates.append(sum(verdicts) / seconds)
                cells.append(f"{sum(verdicts)} / {seconds:.0f} s = {rates[-1]:.3f}")
            ratios = f"{rates[2] / max(rates[:2]):.2f}x | {rates[2] / rates[1]:.2f}x"
            print(f"| {clients} | {seed} | {' | '.join(cells)} | {ratios} |", flush=True)


def launch_timing(seeds=range(1, 11), client_delay=0.005) -> None:
    """Early against late launch (`--launch_timing`) in the quiet sweep's closed loop, where each
    client's next request arrives `client_delay` after its last one ended; then late launch on a
    slower machine, whose full step (0.56 s) is longer than the 0.5 s gap bound."""
    early = dataclasses.replace(CPU_OVERLAP, client_delay=client_delay)
    machines = {
        "early": early,
        "late": dataclasses.replace(early, late=True),
        "late, slower machine (70 ms + 1.9 ms x tokens)": dataclasses.replace(
            early, late=True, seconds_per_step=0.07, seconds_per_token=0.0019
        ),
    }
    print(
        f"\nLaunch timing: the closed loop with overlap above, each client's next request arriving "
        f"{client_delay * 1e3:g} ms after its last one ended; requests within the SLA over {len(seeds)} "
        "draws of 40 requests / total seconds = effective throughput (req/s).\n"
    )
    print("| clients | launch | splitfuse | prefill_first | sla | sla / splitfuse | sla / prefill_first |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for clients in (4, 8):
        for name, m in machines.items():
            cells, rates = [], []
            for policy in POLICIES:
                met = seconds = 0
                for seed in seeds:
                    verdicts, s = run_closed_loop(
                        policy, fastgen_shaped(40, 1.0, seed=seed), clients, SLA_CPU, m
                    )
                    met, seconds = met + sum(verdicts), seconds + s
                rates.append(met / seconds)
                cells.append(f"{met} / {seconds:.0f} s = {rates[-1]:.3f}")
            ratios = f"{rates[2] / rates[0]:.2f}x | {rates[2] / rates[1]:.2f}x"
            print(f"| {clients} | {name} | {' | '.join(cells)} | {ratios} |", flush=True)


if __name__ == "__main__":
    main()
    closed_loop()
    closed_loop(CPU_OVERLAP, SLA_CPU, seeds=range(1, 11))
    launch_timing()
