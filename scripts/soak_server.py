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

    python scripts/soak_server.py --chaos                  # 2,000 requests against two replicas

--chaos serves two replicas of the tiny model in this process (2 CPU devices) and mixes in the abuse:
clients that disconnect, streams whose reader stalls for seconds, malformed or oversized bodies, and
forward passes of replica 1 that fail at random (--failure_rate, injected by wrapping its runner: a
test-only hook, no server flag). Every request must end within --request_timeout seconds as
completed, aborted by its client or a clean error (an OpenAI error body; a stream's error chunk then
[DONE]); replica 0 must serve throughout with no failure; afterwards nothing may run and no KV page may
be in use. The RSS sampled is this process's (server and clients together). Writes
docs/benchmarks/soak_chaos_cpu.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import sys
import tempfile
import time

if __name__ == "__main__" and "--chaos" in sys.argv:  # before jax is imported: two CPU devices
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"

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
    flags.DEFINE_string("output", None, "Where to write the JSON results (default: docs/benchmarks/).")
    flags.DEFINE_bool("chaos", False, "Two in-process replicas, abusive clients and injected step failures.")
    flags.DEFINE_float("failure_rate", 0.02, "--chaos: fraction of replica 1's forward passes that fail.")
    flags.DEFINE_float("request_timeout", 120.0, "--chaos: a request taking longer counts as hung.")


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


# ---------------------------------------------------------------------- chaos

MALFORMED = [
    ("/v1/completions", b'{"prompt": "x",'),
    ("/v1/completions", b"[1, 2]"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": "ten"}'),
    ("/v1/completions", b'{"prompt": "\\ud800"}'),
    ("/v1/completions", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("/v1/completions", json.dumps({"prompt": "x", "stop": ["s"] * 1000}).encode()),
    ("/v1/completions", json.dumps({"prompt": "x", "stop_token_ids": [-1]}).encode()),
    ("/v1/completions", json.dumps({"prompt": [[5]] * 64, "n": 4}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "hacker", "content": "x"}]}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": []}).encode()),
    ("/detokenize", json.dumps({"tokens": [-5]}).encode()),
]
SERVER_FAILURE = re.compile(r"generation failed on the server \(request \S+\)")


def _clean_error(status: int, payload: dict) -> bool:
    error = payload.get("error") if isinstance(payload, dict) else None
    if not (isinstance(error, dict) and error.get("message") and error.get("type")):
        return False
    return status != 500 or bool(SERVER_FAILURE.fullmatch(error["message"]))


async def _chaos_plain(client, path: str, body: dict) -> str:
    r = await client.post(path, json=body)
    if r.status_code == 200:
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text[:200]
        return "ok"
    assert _clean_error(r.status_code, r.json()), f"{path} -> {r.status_code} {r.text[:200]}"
    return "clean_error"


async def _chaos_stream(client, path: str, body: dict, stall: float | None, leave_after: int | None) -> str:
    chunks, finish, error = 0, None, None
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            assert _clean_error(r.status_code, json.loads(await r.aread())), f"{path} -> {r.status_code}"
            return "clean_error"
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                if error is not None:
                    return (
                        "too_slow"
                        if error.get("error", {}).get("code") == "client_too_slow"
                        else "clean_error"
                    )
                assert finish in ("stop", "length"), f"stream ended without a finish reason ({finish})"
                return "ok"
            chunk = json.loads(line[6:])
            if "error" in chunk:
                assert _clean_error(500 if chunk["error"]["type"] == "server_error" else 400, chunk), chunk
                error = chunk
                continue
            chunks += 1
            finish = chunk["choices"][0]["finish_reason"] or finish if chunk["choices"] else finish
            if leave_after is not None and chunks >= leave_after:
                return "aborted"  # leaving the block closes the connection mid-stream
            if stall is not None and chunks == 1:
                await asyncio.sleep(stall)  # reads nothing meanwhile
    raise AssertionError("stream closed without [DONE]")


async def _chaos_one(client, rng: random.Random, model: str, max_tokens: int) -> str:
    kind = rng.choices(["plain", "disconnect", "stall", "malformed"], [0.55, 0.2, 0.1, 0.15])[0]
    if kind == "malformed":
        path, raw = rng.choice(MALFORMED)
        r = await client.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500 and _clean_error(r.status_code, r.json()), (path, r.status_code)
        return "rejected"
    path, body = _request(rng, max_tokens, model)
    if kind == "stall":
        body = {**body, "stream": True, "max_tokens": 150, "ignore_eos": True}
        return await _chaos_stream(client, path, body, stall=rng.uniform(0.5, 3.0), leave_after=None)
    if kind == "disconnect":
        body = {**body, "stream": True}
        return await _chaos_stream(client, path, body, stall=None, leave_after=rng.randint(1, 4))
    if body["stream"]:
        return await _chaos_stream(client, path, body, stall=None, leave_after=None)
    return await _chaos_plain(client, path, body)


async def run_chaos_load(
    url: str, num_requests: int, concurrency: int, max_tokens: int = 48, seed: int = 0,
    request_timeout: float = 120.0, on_progress=None,
) -> dict:  # fmt: skip
    """The chaos mix (see the module docstring); returns the count of each outcome and the failures."""
    rng = random.Random(seed)
    seeds = [rng.randrange(2**32) for _ in range(num_requests)]
    counts = dict.fromkeys(("ok", "aborted", "too_slow", "clean_error", "rejected", "failed", "hung"), 0)
    failures, next_index = [], iter(range(num_requests))
    async with httpx.AsyncClient(base_url=url, timeout=request_timeout + 30) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]

        async def worker():
            for i in next_index:
                try:
                    work = _chaos_one(client, random.Random(seeds[i]), model, max_tokens)
                    counts[await asyncio.wait_for(work, request_timeout)] += 1
                except TimeoutError:
                    counts["hung"] += 1
                    failures.append(f"request {i}: no end within {request_timeout} s")
                except (AssertionError, httpx.HTTPError, KeyError, ValueError) as e:
                    counts["failed"] += 1
                    failures.append(f"request {i}: {type(e).__name__}: {e}")
                if on_progress:
                    on_progress(i)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {**counts, "failures": failures[:20]}


