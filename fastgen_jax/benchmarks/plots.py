"""Plots of serving benchmark reports (matplotlib, PNG), one line per system or policy:

- `<prefix>_throughput_latency.png`: throughput (requests/s) against mean request latency;
- `<prefix>_effective_throughput.png`: effective throughput (SLA met) against clients (or rate);
- `<prefix>_token_latency_cdf.png`: CDF of inter-token latency at the largest common point.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastgen_jax.benchmarks.serving_metrics import RequestRecord


def x_key(mode: str | None) -> str:
    """The summary field a benchmark mode varies from point to point."""
    return {"poisson": "rate", "trace": "trace_speed"}.get(mode or "", "clients")


def _x_key(report: dict[str, Any]) -> str:
    return x_key(report.get("mode"))


def plot_reports(reports: list[dict[str, Any]], prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(f"{prefix}_{name}.png", dpi=120)
        plt.close(fig)
        paths.append(f"{prefix}_{name}.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for rep in reports:
        s = [p["summary"] for p in rep["points"]]
        ax.plot(
            [x["latency_mean"] for x in s], [x["throughput_rps"] for x in s], marker="o", label=rep["label"]
        )
    ax.set(xlabel="mean request latency (s)", ylabel="throughput (requests/s)", title="Throughput vs latency")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "throughput_latency")

    fig, ax = plt.subplots(figsize=(6, 4))
    for rep in reports:
        s = [p["summary"] for p in rep["points"]]
        ax.plot([x[_x_key(rep)] for x in s], [x["effective_throughput_rps"] for x in s], marker="o",
                label=rep["label"])  # fmt: skip
    sla = reports[0]["sla"]
    ax.set(
        xlabel=_x_key(reports[0]),
        ylabel="effective throughput (requests/s meeting the SLA)",
        title=f"SLA: TTFT <= prompt/{sla['prompt_rate']:g} s, token EMA <= 1/{sla['token_rate']:g} s",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "effective_throughput")

    common = set.intersection(*({p["summary"][_x_key(r)] for p in r["points"]} for r in reports))
    if common:
        at = max(common)
        fig, ax = plt.subplots(figsize=(6, 4))
        for rep in reports:
            point = next(p for p in rep["points"] if p["summary"][_x_key(rep)] == at)
            gaps = np.sort([g for r in point["records"] for g in RequestRecord(**r).itls])
            if len(gaps):
                ax.plot(gaps, np.arange(1, len(gaps) + 1) / len(gaps), label=rep["label"])
        ax.set(
            xlabel="inter-token latency (s)",
            ylabel="fraction of tokens",
            title=f"Token latency CDF at {_x_key(reports[0])} = {at:g}",
        )
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "token_latency_cdf")
    return paths
