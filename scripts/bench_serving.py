"""Serving benchmark in FastGen's method: closed-loop clients (or Poisson arrivals) against a server.

    # against a running OpenAI-compatible server (ours, vLLM, ...)
    python scripts/bench_serving.py --url=http://127.0.0.1:8000 --label=ours

    # start our server with a policy, sweep, stop it (what compare_policies.sh does)
    python scripts/bench_serving.py --serve_model=checkpoints/smollm2-135m-instruct --policy=prefill_first

    # replay a trace of real traffic (python -m fastgen_jax.benchmarks.trace writes one from
    # `serve --request_log`), open loop at its own pace (--trace_speed=2 sends twice as fast)
    python scripts/bench_serving.py --url=http://127.0.0.1:8000 --trace=trace.jsonl --trace_speed=1.0

    # a load step: 2 closed-loop clients, 16 once half the requests are done; prints the SLA
    # attainment the benchmark measured beside the one the server's /metrics counted
    python scripts/bench_serving.py --serve_model=checkpoints/smollm2-135m-instruct --load_step=2,16

For each point (a client count, or a Poisson rate) it sends `clients x requests_per_client +
extra_requests` measured requests after `warmup` unmeasured ones, every request streamed with
`ignore_eos` so prompt and generation lengths hold (Normal(mean, 0.3 x mean), clipped). It prints a
table, writes raw per-request JSON plus the summary (`<output_dir>/serving_<label>.json`), and plots
unless --noplot. The SLA for effective throughput is stated in the output: TTFT <= prompt_tokens /
--prompt_rate and EMA(span 16) of token gaps <= 1 / --token_rate. FastGen's GPU values are 512 and
2-6; a 2-core CPU is ~100x slower, so pick rates to match the hardware (the CPU defaults below).
`scripts/plot_serving.py` draws several result files on the same plots. A server started here gets
the benchmark's SLA as its --sla_prompt_rate/--sla_token_rate, so its /metrics judge the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import signal
import time

from absl import app, flags

from fastgen_jax.benchmarks.load import Workload, closed_loop, load_step, poisson, sla_counters, start_server
from fastgen_jax.benchmarks.plots import x_key
from fastgen_jax.benchmarks.serving_metrics import SLA, summarize

FLAGS = flags.FLAGS
flags.DEFINE_string("url", None, "Server to measure; without it --serve_model starts ours.")
flags.DEFINE_string("serve_model", None, "Start `python -m fastgen_jax.serve` on this model.")
flags.DEFINE_enum(
    "policy", "splitfuse", ["splitfuse", "prefill_first", "sla"], "Policy of the started server."
)
flags.DEFINE_list("serve_flags", [], "More flags for the started server, e.g. token_budget=256.")
flags.DEFINE_string("label", None, "Name of this system in tables and plots (default: the policy).")
flags.DEFINE_list("clients", ["1", "2", "4", "8"], "Closed-loop client counts, one point each.")
flags.DEFINE_list("rates", [], "Poisson request rates (per second); replaces --clients when given.")
flags.DEFINE_string("trace", None, "Replay this JSONL trace open loop (one point) instead of --clients.")
flags.DEFINE_float("trace_speed", 1.0, "Trace replay pace: request i is sent at arrival_i / speed.")
flags.DEFINE_list("load_step", [], "Two client counts, e.g. 2,16: one closed-loop point whose clients jump.")
flags.DEFINE_integer("load_step_after", None, "Finished requests before the jump (default: half of them).")
flags.DEFINE_integer("requests_per_client", 4, "Measured requests per client (FastGen: 4).")
flags.DEFINE_integer("extra_requests", 32, "Measured requests added to each point (FastGen: 32).")
flags.DEFINE_integer("warmup", None, "Unmeasured requests before each point (default: the client count).")
flags.DEFINE_integer("prompt_mean", 2600, "Mean prompt length (tokens).")
flags.DEFINE_integer("gen_mean", 60, "Mean generation length (tokens).")
flags.DEFINE_integer("prompt_max", 4000, "Longest prompt.")
flags.DEFINE_integer("gen_max", None, "Longest generation (default: 2 x mean).")
flags.DEFINE_float("prompt_rate", 512.0, "SLA: TTFT may take prompt_tokens / prompt_rate seconds.")
flags.DEFINE_float("token_rate", 4.0, "SLA: tokens per second the EMA of token gaps must sustain.")
flags.DEFINE_integer("seed", 0, "Workload seed.")
flags.DEFINE_string("output_dir", "docs/benchmarks", "Where the JSON (and plots) go.")
flags.DEFINE_bool("plot", True, "Draw the plots for this run alone.")


def mode() -> str:
    if FLAGS.trace:
        return "trace"
    if FLAGS.load_step:
        return "load_step"
    return "poisson" if FLAGS.rates else "closed_loop"


def points() -> list[float]:
    if FLAGS.trace:
        return [FLAGS.trace_speed]
    if FLAGS.load_step:
        return [float(FLAGS.load_step[-1])]
    return [float(x) for x in (FLAGS.rates or FLAGS.clients)]


def run_point(url: str, workload: Workload, point: float, index: int):
    """Warm-up, then the measured requests: (records, wall seconds, the server's SLA attainment)."""
    from tqdm.auto import tqdm

    if FLAGS.trace:
        from fastgen_jax.benchmarks.trace import read_trace, replay

        entries = read_trace(FLAGS.trace)
        total, name = len(entries), f"trace x{point:g}"
        coro = lambda done: replay(url, entries, point, FLAGS.seed, done)
    else:
        clients = int(FLAGS.load_step[0]) if FLAGS.load_step else 1 if FLAGS.rates else int(point)
        senders = sum(int(c) for c in FLAGS.load_step) if FLAGS.load_step else 8 if FLAGS.rates else clients
        total = senders * FLAGS.requests_per_client + FLAGS.extra_requests
        warmup = FLAGS.warmup if FLAGS.warmup is not None else clients
        requests = workload.requests(warmup + total, FLAGS.seed + index)
        asyncio.run(closed_loop(url, requests[:warmup], clients, warmup=warmup))
        name, coro = f"{clients} clients", measured_load(url, requests[warmup:], point, clients)
    before = scrape(url)
    with tqdm(total=total, desc=name, unit="req", leave=False) as bar:
        records, wall = asyncio.run(coro(bar.update))
    return records, wall, server_attainment(before, scrape(url))


def measured_load(url: str, requests: list, point: float, clients: int):
    """A function of the progress callback that returns the coroutine sending `requests`."""
    if FLAGS.rates:
        return lambda done: poisson(url, requests, point, FLAGS.seed, done)
    if FLAGS.load_step:
        after = int(FLAGS.load_step[1])
        step_after = FLAGS.load_step_after if FLAGS.load_step_after is not None else len(requests) // 2
        return lambda done: load_step(url, requests, (clients, after), step_after, done)
    return lambda done: closed_loop(url, requests, clients, on_done=done)


def server_attainment(before: dict[str, float], after: dict[str, float]) -> dict[str, float] | None:
    """The fraction of the requests the server judged in between that met each part of the SLA, and
    the steps it ran and the "sla" policy's decisions in between (counts)."""
    judged = after.get("judged", 0.0) - before.get("judged", 0.0)
    if not judged:
        return None
    decisions = {
        name: after[name] - before.get(name, 0.0)
        for name in ("steps", "deferred_decodes", "prompts_past_deadline")
        if name in after
    }
    rates = {"prompt_rate": after.get("prompt_rate"), "token_rate": after.get("token_rate")}
    return (
        {
            part: (after[f"{part}_met"] - before[f"{part}_met"]) / judged
            for part in ("prompt", "generation", "both")
        }
        | {"judged": judged}
        | rates
        | decisions
    )


def start_our_server(sla: SLA):
    serve_flags = [f"--{f}" for f in FLAGS.serve_flags]
    return start_server(
        [
            f"--model={FLAGS.serve_model}",
            f"--policy={FLAGS.policy}",
            f"--sla_prompt_rate={sla.prompt_rate}",
            f"--sla_token_rate={sla.token_rate}",
            *serve_flags,
        ],
        echo=True,
    )


def main(argv):
    del argv
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)
    if (FLAGS.url is None) == (FLAGS.serve_model is None):
        raise app.UsageError("give exactly one of --url or --serve_model")
    label = FLAGS.label or (FLAGS.policy if FLAGS.serve_model else "server")
    workload = Workload(
        FLAGS.prompt_mean, FLAGS.gen_mean, FLAGS.prompt_max, FLAGS.gen_max or 2 * FLAGS.gen_mean
    )
    sla = SLA(FLAGS.prompt_rate, FLAGS.token_rate)
    if FLAGS.load_step and len(FLAGS.load_step) != 2:
        raise app.UsageError(f"--load_step takes two client counts, got {FLAGS.load_step}")
    proc, url = (None, FLAGS.url) if FLAGS.url else start_our_server(sla)
    results = []
    try:
        for i, point in enumerate(points()):
            records, wall, server_sla = run_point(url, workload, point, i)
            summary = summarize(records, wall, sla)
            summary[x_key(mode())] = point
            summary["server_sla"] = server_sla
            results.append({"summary": summary, "records": [dataclasses.asdict(r) for r in records]})
            print_row(summary, header=i == 0)
    finally:
        if proc:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    report = {
        "label": label,
        "url": FLAGS.url,
        "serve_model": FLAGS.serve_model,
        "policy": FLAGS.policy if FLAGS.serve_model else None,
        "serve_flags": FLAGS.serve_flags,
        "workload": dataclasses.asdict(workload),
        "sla": dataclasses.asdict(sla),
        "mode": mode(),
        "trace": FLAGS.trace,
        "load_step": FLAGS.load_step,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "points": results,
    }
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    path = os.path.join(FLAGS.output_dir, f"serving_{label}.json")
    with open(path, "w") as f:
        json.dump(report, f)
    print(f"SLA: TTFT <= prompt_tokens / {sla.prompt_rate:g} s and EMA(span {sla.ema_span}) of token gaps "
          f"<= {1 / sla.token_rate:.3g} s; wrote {path}")  # fmt: skip
    for p in results:
        print_attainment(p["summary"])
    if FLAGS.plot:
        from fastgen_jax.benchmarks.plots import plot_reports

        plot_reports([report], os.path.join(FLAGS.output_dir, f"serving_{label}"))


