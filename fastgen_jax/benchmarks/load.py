"""Load for a running OpenAI-compatible server, the way FastGen measured: closed-loop clients (also
with a step in their number mid-run), or open loop: a Poisson stream of requests as `vllm bench serve`
sends, or requests at given times (trace replay, `benchmarks.trace`).

Prompts are token ids (the completions API takes them), so their lengths are exact whatever the
server's tokenizer; lengths follow Normal(mean, 0.3 x mean), clipped, and every request sets
`ignore_eos` so it generates exactly its length. Each request streams, and the time of every chunk is
recorded (`RequestRecord`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import httpx
import numpy as np

from fastgen_jax.benchmarks.serving_metrics import RequestRecord


@dataclasses.dataclass(frozen=True)
class Workload:
    prompt_mean: int
    gen_mean: int
    prompt_max: int
    gen_max: int
    token_low: int = 100  # prompt ids are drawn from [token_low, token_high): ordinary tokens
    token_high: int = 10000

    def requests(self, n: int, seed: int) -> list[tuple[list[int], int]]:
        """n (prompt token ids, generation length) pairs."""
        rng = np.random.default_rng(seed)

        def lengths(mean, high):
            return np.clip(np.rint(rng.normal(mean, 0.3 * mean, n)), 1, high).astype(int)

        prompts, gens = lengths(self.prompt_mean, self.prompt_max), lengths(self.gen_mean, self.gen_max)
        return [
            (rng.integers(self.token_low, self.token_high, p).tolist(), int(g))
            for p, g in zip(prompts, gens, strict=True)
        ]


async def served_model(client: httpx.AsyncClient) -> str:
    r = await client.get("/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def stream_request(
    client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int
) -> RequestRecord:
    """One streamed completion; never raises for a server error (the record carries it)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    record = RequestRecord(time.perf_counter(), [], len(prompt), 0)
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                record.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return record
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    record.chunk_times.append(time.perf_counter())
                if chunk.get("usage"):
                    record.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    record.output_tokens = chunk["usage"]["completion_tokens"]
                if "error" in chunk:
                    record.error = str(chunk["error"])
    except httpx.HTTPError as e:
        record.error = f"{type(e).__name__}: {e}"
    record.end_time = time.perf_counter()
    if record.output_tokens == 0 and record.error is None:
        record.output_tokens = len(record.chunk_times)  # a server without include_usage
    return record


async def closed_loop(
    url: str,
    requests: list[tuple[list[int], int]],
    clients: int,
    warmup: int = 0,
    on_done: Callable[[], None] | None = None,
) -> tuple[list[RequestRecord], float]:
    """`clients` workers, each sending its next request when its last one ends. The first `warmup`
    requests are sent the same way but left out of the records and the wall time."""
    async with _client(url, clients) as client:
        model = await served_model(client)
        await _workers(client, model, iter(requests[:warmup]), clients, [])
        records: list[RequestRecord] = []
        start = time.perf_counter()
        await _workers(client, model, iter(requests[warmup:]), clients, records, on_done)
        return records, time.perf_counter() - start


async def load_step(
    url: str,
    requests: list[tuple[list[int], int]],
    clients: tuple[int, int],
    step_after: int,
    on_done: Callable[[], None] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Closed loop whose client count jumps from clients[0] to clients[1] once `step_after` requests
    have finished; every worker takes the next request of the same list."""
    before, after = clients
    async with _client(url, after) as client:
        model = await served_model(client)
        pending, records = iter(requests), []
        stepped = asyncio.Event()

        def done():
            if len(records) >= step_after:
                stepped.set()
            if on_done:
                on_done()

        async def join_later():
            await stepped.wait()
            await _workers(client, model, pending, after - before, records, done)

        start = time.perf_counter()
        first = asyncio.ensure_future(_workers(client, model, pending, before, records, done))
        first.add_done_callback(lambda _: stepped.set())  # fewer requests than step_after
        await asyncio.gather(first, join_later())
        return records, time.perf_counter() - start


async def open_loop(
    url: str,
    requests: list[tuple[list[int], int]],
    send_times: list[float],
    on_done: Callable[[], None] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Request i is sent `send_times[i]` seconds after the start (ascending), whatever is in flight."""
    async with _client(url, None) as client:
        model = await served_model(client)
        start = time.perf_counter()

        async def one(prompt, gen):
            record = await stream_request(client, model, prompt, gen)
            if on_done:
                on_done()
            return record

        tasks = []
        for (prompt, gen), at in zip(requests, send_times, strict=True):
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(prompt, gen)))
        records = await asyncio.gather(*tasks)
        return list(records), time.perf_counter() - start


