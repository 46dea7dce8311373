"""Request traces: what a server saw, replayable open loop so a user can measure on their own traffic.

A trace is JSONL, one request a line, in arrival order:

    {"arrival": 0.0, "prompt_tokens": 512, "output_tokens": 32}

`arrival` is seconds from the first request. Write one from a server's request log
(`serve --request_log=requests.jsonl`):

    python -m fastgen_jax.benchmarks.trace requests.jsonl trace.jsonl [--since=<epoch seconds>]

and replay it with `scripts/bench_serving.py --trace=trace.jsonl --trace_speed=1.0`: request i is
sent at arrival_i / speed, with a prompt of exactly prompt_tokens random token ids, max_tokens =
output_tokens and `ignore_eos`, so the server does the same work whatever the model would have said.
Log lines with no generated token (aborted before the first one) are left out: they cannot be asked
for again. With no log at hand, `--fastgen_shaped=N --rate=R` writes a synthetic trace of FastGen's
shape: N Poisson arrivals at R per second, prompt and generation lengths ~ Normal(mean, 0.3 x mean)
as `bench_serving.py`'s closed loop draws them:

    python -m fastgen_jax.benchmarks.trace --fastgen_shaped=32 --rate=0.1 trace.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Iterable

import numpy as np

from fastgen_jax.benchmarks.load import open_loop
from fastgen_jax.benchmarks.serving_metrics import RequestRecord


@dataclasses.dataclass(frozen=True)
class TraceEntry:
    arrival: float  # seconds from the first request
    prompt_tokens: int
    output_tokens: int


def from_request_log(lines: Iterable[str], since: float | None = None) -> list[TraceEntry]:
    """The trace of a request log's lines (arrivals at or after `since`, epoch seconds, if given)."""
    logged = [json.loads(line) for line in lines if line.strip()]
    logged = [e for e in logged if e["output_tokens"] >= 1 and (since is None or e["arrival"] >= since)]
    logged.sort(key=lambda e: e["arrival"])
    start = logged[0]["arrival"] if logged else 0.0
    return [
        TraceEntry(round(e["arrival"] - start, 6), int(e["prompt_tokens"]), int(e["output_tokens"]))
        for e in logged
    ]


def fastgen_shaped(
    n: int, rate: float, seed: int = 0, prompt_mean: int = 512, gen_mean: int = 32, prompt_max: int = 900
) -> list[TraceEntry]:
    """n requests of FastGen's shape (Normal(mean, 0.3 x mean) lengths, clipped to [1, max]; generations
    at most 2 x gen_mean) arriving as a Poisson process of `rate` per second."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))

    def lengths(mean, high):
        return np.clip(np.rint(rng.normal(mean, 0.3 * mean, n)), 1, high).astype(int)

    prompts, gens = lengths(prompt_mean, prompt_max), lengths(gen_mean, 2 * gen_mean)
    start = arrivals[0]
    return [
        TraceEntry(round(float(t - start), 6), int(p), int(g))
        for t, p, g in zip(arrivals, prompts, gens, strict=True)
    ]


def read_trace(path: str) -> list[TraceEntry]:
    with open(path) as f:
        entries = [TraceEntry(**json.loads(line)) for line in f if line.strip()]
    if any(b.arrival < a.arrival for a, b in zip(entries, entries[1:], strict=False)):
        raise ValueError(f"{path}: arrivals must be in ascending order")
    return entries


def write_trace(entries: list[TraceEntry], path: str) -> None:
    with open(path, "w") as f:
        for e in entries:
            f.write(json.dumps(dataclasses.asdict(e)) + "\n")


def trace_requests(
    entries: list[TraceEntry], seed: int = 0, token_low: int = 100, token_high: int = 10000
) -> list[tuple[list[int], int]]:
    """(prompt token ids, output tokens) for each entry: random ordinary tokens of the exact length."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(token_low, token_high, e.prompt_tokens).tolist(), e.output_tokens) for e in entries]


async def replay(
    url: str,
    entries: list[TraceEntry],
    speed: float = 1.0,
    seed: int = 0,
    on_done: Callable[[], None] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Sends the trace open loop, request i at entries[i].arrival / speed seconds from the start."""
    if speed <= 0:
        raise ValueError(f"speed must be positive, got {speed}")
    send_times = [e.arrival / speed for e in entries]
    return await open_loop(url, trace_requests(entries, seed), send_times, on_done)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Writes a replayable trace from a server's request log.")
    parser.add_argument("request_log", nargs="?", help="the file `serve --request_log` wrote")
    parser.add_argument("trace", help="the JSONL trace to write")
    parser.add_argument("--since", type=float, help="only requests that arrived at or after this epoch time")
    parser.add_argument("--fastgen_shaped", type=int, help="write this many synthetic requests instead")
    parser.add_argument("--rate", type=float, default=0.1, help="their Poisson arrival rate (per second)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.request_log is None) == (args.fastgen_shaped is None):
        parser.error("give a request log or --fastgen_shaped=N, not both")
    if args.fastgen_shaped is not None:
        if args.fastgen_shaped < 1 or args.rate <= 0:
            parser.error(
                f"--fastgen_shaped must be >= 1 and --rate > 0, got {args.fastgen_shaped}, {args.rate}"
            )
        entries = fastgen_shaped(args.fastgen_shaped, args.rate, args.seed)
    else:
        with open(args.request_log) as f:
            entries = from_request_log(f, args.since)
    write_trace(entries, args.trace)
    span = entries[-1].arrival if entries else 0.0
    print(f"wrote {len(entries)} requests over {span:.1f} s to {args.trace}")


if __name__ == "__main__":
    main()
