"""Replicas behind one server (4 CPU devices, tests/conftest.py): 2 replicas x tensor parallel 2 serve
concurrent streams with exactly the single-device engine's text, the balancer spreads them, and it
routes by outstanding work, not in turn."""

import asyncio
import dataclasses
import re

import httpx
import jax
import pytest

from fastgen_jax.checkpoints import load_checkpoint
from fastgen_jax.config import EngineConfig
from fastgen_jax.llm_engine import LLMEngine
from fastgen_jax.offline import run_to_completion
from fastgen_jax.parallel import device_groups
from fastgen_jax.sampling_params import SamplingParams
from fastgen_jax.server.async_engine import GenerationRequest
from fastgen_jax.server.replicas import ReplicaRouter
from tests.server.conftest import serving
from tests.server.test_concurrency import prompts_and_lengths, stream_all

# One bucket and three page-table widths keep the five engines' compiles short.
CONFIG = EngineConfig(
    token_budget=64, token_buckets=(64,), max_num_seqs=32, max_model_len=256, num_pages=80, page_size=64
)

pytestmark = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices (see tests/conftest.py)")


def replica_engines(model_dir, tensor_parallel: int, replicas: int) -> list[LLMEngine]:
    checkpoint = load_checkpoint(model_dir)
    config = dataclasses.replace(CONFIG, tensor_parallel=tensor_parallel)
    groups = device_groups(tensor_parallel, replicas)
    return [LLMEngine(checkpoint, config, "float32", progress=False, devices=g) for g in groups]


def per_replica(text: str, name: str) -> dict[str, float]:
    return {m[0]: float(m[1]) for m in re.findall(rf'^{name}{{replica="(\d+)"}} (\S+)$', text, re.M)}


def one_device_texts(model_dir, prompts, lengths) -> list[str]:
    [engine] = replica_engines(model_dir, tensor_parallel=1, replicas=1)
    ids = [
        engine.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True))
        for p, n in zip(prompts, lengths, strict=True)
    ]
    responses = run_to_completion(engine, ids, progress=False)
    return [responses[i].generated_text for i in ids]


def test_two_replicas_of_tensor_parallel_2_serve_32_streams_like_one_device(tiny_random_dir):
    engines = replica_engines(tiny_random_dir, tensor_parallel=2, replicas=2)
    assert [len(e.runner.mesh.devices) for e in engines] == [2, 2]
    assert not set(engines[0].runner.mesh.devices.flat) & set(engines[1].runner.mesh.devices.flat)
    prompts, lengths = prompts_and_lengths()
    with serving(engines) as url:
        results = asyncio.run(stream_all(url, prompts, lengths))
        text = httpx.get(f"{url}/metrics").text
    assert [r[0] for r in results] == one_device_texts(tiny_random_dir, prompts, lengths)
    assert [r[1] for r in results] == ["length"] * len(prompts)
    routed = per_replica(text, "fastgen_replica_requests_routed_total")
    generated = per_replica(text, "fastgen_replica_generation_tokens_total")
    print(f"requests per replica: {routed}; tokens per replica: {generated}")
    assert sum(routed.values()) == len(prompts) and min(routed.values()) >= len(prompts) // 4
    assert sum(generated.values()) == sum(lengths)
    assert per_replica(text, "fastgen_replica_outstanding_work_tokens") == {"0": 0.0, "1": 0.0}


@pytest.fixture(scope="module")
def two_engines(tiny_random_dir):
    """Two one-device replicas, shared by the balancer tests (each starts with empty prefix caches)."""
    return replica_engines(tiny_random_dir, tensor_parallel=1, replicas=2)


def fresh(engines):
    for e in engines:
        e.reset_prefix_cache()
    return engines


def test_the_balancer_sends_work_to_the_replica_with_least_outstanding_tokens(two_engines):
    router = ReplicaRouter(fresh(two_engines))
    router.start()

    def request(i: int, prompt_len: int, new: int) -> GenerationRequest:
        params = SamplingParams(max_new_tokens=new, ignore_eos=True)
        return GenerationRequest(f"r{i}", list(range(10, 10 + prompt_len)), params)

    async def submit_all():
        groups = [router.submit([request(0, 200, 50)])]  # 250 tokens of work on replica 0
        groups += [router.submit([request(i, 5, 5)]) for i in range(1, 4)]  # 10 each
        for group in groups:
            async for _ in group:
                pass

    try:
        asyncio.run(submit_all())
        # Round robin would have given replica 0 two of the short ones.
        assert [r.routed for r in router.replicas] == [1, 3]
        assert [r.outstanding_work for r in router.replicas] == [0, 0]
    finally:
        router.stop()


