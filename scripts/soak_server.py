"""Soak test of the server: thousands of requests at fixed concurrency, with clients that walk away.

    python scripts/soak_server.py                          # 2,000 requests at concurrency 32
    python scripts/soak_server.py --url=http://127.0.0.1:8000 --num_requests=500

Without --url it writes a random tiny Llama (SmolLM2's tokenizer, from --tokenizer_from), starts
`python -m fastgen_jax.serve` on it as a subprocess and samples that process's RSS as the run goes.
Each request is a completion or a chat, streamed or not, with a random prompt and max_tokens; a
fraction --abort_fraction of them disconnect early (a stream closed after a few chunks, or a plain
request cancelled while in flight). Every other request must succeed with a well-formed answer. At
the end the server must show no running requests and no used KV pages, and exit 0 on SIGTERM.
Prints a table, writes JSON (default docs/benchmarks/soak_cpu.json), exits 1 on any failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import sys
import tempfile
import time

import httpx
from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined only when run as a script, so tests can import the load generator."""
    flags.DEFINE_string("url", None, "A running server; without it the script starts one on a tiny model.")
    flags.DEFINE_integer("num_requests", 2000, "Requests to send.")
    flags.DEFINE_integer("concurrency", 32, "Requests in flight at once.")
    flags.DEFINE_float("abort_fraction", 0.2, "Fraction of requests whose client disconnects early.")
    flags.DEFINE_integer("max_tokens", 48, "Largest max_tokens drawn for a request.")
    flags.DEFINE_integer("seed", 0, "Seed of the workload.")
    flags.DEFINE_string(
        "tokenizer_from", "checkpoints/smollm2-135m-instruct", "Model dir whose tokenizer to use."
    )
    flags.DEFINE_string("output", "docs/benchmarks/soak_cpu.json", "Where to write the JSON results.")


WORDS = "the a of river light stone quick brown fox jumps over lazy dog model token page budget".split()


def _request(rng: random.Random, max_tokens: int, model: str) -> tuple[str, dict]:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))
    body = {"model": model, "max_tokens": rng.randint(1, max_tokens), "temperature": rng.choice([0.0, 0.8])}
    body["stream"] = rng.random() < 0.5
    if rng.random() < 0.5:
        return "/v1/completions", {**body, "prompt": text}
    return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}]}


async def _one(client: httpx.AsyncClient, path: str, body: dict, abort_after: int | None) -> str:
    """Sends one request; returns "ok", "aborted", or raises AssertionError describing a failure."""
    if body["stream"]:
        return await _one_stream(client, path, body, abort_after)
    if abort_after is not None:
        try:
            r = await asyncio.wait_for(client.post(path, json=body), timeout=0.001 * abort_after)
            assert r.status_code == 200, f"{path} -> {r.status_code} {r.text[:200]}"
            return "ok"  # finished before we walked away
        except TimeoutError:
            return "aborted"
    r = await client.post(path, json=body)
    assert r.status_code == 200, f"{path} -> {r.status_code} {r.text[:200]}"
    result = r.json()
    choice = result["choices"][0]
    assert choice["finish_reason"] in ("stop", "length"), choice
    assert result["usage"]["completion_tokens"] <= body["max_tokens"], result["usage"]
    return "ok"


async def _one_stream(client: httpx.AsyncClient, path: str, body: dict, abort_after: int | None) -> str:
    chunks, finish = 0, None
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, f"{path} -> {r.status_code}"
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                assert finish in ("stop", "length"), f"stream ended without a finish reason ({finish})"
                return "ok"
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            chunks += 1
            finish = chunk["choices"][0]["finish_reason"] or finish if chunk["choices"] else finish
            if abort_after is not None and chunks >= 1 + abort_after % 4:
                return "aborted"  # leaving the block closes the connection mid-stream
    raise AssertionError("stream closed without [DONE]")


