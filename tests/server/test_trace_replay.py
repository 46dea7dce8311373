"""Trace replay reproduces a recorded run: a run against the tiny server with the request log on is
exported as a trace and replayed against a fresh server, whose log then shows the same requests."""

import asyncio

import pytest

from fastgen_jax.benchmarks.load import open_loop
from fastgen_jax.benchmarks.trace import from_request_log, replay
from tests.server.conftest import TINY_CONFIG, make_engine, serving

JITTER = 0.3  # seconds; generous: this checks the pacing, not the machine's speed
SEND_TIMES = [0.0, 0.4, 0.8, 1.5, 1.9, 2.6]
LENGTHS = [(12, 5), (40, 3), (7, 9), (25, 1), (60, 6), (3, 4)]  # (prompt tokens, output tokens)


@pytest.fixture(scope="module")
def engine(tiny_random_dir):
    return make_engine(tiny_random_dir, TINY_CONFIG)


def logged_trace(engine, log, send):
    with serving(engine, request_log=str(log)) as url:
        records, _ = asyncio.run(send(url))
    assert all(r.ok for r in records)
    with open(log) as f:
        return from_request_log(f)


def test_a_replayed_trace_has_the_recorded_lengths_in_order_and_its_arrival_times(engine, tmp_path):
    requests = [(list(range(100, 100 + p)), g) for p, g in LENGTHS]
    recorded = logged_trace(engine, tmp_path / "a.jsonl", lambda url: open_loop(url, requests, SEND_TIMES))
    assert [(e.prompt_tokens, e.output_tokens) for e in recorded] == LENGTHS
    assert all(abs(e.arrival - t) < JITTER for e, t in zip(recorded, SEND_TIMES, strict=True)), recorded

    replayed = logged_trace(engine, tmp_path / "b.jsonl", lambda url: replay(url, recorded, speed=1.0))
    assert [(e.prompt_tokens, e.output_tokens) for e in replayed] == LENGTHS
    assert all(abs(a.arrival - b.arrival) < JITTER for a, b in zip(replayed, recorded, strict=True)), replayed


def test_a_trace_replayed_at_double_speed_arrives_in_half_the_time(engine, tmp_path):
    requests = [(list(range(100, 100 + p)), g) for p, g in LENGTHS]
    recorded = logged_trace(engine, tmp_path / "a.jsonl", lambda url: open_loop(url, requests, SEND_TIMES))
    replayed = logged_trace(engine, tmp_path / "b.jsonl", lambda url: replay(url, recorded, speed=2.0))
    assert [(e.prompt_tokens, e.output_tokens) for e in replayed] == LENGTHS
    assert all(abs(a.arrival - b.arrival / 2) < JITTER for a, b in zip(replayed, recorded, strict=True))
