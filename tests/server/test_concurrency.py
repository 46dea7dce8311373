"""Many clients at once: streams equal the offline engine's greedy text; clients that leave free
their KV pages; a short soak with random aborts ends with nothing running and nothing leaked."""

import asyncio
import importlib.util
import pathlib

import httpx
import numpy as np
import openai
import pytest

from fastgen_jax.offline import run_to_completion
from fastgen_jax.sampling_params import SamplingParams
from tests.server.conftest import TINY_CONFIG, make_engine, metric, serving

ROOT = pathlib.Path(__file__).resolve().parents[2]
COUNTERS = (
    "fastgen_generation_tokens_total",
    'fastgen_requests_finished_total{finish_reason="length"}',
    "fastgen_time_to_first_token_seconds_count",
    "fastgen_e2e_request_latency_seconds_count",
)


def load_soak_module():
    spec = importlib.util.spec_from_file_location("soak_server", ROOT / "scripts" / "soak_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prompts_and_lengths(n=32, seed=0):
    rng = np.random.default_rng(seed)
    words = "river light stone quick brown fox jumps over lazy dog page token".split()
    prompts = [" ".join(rng.choice(words, rng.integers(1, 40))) for _ in range(n)]
    return prompts, rng.integers(4, 40, n).tolist()


@pytest.fixture(scope="module")
def server(tiny_random_dir):
    engine = make_engine(tiny_random_dir, TINY_CONFIG)
    with serving(engine) as url:
        yield url, engine


@pytest.fixture(scope="module")
def offline_texts(tiny_random_dir):
    """The same prompts through an offline engine, all queued at once."""
    engine = make_engine(tiny_random_dir, TINY_CONFIG)
    prompts, lengths = prompts_and_lengths()
    ids = [
        engine.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True))
        for p, n in zip(prompts, lengths, strict=True)
    ]
    responses = run_to_completion(engine, ids, progress=False)
    return [responses[i].generated_text for i in ids]


async def stream_all(url, prompts, lengths):
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    async def one(prompt, n):
        stream = await client.completions.create(
            model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        parts, finish = [], None
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        return "".join(parts), finish, len(parts)

    try:
        return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths, strict=True)))
    finally:
        await client.close()


def test_32_concurrent_streams_equal_the_offline_engine(server, offline_texts):
    url, _ = server
    prompts, lengths = prompts_and_lengths()
    before = {n: metric(url, n, missing=0.0) for n in COUNTERS}
    results = asyncio.run(stream_all(url, prompts, lengths))
    assert [text for text, _, _ in results] == offline_texts
    grown = {n: metric(url, n) - before[n] for n in COUNTERS}
    assert grown == {
        "fastgen_generation_tokens_total": sum(lengths),
        'fastgen_requests_finished_total{finish_reason="length"}': 32,
        "fastgen_time_to_first_token_seconds_count": 32,
        "fastgen_e2e_request_latency_seconds_count": 32,
    }
    assert all(finish == "length" for _, finish, _ in results)
    assert max(parts for _, _, parts in results) > 1  # text really arrived in pieces


def test_clients_leaving_mid_stream_free_their_pages(server):
    url, engine = server

    async def leave_early(client, i):
        body = {
            "model": "tiny",
            "prompt": f"page {i} " * 10,
            "max_tokens": 200,
            "ignore_eos": True,
            "stream": True,
        }
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    return  # closes the connection after the first chunk

    async def crowd():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            await asyncio.gather(*(leave_early(client, i) for i in range(24)))

    asyncio.run(crowd())
    soak = load_soak_module()
    after = soak.server_idle(url)
    assert after == {
        "requests_running": 0,
        "requests_waiting": 0,
        "requests_in_flight": 0,
        "kv_pages_used": 0,
    }
    finished = httpx.get(f"{url}/metrics").text
    assert 'fastgen_requests_finished_total{finish_reason="abort"} 24.0' in finished
    assert engine.scheduler.num_free_pages == engine.stats.total_pages


def test_short_soak_with_random_aborts_leaves_nothing_behind(server):
    url, engine = server
    soak = load_soak_module()
    result = asyncio.run(soak.run_load(url, num_requests=150, concurrency=32, abort_fraction=0.3, seed=1))
    assert result["failed"] == 0, result["failures"]
    assert result["ok"] + result["aborted"] == 150 and result["aborted"] > 10
    assert not any(soak.server_idle(url).values())
    assert engine.scheduler.num_free_pages == engine.stats.total_pages
    r = httpx.post(
        f"{url}/v1/completions", json={"model": "tiny", "prompt": "still serving", "max_tokens": 3}
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