async def run_load(
    url: str,
    num_requests: int,
    concurrency: int,
    abort_fraction: float,
    max_tokens: int = 48,
    seed: int = 0,
    on_progress=None,
) -> dict:
    """Closed-loop load with random aborts; returns counts of ok/aborted/failed and the failures."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        plan = [
            (
                *_request(rng, max_tokens, model),
                rng.randint(1, 200) if rng.random() < abort_fraction else None,
            )
            for _ in range(num_requests)
        ]
        counts, failures, next_index = {"ok": 0, "aborted": 0, "failed": 0}, [], iter(range(num_requests))

        async def worker():
            for i in next_index:
                path, body, abort_after = plan[i]
                try:
                    counts[await _one(client, path, body, abort_after)] += 1
                except (AssertionError, httpx.HTTPError, KeyError, ValueError) as e:
                    counts["failed"] += 1
                    failures.append(f"request {i}: {type(e).__name__}: {e}")
                if on_progress:
                    on_progress(i)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {**counts, "failures": failures[:20]}


def server_idle(url: str, timeout: float = 30.0) -> dict[str, float]:
    """Waits until the server has nothing running; returns its queue and page gauges."""
    names = ("requests_running", "requests_waiting", "requests_in_flight", "kv_pages_used")
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{url}/metrics").text
        values = {n: float(re.search(rf"^fastgen_{n} (\S+)$", text, re.M).group(1)) for n in names}
        if not any(values.values()) or time.monotonic() > deadline:
            return values
        time.sleep(0.1)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def main(argv):
    del argv
    import logging

    from tqdm.auto import tqdm

    logging.getLogger("httpx").setLevel(logging.WARNING)

    proc, tmp = None, None
    url = FLAGS.url
    if url is None:
        from fastgen_jax.checkpoints.random_model import make_random_checkpoint
        from fastgen_jax.tokenizer import Tokenizer

        tmp = tempfile.TemporaryDirectory()
        make_random_checkpoint(tmp.name, Tokenizer.from_hf_dir(FLAGS.tokenizer_from))
        from fastgen_jax.benchmarks.load import start_server

        proc, url = start_server([
            f"--model={tmp.name}", "--token_budget=128", "--max_num_seqs=32", "--max_model_len=512",
            "--kv_pages=1100", "--served_model_name=tiny",
        ])  # fmt: skip
    rss = []
    bar = tqdm(total=FLAGS.num_requests, desc="soak", unit="req")

    def progress(i):
        bar.update()
        if proc and bar.n % max(FLAGS.num_requests // 50, 1) == 0:
            rss.append((bar.n, round(rss_mib(proc.pid), 1)))

    start = time.perf_counter()
    if proc:
        rss.append((0, round(rss_mib(proc.pid), 1)))
    result = asyncio.run(
        run_load(url, FLAGS.num_requests, FLAGS.concurrency, FLAGS.abort_fraction, FLAGS.max_tokens,
                 FLAGS.seed, progress)
    )  # fmt: skip
    bar.close()
    elapsed = time.perf_counter() - start
    idle = server_idle(url)
    exit_code = None
    if proc:
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(60)
    report = {
        "num_requests": FLAGS.num_requests,
        "concurrency": FLAGS.concurrency,
        "abort_fraction": FLAGS.abort_fraction,
        "seconds": round(elapsed, 1),
        **result,
        "after": idle,
        "rss_mib": rss,
        "exit_code": exit_code,
    }
    _print_table(report)
    if FLAGS.output:
        os.makedirs(os.path.dirname(FLAGS.output) or ".", exist_ok=True)
        with open(FLAGS.output, "w") as f:
            json.dump(report, f, indent=2)
        if rss:
            plot_rss(rss, FLAGS.output.removesuffix(".json") + "_rss.png")
    ok = result["failed"] == 0 and not any(idle.values()) and exit_code in (None, 0)
    sys.exit(0 if ok else 1)


def plot_rss(rss: list[tuple[int, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([n for n, _ in rss], [v for _, v in rss], marker=".")
    ax.set_xlabel("requests done")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_ylim(0, max(v for _, v in rss) * 1.15)
    ax.set_title("Server memory during the soak")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def _print_table(r: dict) -> None:
    rows = [
        ("requests", r["num_requests"]),
        ("concurrency", r["concurrency"]),
        ("completed", r["ok"]),
        ("aborted by client", r["aborted"]),
        ("failed", r["failed"]),
        ("wall seconds", r["seconds"]),
        ("after: running / waiting / in flight", "{requests_running:.0f} / {requests_waiting:.0f} / "
         "{requests_in_flight:.0f}".format(**r["after"])),
        ("after: KV pages used", f"{r['after']['kv_pages_used']:.0f}"),
    ]  # fmt: skip
    if r["rss_mib"]:
        first, last = r["rss_mib"][0][1], r["rss_mib"][-1][1]
        peak = max(v for _, v in r["rss_mib"])
        rows.append(("server RSS MiB: start / peak / end", f"{first} / {peak} / {last}"))
        rows.append(("server exit code after SIGTERM", r["exit_code"]))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for failure in r["failures"]:
        print("  ", failure)


if __name__ == "__main__":
    define_flags()
    app.run(main)
