"""Draws several `bench_serving.py` result files on the same plots.

    python scripts/plot_serving.py --prefix=docs/benchmarks/serving_cpu \
        docs/benchmarks/serving_splitfuse.json docs/benchmarks/serving_prefill_first.json
"""

from __future__ import annotations

import json

from absl import app, flags

from fastgen_jax.benchmarks.plots import plot_reports

FLAGS = flags.FLAGS
flags.DEFINE_string("prefix", "docs/benchmarks/serving", "Path prefix of the PNG files.")


def main(argv):
    if len(argv) < 2:
        raise app.UsageError("give one or more serving_<label>.json files")
    reports = []
    for path in argv[1:]:
        with open(path) as f:
            reports.append(json.load(f))
    for path in plot_reports(reports, FLAGS.prefix):
        print("wrote", path)


if __name__ == "__main__":
    app.run(main)
