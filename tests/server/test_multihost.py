"""Multi-host serving on one machine: two `python -m fastgen_jax.serve` processes with 2 CPU devices
each join through `jax.distributed` and run one tensor-parallel-4 engine; process 0 serves HTTP and
sends each step's plan to process 1. Answers equal a single-device engine's, and both exit 0."""

import os
import queue
import signal
import socket
import subprocess
import sys
import threading

import httpx
import pytest

from fastgen_jax.config import EngineConfig
from fastgen_jax.offline import run_to_completion
from fastgen_jax.sampling_params import SamplingParams
from tests.server.conftest import make_engine
from tests.server.test_serve_cli import SMALL, wait_for_url

PROMPTS = ["The river runs", "Once upon a time", "1 2 3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model_dir, process_id: int, coordinator: str, *flags):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_COORDINATOR_ADDRESS": coordinator,
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": str(process_id),
    }
    args = [f"--model={model_dir}", "--port=0", "--served_model_name=tiny", *SMALL, *flags]
    return subprocess.Popen(
        [sys.executable, "-m", "fastgen_jax.serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def one_device_texts(model_dir) -> list[str]:
    engine = make_engine(
        model_dir, EngineConfig(token_budget=32, max_num_seqs=4, max_model_len=128, num_pages=64)
    )
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=16, ignore_eos=True)) for p in PROMPTS]
    responses = run_to_completion(engine, ids, progress=False)
    return [responses[i].generated_text for i in ids]


def test_two_processes_serve_one_tensor_parallel_engine_and_exit_together(tiny_random_dir):
    coordinator = f"127.0.0.1:{free_port()}"
    leader = launch(tiny_random_dir, 0, coordinator, "--tensor_parallel=4", "--max_seqs_per_request=4")
    follower = launch(tiny_random_dir, 1, coordinator, "--tensor_parallel=4")
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in leader.stdout], daemon=True).start()
    try:
        url = wait_for_url(leader, lines, timeout=300)
        body = {"model": "tiny", "prompt": PROMPTS, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        choices = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"]
        leader.send_signal(signal.SIGTERM)
        assert leader.wait(60) == 0
        assert follower.wait(60) == 0
    finally:
        leader.kill()
        follower.kill()
    assert [c["text"] for c in sorted(choices, key=lambda c: c["index"])] == one_device_texts(tiny_random_dir)
    out = follower.stdout.read()
    assert "process 1 following process 0" in out
    assert "the leader stopped" in out, out


FULL_ENV = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}


@pytest.mark.parametrize(
    "env, flags, message",
    [
        ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"}, [], "missing JAX_NUM_PROCESSES, JAX_PROCESS_ID"),
        ({**FULL_ENV, "JAX_PROCESS_ID": "two"}, [], "JAX_PROCESS_ID must be an integer"),
        (FULL_ENV, ["--replicas=2"], "--replicas=2: a multi-host group serves one engine"),
    ],
)
def test_a_bad_multihost_launch_is_named_before_joining(tiny_random_dir, env, flags, message):
    args = [f"--model={tiny_random_dir}", "--port=0", *SMALL, *flags]
    proc = subprocess.run(
        [sys.executable, "-m", "fastgen_jax.serve", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


@pytest.mark.slow  # 25 s (CI time); -m slow
def test_when_a_follower_dies_the_leader_fails_its_requests_and_exits_nonzero(tiny_random_dir):
    coordinator = f"127.0.0.1:{free_port()}"
    leader = launch(tiny_random_dir, 0, coordinator, "--tensor_parallel=4", "--step_timeout=5")
    follower = launch(tiny_random_dir, 1, coordinator, "--tensor_parallel=4")
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in leader.stdout], daemon=True).start()
    try:
        url = wait_for_url(leader, lines, timeout=300)
        body = {"model": "tiny", "prompt": "x", "max_tokens": 4}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
        follower.kill()
        follower.wait(30)
        # A collective with a dead peer raises (gloo) or hangs (the watchdog ends it): a clean 500 either way.
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 500 and "generation failed on the server" in r.json()["error"]["message"]
        assert leader.wait(60) == 3  # given up after --step_timeout: stuck, or failing throughout
        assert "exiting with status 3" in leader.stderr.read()
    finally:
        leader.kill()
        follower.kill()
