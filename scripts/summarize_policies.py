"""A markdown table comparing two `bench_serving.py` results point by point (first vs second):
effective throughput, P99 inter-token latency and mean latency, with their ratios.

    python scripts/summarize_policies.py serving_cpu_splitfuse.json serving_cpu_prefill_first.json
    python scripts/summarize_policies.py A.json B.json --token_rate=1   # re-judge the raw records
    python scripts/summarize_policies.py --rows A.json B.json C.json    # one row per file and point

With --prompt_rate/--token_rate the SLA is re-applied to the recorded timelines (no rerun needed).
"""

from __future__ import annotations

import argparse
import json

from fastgen_jax.benchmarks.serving_metrics import SLA, RequestRecord, summarize


def _ratio(a, b):
    return f"{a / b:.2f}x" if a is not None and b else "-"


def _cell(v, fmt):
    return "-" if v is None else fmt.format(v)


def compare(a: dict, b: dict) -> str:
    key = "rate" if a.get("mode") == "poisson" else "clients"
    by_point = {p["summary"][key]: p["summary"] for p in b["points"]}
    la, lb = a["label"], b["label"]
    sla = a["sla"]
    lines = [
        f"{la} vs {lb}; SLA: first token within prompt/{sla['prompt_rate']:g} s, token EMA <= "
        f"1/{sla['token_rate']:g} s. Ratios are {la} / {lb}.",
        "",
        f"| {key} | eff. rps {la} | eff. rps {lb} | ratio | ITL p99 {la} (s) | ITL p99 {lb} (s) | ratio "
        f"| mean latency {la} (s) | mean latency {lb} (s) | ratio | rps {la} | rps {lb} |",
        "|" + " --- |" * 12,
    ]
    for p in a["points"]:
        s = p["summary"]
        t = by_point.get(s[key])
        if t is None:
            continue
        cells = [f"{s[key]:g}"]
        for name, fmt in (
            ("effective_throughput_rps", "{:.3f}"),
            ("itl_p99", "{:.3f}"),
            ("latency_mean", "{:.2f}"),
        ):
            cells += [_cell(s[name], fmt), _cell(t[name], fmt), _ratio(s[name], t[name])]
        cells += [f"{s['throughput_rps']:.3f}", f"{t['throughput_rps']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rows(reports: list[dict]) -> str:
    """One row per report and point: SLA attainment by part, effective throughput and latencies."""
    lines = [
        "| system | point | requests | SLA met | first token met | generation met | eff. rps | rps | "
        "TTFT mean (s) | ITL p99 (s) |",
        "|" + " --- |" * 10,
    ]
    for r in reports:
        for p in r["points"]:
            s = p["summary"]
            point = next(f"{k} {s[k]:g}" for k in ("clients", "rate", "trace_speed") if k in s)
            lines.append(
                f"| {r['label']} | {point} | {s['requests']} | {s['sla_fraction']:.0%} | "
                f"{s['sla_prompt_fraction']:.0%} | {s['sla_generation_fraction']:.0%} | "
                f"{s['effective_throughput_rps']:.3f} | {s['throughput_rps']:.3f} | {s['ttft_mean']:.2f} | "
                f"{_cell(s['itl_p99'], '{:.2f}')} |"
            )
    return "\n".join(lines)


def rejudge(report: dict, sla: SLA) -> dict:
    """The report with every point summarized again under `sla`."""
    for p in report["points"]:
        records = [RequestRecord(**r) for r in p["records"]]
        x = {k: p["summary"][k] for k in ("clients", "rate") if k in p["summary"]}
        p["summary"] = {**summarize(records, p["summary"]["wall_seconds"], sla), **x}
    report["sla"] = {"prompt_rate": sla.prompt_rate, "token_rate": sla.token_rate, "ema_span": sla.ema_span}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="two reports to compare, or any number with --rows")
    parser.add_argument("--rows", action="store_true", help="one row per report and point instead")
    parser.add_argument("--prompt_rate", type=float, help="re-judge with this SLA prompt rate")
    parser.add_argument("--token_rate", type=float, help="re-judge with this SLA token rate")
    args = parser.parse_args()
    if not args.rows and len(args.files) != 2:
        parser.error("give two reports to compare, or --rows")
    reports = []
    for path in args.files:
        with open(path) as f:
            reports.append(json.load(f))
    if args.prompt_rate or args.token_rate:
        first = reports[0]["sla"]
        sla = SLA(args.prompt_rate or first["prompt_rate"], args.token_rate or first["token_rate"])
        reports = [rejudge(r, sla) for r in reports]
    print(rows(reports) if args.rows else compare(*reports))


if __name__ == "__main__":
    main()
