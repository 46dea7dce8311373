"""Failure paths: a failed forward pass fails only its own requests; /health (liveness) and /ready
(readiness) tell a dead process from a replica that is recovering; the router routes around a failing
replica and /metrics counts its failures; a stuck step trips the watchdog."""

import asyncio
import dataclasses
import threading
import time

import httpx
import jax
import pytest

from fastgen_jax.parallel import device_groups
from tests.server.conftest import TINY_CONFIG, make_engine, metric, serving
from tests.server.test_concurrency import load_soak_module


def completion(**fields):
    return {"model": "tiny", "prompt": "the quick brown fox", "max_tokens": 4, **fields}


def post_in_thread(url, body, results, key):
    thread = threading.Thread(
        target=lambda: results.__setitem__(key, httpx.post(url + "/v1/completions", json=body, timeout=60))
    )
    thread.start()
    return thread


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def engine(tiny_random_dir):
    return make_engine(tiny_random_dir, TINY_CONFIG)


def test_only_the_requests_in_the_failed_step_fail(engine):
    real_execute, entered, release = engine.runner.execute, threading.Event(), threading.Event()

    def block_then_fail(*args):
        engine.runner.execute = real_execute
        entered.set()
        release.wait(30)
        raise RuntimeError("XLA: device lost")

    engine.runner.execute = block_then_fail
    results = {}
    with serving(engine) as url:
        first = post_in_thread(url, completion(max_tokens=8), results, "in the step")
        assert entered.wait(30)  # the engine thread is inside the step of the first request
        queued = [post_in_thread(url, completion(max_tokens=8, seed=i), results, i) for i in range(3)]
        wait_for(lambda: metric(url, "fastgen_requests_in_flight") == 4)
        release.set()
        for t in [first, *queued]:
            t.join(60)
        assert results["in the step"].status_code == 500
        assert [results[i].status_code for i in range(3)] == [200, 200, 200]
        assert all(results[i].json()["choices"][0]["finish_reason"] == "length" for i in range(3))
        for name in ("fastgen_requests_running", "fastgen_kv_pages_used", "fastgen_requests_in_flight"):
            assert metric(url, name) == 0, name
    engine.runner.execute = real_execute


@pytest.fixture(scope="module")
def two_engines(tiny_random_dir):
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (see tests/conftest.py)")
    return [make_engine_on(tiny_random_dir, group) for group in device_groups(1, 2)]


def test_the_router_sends_work_around_a_failing_replica(two_engines):
    engines = two_engines
    real_execute = engines[0].runner.execute
    broken = [True]

    def maybe_fail(*args):
        if broken[0]:
            raise RuntimeError("device 0 fell over")
        return real_execute(*args)

    engines[0].runner.execute = maybe_fail  # the probe runs through it too
    with serving(engines) as url:
        statuses = [
            httpx.post(url + "/v1/completions", json=completion(), timeout=60).status_code for _ in range(8)
        ]
        assert statuses == [500] + [200] * 7  # the first pick is replica 0 (a tie); then never again
        ready = httpx.get(url + "/ready")
        assert ready.status_code == 200 and [r["ready"] for r in ready.json()["replicas"]] == [False, True]
        assert httpx.get(url + "/health").status_code == 200
        assert metric(url, 'fastgen_replica_requests_routed_total{replica="1"}') == 7
        assert metric(url, 'fastgen_replica_step_failures_total{replica="0"}') >= 1
        assert metric(url, 'fastgen_replica_step_failures_total{replica="1"}') == 0
        assert metric(url, 'fastgen_replica_ready{replica="0"}') == 0
        broken[0] = False  # the device comes back: the next probe (within seconds) finds it
        wait_for(lambda: httpx.get(url + "/ready").json()["replicas"][0]["ready"], timeout=20)
        assert metric(url, 'fastgen_replica_ready{replica="0"}') == 1


def test_a_short_chaos_soak_ends_every_request_cleanly_and_replica_0_keeps_serving(two_engines):
    soak = load_soak_module()
    with soak.chaos_server(two_engines, failure_rate=0.05, seed=3) as url:
        result = asyncio.run(
            soak.run_chaos_load(url, num_requests=150, concurrency=16, seed=3, request_timeout=60)
        )
        assert result["failed"] == 0 and result["hung"] == 0, result["failures"]
        assert result["ok"] > 50 and result["rejected"] > 0 and result["aborted"] > 0, result
        assert result["clean_error"] > 0, result  # replica 1's failures reached clients as clean errors
        assert not any(soak.server_idle(url).values())
        figures = soak.replica_figures(url)
        assert figures["step_failures_total"]["0"] == 0 and figures["step_failures_total"]["1"] > 0
        assert figures["requests_routed_total"]["0"] > 0
    assert all(e.scheduler.num_free_pages == e.stats.total_pages for e in two_engines)


def make_engine_on(model_dir, devices):
    from fastgen_jax.llm_engine import LLMEngine

    config = dataclasses.replace(TINY_CONFIG, token_buckets=(64,))  # one bucket: a short compile
    return LLMEngine.from_pretrained(str(model_dir), config, "float32", progress=False, devices=devices)


def test_a_stuck_step_trips_the_watchdog(engine):
    real_execute, release = engine.runner.execute, threading.Event()

    def stuck(*args):  # like a collective whose peer died
        release.wait(60)
        return real_execute(*args)

    stalls = []
    engine.runner.execute = stuck
    try:
        with serving(engine, step_timeout=1.0, on_stall=stalls.append) as url:
            start = time.perf_counter()
            r = httpx.post(url + "/v1/completions", json=completion(), timeout=30)
            assert r.status_code == 500 and time.perf_counter() - start < 5
            assert stalls == [0]
            assert httpx.get(url + "/health").status_code == 503  # liveness fails: restart me
            assert httpx.get(url + "/ready").status_code == 503
            release.set()
    finally:
        engine.runner.execute = real_execute
        release.set()