COLUMNS = [
    ("rps", "throughput_rps", "{:.3f}"),
    ("out tok/s", "output_tokens_per_s", "{:.1f}"),
    ("eff rps", "effective_throughput_rps", "{:.3f}"),
    ("SLA %", "sla_fraction", "{:.0%}"),
    ("lat mean", "latency_mean", "{:.2f}"),
    ("lat p90", "latency_p90", "{:.2f}"),
    ("ttft p50", "ttft_p50", "{:.2f}"),
    ("ttft p99", "ttft_p99", "{:.2f}"),
    ("tpot mean", "tpot_mean", "{:.3f}"),
    ("itl p50", "itl_p50", "{:.3f}"),
    ("itl p95", "itl_p95", "{:.3f}"),
    ("itl p99", "itl_p99", "{:.3f}"),
    ("failed", "failed", "{}"),
]


def scrape(url: str) -> dict[str, float]:
    """The server's SLA counters; empty for a server that has none (not ours)."""
    try:
        return sla_counters(url)
    except Exception:  # noqa: BLE001 - any server may be measured; its metrics are optional
        return {}


def print_attainment(summary: dict) -> None:
    """SLA attainment by part as the benchmark measured it (client chunk times) and as the server's
    /metrics counted it (server emit times), side by side."""
    server = summary["server_sla"]
    if server is None:
        return
    parts = [
        f"{part} {summary[key]:.1%} vs {server[part]:.1%}"
        for part, key in (("prompt", "sla_prompt_fraction"), ("generation", "sla_generation_fraction"),
                          ("both", "sla_fraction"))
    ]  # fmt: skip
    if (server["prompt_rate"], server["token_rate"]) != (FLAGS.prompt_rate, FLAGS.token_rate):
        print(f"note: the server judges by another SLA ({server['prompt_rate']:g}, {server['token_rate']:g})")
    print(
        f"{x_key(mode())} {summary[x_key(mode())]:g}: SLA attainment, benchmark vs server /metrics "
        f"({summary['requests']} sent, {server['judged']:g} judged): " + ", ".join(parts)
    )


def print_row(summary: dict, header: bool) -> None:
    key = x_key(mode())
    if header:
        print(" | ".join(f"{h:>9}" for h in [key, *(c[0] for c in COLUMNS), "server SLA %"]))
    cells = [f"{summary[key]:g}"]
    for _, name, fmt in COLUMNS:
        value = summary[name]
        cells.append("-" if value is None else fmt.format(value))
    server = summary["server_sla"]
    cells.append("-" if server is None else f"{server['both']:.0%}")
    print(" | ".join(f"{c:>9}" for c in cells), flush=True)


if __name__ == "__main__":
    app.run(main)