@pytest.mark.parametrize("cache_aware", [True, False])
def test_the_cache_aware_balancer_keeps_a_prefix_on_its_replica_within_a_bounded_margin(
    two_engines, cache_aware
):
    router = ReplicaRouter(fresh(two_engines), cache_aware=cache_aware)
    router.start()
    system = [list(range(300, 430)), list(range(500, 630))]  # two 130-token system prompts: 2 pages each

    def request(name: str, prompt: list[int], new: int) -> GenerationRequest:
        return GenerationRequest(name, prompt, SamplingParams(max_new_tokens=new, ignore_eos=True))

    async def run(batch):
        outs = {}
        groups = [router.submit([r]) for r in batch]
        for group in groups:
            async for _, out in group:
                outs[out.request_id] = out
        return outs

    try:
        # a (system 0) and b (system 1) spread over the replicas; c and d follow their prefixes, although
        # least work alone would send c to replica 1 (its outstanding work is lower: b is shorter).
        batch = [
            request("a", system[0] + [1, 2, 3], 8),
            request("b", system[1] + [4], 2),
            request("c", system[0] + [5, 6], 8),
            request("d", system[1] + [7, 8, 9], 8),
        ]
        outs = asyncio.run(run(batch))
        assert [r.routed for r in router.replicas] == [2, 2]
        # Least work alone sends c to replica 1 (b is shorter than a) and d to replica 0: no hits.
        hits = 128 if cache_aware else 0  # two 64-token pages of the system prompt
        assert [outs[x].num_cached_tokens for x in "abcd"] == [0, 0, hits, hits]
        # A replica whose outstanding work exceeds the other's by more than the tokens a hit saves
        # does not get the request: e (system 0) would wait behind a long job on replica 0.
        long_job = request("long", list(range(700, 900)), 50)  # replica 0 (both idle: the lowest index)
        outs = asyncio.run(run([long_job, request("e", system[0] + [10], 4)]))
        assert [r.routed for r in router.replicas] == [3, 3]
        if cache_aware:  # (least work had sent c, of system 0, to replica 1)
            assert outs["e"].num_cached_tokens == 0
        assert [r.outstanding_work for r in router.replicas] == [0, 0]
    finally:
        router.stop()


def test_a_call_whose_caller_gave_up_is_skipped_without_harm():
    import concurrent.futures

    from fastgen_jax.server.async_engine import _call

    future = concurrent.futures.Future()
    future.cancel()
    _call(None, lambda engine: 1 / 0, future)  # neither runs nor raises
    assert future.cancelled()
    future = concurrent.futures.Future()
    _call(None, lambda engine: 1 / 0, future)
    assert isinstance(future.exception(), ZeroDivisionError)


def test_during_a_step_the_intake_applies_aborts_and_holds_engine_calls_and_stop_for_the_loop():
    """`LLMEngine.step` calls the server's intake while a step is in flight (late launch): adds and
    aborts apply then; an engine call (e.g. reset_prefix_cache) and a stop wait for the loop, in
    order, and the commands behind them too."""
    import concurrent.futures
    import types

    from fastgen_jax.server.async_engine import AsyncEngine

    calls = []
    engine = types.SimpleNamespace(
        engine_config=types.SimpleNamespace(max_num_seqs=4),
        abort=lambda rid: calls.append(("abort", rid)),
        refresh_stats=lambda: None,
    )
    server = AsyncEngine(engine)  # its thread is not started: the test is the engine thread
    future = concurrent.futures.Future()
    server._commands.put(("abort", ["a"]))
    server._commands.put(("call", (lambda e: calls.append(("call",)) or 7, future)))
    server._commands.put(("abort", ["b"]))
    server._commands.put(("stop", None))
    server._intake()
    assert calls == [("abort", "a")] and not future.done()
    assert server._take_commands(block=False) is False  # between steps: the call, the abort, the stop
    assert calls == [("abort", "a"), ("call",), ("abort", "b")] and future.result() == 7
