"""A markdown table of effective throughput per token budget (one `bench_serving.py` result file per
budget, as `sweep_budgets.sh` writes them): one row per budget, one column per client count (or rate),
the total over the points, and which fixed budget did best and worst.

    python scripts/summarize_budgets.py docs/benchmarks/serving_budgets_cpu_*.json --json=summary.json
"""

from __future__ import annotations

import argparse
import json

from fastgen_jax.benchmarks.plots import x_key


def table(reports: list[dict]) -> tuple[str, dict]:
    key = x_key(reports[0].get("mode"))
    points = sorted({p["summary"][key] for r in reports for p in r["points"]})
    rows = {}
    for r in reports:
        by_point = {p["summary"][key]: p["summary"]["effective_throughput_rps"] for p in r["points"]}
        rows[r["label"]] = {
            "points": {str(x): by_point.get(x) for x in points},
            "total": sum(by_point.values()),
        }
    sla = reports[0]["sla"]
    lines = [
        "Effective throughput (requests/s meeting the SLA: first token within "
        f"prompt/{sla['prompt_rate']:g} s, token EMA <= 1/{sla['token_rate']:g} s) per budget and {key}.",
        "",
        "| budget | " + " | ".join(f"{key} {x:g}" for x in points) + " | total |",
        "|" + " --- |" * (len(points) + 2),
    ]
    for label, row in rows.items():
        cells = ["-" if v is None else f"{v:.3f}" for v in row["points"].values()]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['total']:.3f} |")
    fixed = {label: row["total"] for label, row in rows.items() if not label.endswith("auto")}
    if fixed:
        best, worst = max(fixed, key=fixed.get), min(fixed, key=fixed.get)
        lines += ["", f"Best fixed budget: {best} ({fixed[best]:.3f}); worst: {worst} ({fixed[worst]:.3f})."]
    return "\n".join(lines), {"x": key, "sla": sla, "budgets": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="serving_<label>.json files, one per budget")
    parser.add_argument("--json", help="also write the table as JSON here")
    args = parser.parse_args()
    reports = []
    for path in args.reports:
        with open(path) as f:
            reports.append(json.load(f))
    text, data = table(reports)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
