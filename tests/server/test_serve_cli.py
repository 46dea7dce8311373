"""`python -m fastgen_jax.serve` as users run it: a subprocess that prints where it listens, logs a
line per request, finishes in-flight work on SIGTERM and exits 0, and names bad flags plainly."""

import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

SMALL = ["--token_budget=32", "--max_num_seqs=4", "--max_model_len=128", "--kv_pages=64"]


def start(*flags):
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastgen_jax.serve", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    return proc, lines


def wait_for_url(proc, lines, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert proc.poll() is None, proc.stderr.read()
            continue
        match = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        if match:
            return match.group(1)
    raise AssertionError("the server never said where it listens")


def test_serves_then_shuts_down_gracefully_on_sigterm(tiny_random_dir):
    proc, lines = start(f"--model={tiny_random_dir}", "--port=0", "--served_model_name=tiny", *SMALL)
    try:
        url = wait_for_url(proc, lines)
        ready = lines.get(timeout=30)
        assert re.fullmatch(
            r"fastgen-jax: ready in \d+\.\d s; compiled [1-9]\d* programs in \d+\.\d s\n", ready
        )
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 100, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            events = r.iter_lines()
            first = next(e for e in events if e.startswith("data: {"))
            proc.send_signal(signal.SIGTERM)  # mid-stream: the request still completes
            rest = [e for e in events if e.startswith("data: ")]
        assert json.loads(first[6:])["choices"][0]["text"] is not None
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    stderr = proc.stderr.read()
    assert re.search(r"POST /v1/completions 200 .* completion=100 finish=length", stderr), stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model=/no/such/model"], "error: no checkpoint at /no/such/model"),
        (["--token_budget=0"], "token_budget must be positive"),
        (["--token_budget=lots"], "--token_budget must be an integer or auto"),
        (["--sla_token_rate=0"], "SLA rates and span must be positive"),
        (["--kv_memory_fraction=1.5"], "--kv_memory_fraction must be in (0, 1)"),
        (["--policy=fastest"], "policy"),
        (["--api_key=clé"], "--api_key must be non-empty printable ASCII without spaces"),
    ],
)
def test_bad_flags_exit_with_a_message(tiny_random_dir, flags, message):
    args = [f"--model={tiny_random_dir}", "--port=0", *SMALL, *flags]
    proc = subprocess.run([sys.executable, "-m", "fastgen_jax.serve", *args], capture_output=True, text=True)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_port_in_use_is_named(tiny_random_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "fastgen_jax.serve",
                f"--model={tiny_random_dir}",
                f"--port={port}",
                *SMALL,
            ],
            capture_output=True,
            text=True,
        )
    assert proc.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr


def test_the_ready_line_comes_once_every_replicas_kv_pool_is_zeroed():
    """The pools are zeroed asynchronously while the programs compile: "ready" waits for them, or the
    first request would (seconds on a VM whose memory is touched for the first time)."""
    from types import SimpleNamespace

    from fastgen_jax import serve

    waited = []

    class Replica:
        def __init__(self, index):
            self.index = index
            self.runner = SimpleNamespace(num_compiled=8, compile_seconds=1.25)

        def wait_until_ready(self):
            waited.append(self.index)

    line = serve._readiness([Replica(0), Replica(1)])
    assert waited == [0, 1]
    assert re.fullmatch(r"fastgen-jax: ready in \d+\.\d s; compiled 16 programs in 2\.5 s", line)
