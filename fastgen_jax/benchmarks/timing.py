"""Timing for the micro-benchmarks under `scripts/` (kernels, whole step programs): calls timed in
turns, and the JSON report they write. No jax import: each call blocks on its own result."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any


def times_in_turns(
    calls: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each of `repeats` timed calls per entry, after `warmup` untimed rounds. The entries
    take turns, so a slow spell of a shared machine falls on all of them; each call must block until
    its result is ready."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(warmup + repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def write_report(path: str, rows: list[dict]) -> None:
    """`rows` as JSON at `path`, with the load average and the JAX version they were measured under."""
    report = {"load": os.getloadavg(), "jax": importlib.metadata.version("jax"), "rows": rows}
    pathlib.Path(path).write_text(json.dumps(report, indent=2) + "\n")
