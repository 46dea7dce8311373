"""Server start-up, cold and warm: seconds from launching `python -m fastgen_jax.serve` to its first
served request.

Three starts, each in caches of its own making:
- fresh: an empty XLA compilation cache and no CPU kernels built (a machine where only `pip install`
  ran: the server builds the kernels before it compiles);
- cold: an empty XLA compilation cache after the README's set-up (`python -m fastgen_jax.checkpoints
  fetch` builds the CPU kernels; the script does what it does, timed apart as `setup_kernels_s`);
- warm: the cold start's caches again, now filled.
Prints a table and writes JSON:

    python scripts/bench_startup.py --output_json=docs/benchmarks/startup_cpu.json
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

import httpx
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "checkpoints/smollm2-135m-instruct", "Checkpoint the server loads.")
flags.DEFINE_list("serve_flags", [], "Extra server flags, e.g. --token_budget=256.")
flags.DEFINE_string("output_json", "", "Where to write the results (nothing written when empty).")


def start_once(env: dict[str, str]) -> dict[str, float | str]:
    """Starts the server, waits for its ready line, serves one request, stops it."""
    start = time.perf_counter()
    command = [
        sys.executable,
        "-m",
        "fastgen_jax.serve",
        f"--model={FLAGS.model}",
        "--port=0",
        *FLAGS.serve_flags,
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    url, ready_line = None, ""
    try:
        for line in proc.stdout:
            if match := re.search(r"on (http://127\.0\.0\.1:\d+)", line):
                url = match.group(1)
            if "ready in" in line:
                ready_line = line.strip()
                break
        if url is None or not ready_line:
            raise RuntimeError(f"the server exited before it was ready (exit code {proc.poll()})")
        body = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
        httpx.post(f"{url}/v1/completions", json=body, timeout=600).raise_for_status()
        served = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(60)
    return {"first_request_s": round(served, 1), "server_says": ready_line}


def main(argv):
    del argv
    rows = {}
    with tempfile.TemporaryDirectory() as xla, tempfile.TemporaryDirectory() as kernels:
        rows["fresh"] = start_once(
            dict(os.environ, FASTGEN_JAX_COMPILATION_CACHE=xla, FASTGEN_KERNEL_CACHE=kernels)
        )
    with tempfile.TemporaryDirectory() as xla, tempfile.TemporaryDirectory() as kernels:
        env = dict(os.environ, FASTGEN_JAX_COMPILATION_CACHE=xla, FASTGEN_KERNEL_CACHE=kernels)
        start = time.perf_counter()
        setup = "from fastgen_jax.attention import build_cpu_kernels; print(build_cpu_kernels())"
        said = subprocess.run(
            [sys.executable, "-c", setup], env=env, check=True, capture_output=True, text=True
        )
        setup_kernels_s = round(time.perf_counter() - start, 1)
        print(f"set-up: {said.stdout.strip()} ({setup_kernels_s} s with the process)")
        rows["cold"] = start_once(env)
        rows["warm"] = start_once(env)
    load = os.getloadavg()
    print(f"| start | first request served (s) | the server's line |  (load average {load[0]:.2f})")
    print("| --- | --- | --- |")
    for name, row in rows.items():
        print(f"| {name} | {row['first_request_s']} | {row['server_says']} |")
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump(
                {"model": FLAGS.model, "load_average": load, "setup_kernels_s": setup_kernels_s, **rows},
                f,
                indent=2,
            )


if __name__ == "__main__":
    app.run(main)
