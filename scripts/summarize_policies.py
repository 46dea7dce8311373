"""A markdown table comparing two `bench_serving.py` results point by point (first vs second):
effective throughput, P99 inter-token latency and mean latency, with their ratios.

    python scripts/summarize_policies.py serving_cpu_splitfuse.json serving_cpu_prefill_first.json
"""

from __future__ import annotations

import json
import sys


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


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise SystemExit("usage: summarize_policies.py FIRST.json SECOND.json")
    with open(argv[1]) as f, open(argv[2]) as g:
        print(compare(json.load(f), json.load(g)))


if __name__ == "__main__":
    main(sys.argv)