def inject_step_failures(engine, rate: float, seed: int = 0) -> None:
    """Test-only hook: makes `rate` of the engine's forward passes (probes included) raise."""
    real_execute, rng = engine.runner.execute, random.Random(seed)

    def execute(*args):
        if rng.random() < rate:
            raise RuntimeError("chaos: injected step failure")
        return real_execute(*args)

    engine.runner.execute = execute


@contextlib.contextmanager
def chaos_server(engines, failure_rate: float, seed: int = 0):
    """Serves `engines` as replicas on loopback with small stream buffers (so stalled readers are
    noticed) and failures injected into the last replica; yields the URL."""
    import socket

    from fastgen_jax.server import build_app
    from fastgen_jax.server.http import ServerThread

    inject_step_failures(engines[-1], failure_rate, seed)
    app = build_app(engines, "tiny", max_stream_lag=8, body_timeout=5.0, send_timeout=10.0)
    thread = ServerThread(app, header_timeout=5.0)
    thread.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)  # back-pressure after kilobytes
    with thread as url:
        yield url


def replica_figures(url: str) -> dict[str, dict[str, float]]:
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for name in ("requests_routed_total", "step_failures_total"):
        pattern = rf'^fastgen_replica_{name}{{replica="(\d+)"}} (\S+)$'
        out[name] = {m[0]: float(m[1]) for m in re.findall(pattern, text, re.M)}
    return out


def chaos_engines(model_dir: str):
    from fastgen_jax.config import EngineConfig
    from fastgen_jax.llm_engine import LLMEngine
    from fastgen_jax.parallel import device_groups

    config = EngineConfig(token_budget=128, max_num_seqs=32, max_model_len=512, num_pages=600)
    return [
        LLMEngine.from_pretrained(model_dir, config, "float32", progress=False, devices=group)
        for group in device_groups(1, 2)
    ]


def chaos_main() -> None:
    import logging

    from tqdm.auto import tqdm

    for name in ("httpx", "fastgen_jax.server"):  # a line per request would drown the table
        logging.getLogger(name).setLevel(logging.WARNING)

    from fastgen_jax.checkpoints.random_model import make_random_checkpoint
    from fastgen_jax.tokenizer import Tokenizer

    tmp = tempfile.TemporaryDirectory()
    make_random_checkpoint(tmp.name, Tokenizer.from_hf_dir(FLAGS.tokenizer_from))
    engines = chaos_engines(tmp.name)
    bar, rss = tqdm(total=FLAGS.num_requests, desc="chaos", unit="req"), []

    def progress(i):
        bar.update()
        if bar.n % max(FLAGS.num_requests // 50, 1) == 0:
            rss.append((bar.n, round(rss_mib(os.getpid()), 1)))

    with chaos_server(engines, FLAGS.failure_rate, FLAGS.seed) as url:
        rss.append((0, round(rss_mib(os.getpid()), 1)))
        start = time.perf_counter()
        result = asyncio.run(
            run_chaos_load(url, FLAGS.num_requests, FLAGS.concurrency, FLAGS.max_tokens, FLAGS.seed,
                           FLAGS.request_timeout, progress)
        )  # fmt: skip
        elapsed = time.perf_counter() - start
        bar.close()
        idle, replicas = server_idle(url), replica_figures(url)
        free = [e.scheduler.num_free_pages == e.stats.total_pages for e in engines]
    report = {
        "num_requests": FLAGS.num_requests,
        "concurrency": FLAGS.concurrency,
        "failure_rate_replica_1": FLAGS.failure_rate,
        "seconds": round(elapsed, 1),
        **result,
        "after": idle,
        "all_pages_free": all(free),
        "replicas": replicas,
        "rss_mib": rss,
    }
    for k, v in report.items():
        if k not in ("failures", "rss_mib"):
            print(f"{k:<24} {v}")
    for failure in result["failures"]:
        print("  ", failure)
    if rss:
        print(f"{'RSS MiB start/peak/end':<24} {rss[0][1]} / {max(v for _, v in rss)} / {rss[-1][1]}")
    output = FLAGS.output or "docs/benchmarks/soak_chaos_cpu.json"
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with open(output, "w") as f:
        json.dump(report, f, indent=2)
    ok = (
        result["failed"] == 0 and result["hung"] == 0 and not any(idle.values()) and all(free)
        and replicas["step_failures_total"].get("0") == 0 and result["ok"] > 0
    )  # fmt: skip
    sys.exit(0 if ok else 1)


def main(argv):
    del argv
    if FLAGS.chaos:
        return chaos_main()
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
    output = FLAGS.output or "docs/benchmarks/soak_cpu.json"
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with open(output, "w") as f:
        json.dump(report, f, indent=2)
    if rss:
        plot_rss(rss, output.removesuffix(".json") + "_rss.png")
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
