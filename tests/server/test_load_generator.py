"""The benchmark's load generator against a real server: every request gets exactly the prompt and
generation lengths the workload drew, and every generated token's arrival is recorded."""

import asyncio

import pytest

from fastgen_jax.benchmarks.load import Workload, closed_loop, load_step, poisson, sla_counters
from fastgen_jax.benchmarks.serving_metrics import SLA, summarize
from tests.server.conftest import TINY_CONFIG, make_engine, serving

WORKLOAD = Workload(prompt_mean=40, gen_mean=12, prompt_max=120, gen_max=24)


@pytest.fixture(scope="module")
def url(tiny_random_dir):
    with serving(make_engine(tiny_random_dir, TINY_CONFIG)) as url:
        yield url


def check(records, requests):
    assert len(records) == len(requests)
    assert sorted(r.prompt_tokens for r in records) == sorted(len(p) for p, _ in requests)
    assert sorted(r.output_tokens for r in records) == sorted(g for _, g in requests)
    # one chunk per token, except where a token's text is held back (part of a UTF-8 character)
    assert all(r.ok and 1 <= len(r.chunk_times) <= r.output_tokens for r in records), records
    assert all(r.send_time < r.chunk_times[0] <= r.chunk_times[-1] <= r.end_time for r in records)


def test_closed_loop_sends_every_request_with_its_lengths(url):
    requests = WORKLOAD.requests(9, seed=1)
    records, wall = asyncio.run(closed_loop(url, requests, clients=3, warmup=3))
    check(records, requests[3:])
    summary = summarize(records, wall, SLA(prompt_rate=1.0, token_rate=0.01))  # an SLA anyone meets
    assert summary["failed"] == 0 and summary["sla_fraction"] == 1.0
    assert summary["output_tokens_per_s"] == pytest.approx(sum(g for _, g in requests[3:]) / wall)


def test_poisson_sends_every_request_with_its_lengths(url):
    requests = WORKLOAD.requests(6, seed=2)
    records, wall = asyncio.run(poisson(url, requests, rate=20.0, seed=0))
    check(records, requests)
    assert wall > 0


def test_a_load_step_sends_every_request_and_the_server_judges_each(url):
    requests = WORKLOAD.requests(8, seed=3)
    before = sla_counters(url)
    records, _ = asyncio.run(load_step(url, requests, clients=(1, 4), step_after=2))
    check(records, requests)
    after = sla_counters(url)
    assert after["judged"] - before["judged"] == 8
    assert after["steps"] > before["steps"]  # the steps that served them
    assert after["deferred_decodes"] == after["prompts_past_deadline"] == 0  # not the "sla" policy
    for part in ("prompt", "generation", "both"):
        met, missed = (after[f"{part}_{o}"] - before[f"{part}_{o}"] for o in ("met", "missed"))
        assert met + missed == 8
