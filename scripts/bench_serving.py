"""Serving benchmark in FastGen's method: closed-loop clients (or Poisson arrivals) against a server.

    # against a running OpenAI-compatible server (ours, vLLM, ...)
    python scripts/bench_serving.py --url=http://127.0.0.1:8000 --label=ours

    # start our server with a policy, sweep, stop it (what compare_policies.sh does)
    python scripts/bench_serving.py --serve_model=checkpoints/smollm2-135m-instruct --policy=prefill_first

For each point (a client count, or a Poisson rate) it sends `clients x requests_per_client +
extra_requests` measured requests after `warmup` unmeasured ones, every request streamed with
`ignore_eos` so prompt and generation lengths hold (Normal(mean, 0.3 x mean), clipped). It prints a
table, writes raw per-request JSON plus the summary (`<output_dir>/serving_<label>.json`), and plots
unless --noplot. The SLA for effective throughput is stated in the output: TTFT <= prompt_tokens /
--prompt_rate and EMA(span 16) of token gaps <= 1 / --token_rate. FastGen's GPU values are 512 and
2-6; a 2-core CPU is ~100x slower, so pick rates to match the hardware (the CPU defaults below).
`scripts/plot_serving.py` draws several result files on the same plots.
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

from fastgen_jax.benchmarks.load import Workload, closed_loop, poisson, start_server
from fastgen_jax.benchmarks.serving_metrics import SLA, summarize

FLAGS = flags.FLAGS
flags.DEFINE_string("url", None, "Server to measure; without it --serve_model starts ours.")
flags.DEFINE_string("serve_model", None, "Start `python -m fastgen_jax.serve` on this model.")
flags.DEFINE_enum("policy", "splitfuse", ["splitfuse", "prefill_first"], "Policy of the started server.")
flags.DEFINE_list("serve_flags", [], "More flags for the started server, e.g. token_budget=256.")
flags.DEFINE_string("label", None, "Name of this system in tables and plots (default: the policy).")
flags.DEFINE_list("clients", ["1", "2", "4", "8"], "Closed-loop client counts, one point each.")
flags.DEFINE_list("rates", [], "Poisson request rates (per second); replaces --clients when given.")
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


def run_point(url: str, workload: Workload, point: float, poisson_mode: bool, index: int):
    from tqdm.auto import tqdm

    clients = 1 if poisson_mode else int(point)
    measured = (clients if not poisson_mode else 8) * FLAGS.requests_per_client + FLAGS.extra_requests
    warmup = FLAGS.warmup if FLAGS.warmup is not None else clients
    requests = workload.requests(warmup + measured, FLAGS.seed + index)
    name = f"rate {point:g}/s" if poisson_mode else f"{clients} clients"
    with tqdm(total=measured, desc=name, unit="req", leave=False) as bar:
        if poisson_mode:
            coro = poisson(url, requests[warmup:], point, FLAGS.seed, bar.update)
        else:
            coro = closed_loop(url, requests, clients, warmup, bar.update)
        return asyncio.run(coro)


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
    poisson_mode = bool(FLAGS.rates)
    points = [float(x) for x in (FLAGS.rates or FLAGS.clients)]
    proc, url = (
        (None, FLAGS.url) if FLAGS.url else start_server(FLAGS.serve_model, FLAGS.policy, FLAGS.serve_flags)
    )
    results = []
    try:
        for i, point in enumerate(points):
            records, wall = run_point(url, workload, point, poisson_mode, i)
            summary = summarize(records, wall, sla)
            summary["rate" if poisson_mode else "clients"] = point
            results.append({"summary": summary, "records": [dataclasses.asdict(r) for r in records]})
            print_row(summary, poisson_mode, header=i == 0)
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
        "mode": "poisson" if poisson_mode else "closed_loop",
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


def print_row(summary: dict, poisson_mode: bool, header: bool) -> None:
    first = ("rate/s", "rate") if poisson_mode else ("clients", "clients")
    if header:
        print(" | ".join(f"{h:>9}" for h in [first[0], *(c[0] for c in COLUMNS)]))
    cells = [f"{summary[first[1]]:g}"]
    for _, key, fmt in COLUMNS:
        value = summary[key]
        cells.append("-" if value is None else fmt.format(value))
    print(" | ".join(f"{c:>9}" for c in cells), flush=True)


if __name__ == "__main__":
    app.run(main)