async def poisson(
    url: str,
    requests: list[tuple[list[int], int]],
    rate: float,
    seed: int = 0,
    on_done: Callable[[], None] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Open loop: request i is sent at the i-th arrival of a Poisson process of `rate` per second."""
    rng = random.Random(seed)
    send_times = list(itertools.accumulate(rng.expovariate(rate) for _ in requests))
    return await open_loop(url, requests, send_times, on_done)


def _client(url: str, clients: int | None) -> httpx.AsyncClient:
    """A client for `clients` concurrent streams (None: as many as the load needs)."""
    n = None if clients is None else clients + 4
    return httpx.AsyncClient(
        base_url=url, timeout=None, limits=httpx.Limits(max_connections=n, max_keepalive_connections=n)
    )


async def _workers(client, model, pending, clients, records, on_done=None) -> None:
    """`clients` workers that take requests from the iterator `pending` until it is empty."""

    async def worker():
        for prompt, gen in pending:
            records.append(await stream_request(client, model, prompt, gen))
            if on_done:
                on_done()

    await asyncio.gather(*(worker() for _ in range(clients)))


_STEP_COUNTERS = {
    "fastgen_steps_total": "steps",
    "fastgen_sla_deferred_decodes_total": "deferred_decodes",
    "fastgen_sla_prompts_past_deadline_total": "prompts_past_deadline",
}


def sla_counters(url: str) -> dict[str, float]:
    """Our server's SLA counters from /metrics: "judged", then "<part>_<outcome>" for each part
    (prompt, generation, both) and outcome (met, missed), the SLA it judges by ("prompt_rate",
    "token_rate"), the forward passes it ran ("steps") and the "sla" policy's decisions
    ("deferred_decodes", "prompts_past_deadline": zero under the other policies)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    counts = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fastgen_requests_judged_total":
                counts["judged"] = sample.value
            elif sample.name in ("fastgen_sla_prompt_rate", "fastgen_sla_token_rate"):
                counts[sample.name.removeprefix("fastgen_sla_")] = sample.value
            elif sample.name in _STEP_COUNTERS:
                counts[_STEP_COUNTERS[sample.name]] = sample.value
            elif sample.name == "fastgen_sla_requests_total":
                counts[f"{sample.labels['part']}_{sample.labels['outcome']}"] = sample.value
    return counts


def start_server(flags: list[str], echo: bool = False) -> tuple[subprocess.Popen, str]:
    """Starts `python -m fastgen_jax.serve --port=0 <flags>` and returns it with the URL it prints
    once its programs are compiled (`echo` copies its stdout until then). Its stderr goes to an
    unnamed temporary file, whose last lines the error quotes if it exits before listening."""
    args = [sys.executable, "-m", "fastgen_jax.serve", "--port=0", *flags]
    stderr = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr, text=True)
    for line in proc.stdout:
        if echo:
            print(line, end="", flush=True)
        if match := re.search(r" on (http://\S+) ", line):
            return proc, match.group(1)
    code = proc.wait()
    stderr.seek(0)
    tail = "".join(stderr.readlines()[-20:])
    raise RuntimeError(f"the server exited ({code}) before listening; its last words:\n{tail}")
