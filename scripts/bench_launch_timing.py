"""Early against late launch (`--launch_timing`) in process: a closed loop of clients on one engine.

Each of `--clients` clients sends its next request (FastGen-shaped: prompts ~ Normal(512, 154)
random token ids, generations ~ Normal(32, 10), EOS ignored) 5 ms after its last one finished, the
way `compare_policies.sh`'s closed loop does through the server, but in one process: the engine's
`step(intake=...)` takes the arrivals, as the server's engine thread does. Every timing runs its own
engine (same checkpoint, same compiled programs from the cache) on the same requests; each repeat
draws fresh prompts (no prefix-cache hits across runs). Per run: wall seconds, steps, requests within
the SLA (first token within prompt/--prompt_rate s, gap EMA within 1/--token_rate s), TTFT median,
and for late launch how often it waited and the device idle it caused (`engine.launch.LateLaunch`).

    python scripts/bench_launch_timing.py --clients=4 --policy=splitfuse --output_json=launch.json

Prints a markdown table and writes JSON (with `os.getloadavg()`).
"""

from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np
from absl import app, flags
from tqdm import tqdm

from fastgen_jax.benchmarks import trace
from fastgen_jax.checkpoints import load_checkpoint
from fastgen_jax.config import EngineConfig
from fastgen_jax.llm_engine import LLMEngine
from fastgen_jax.sampling_params import SamplingParams
from fastgen_jax.sla import SLA

flags.DEFINE_string("model", "checkpoints/smollm2-135m-instruct", "Checkpoint.")
flags.DEFINE_integer("clients", 4, "Closed-loop clients.")
flags.DEFINE_enum("policy", "splitfuse", ["splitfuse", "prefill_first", "sla"], "Scheduling policy.")
flags.DEFINE_integer("requests", 24, "Requests per run.")
flags.DEFINE_integer("repeats", 2, "Runs per timing (alternating timings).")
flags.DEFINE_float("prompt_rate", 256.0, "SLA: first token within prompt_tokens / this many seconds.")
flags.DEFINE_float("token_rate", 2.0, "SLA: gap EMA within 1 / this many seconds.")
flags.DEFINE_string("output_json", None, "Where to write the rows.")
FLAGS = flags.FLAGS
CLIENT_DELAY = 0.005  # a client's next request, after its last one finished


def run_once(engine: LLMEngine, prompts, shapes, clients: int, sla: SLA, tag: str) -> dict:
    waiting, free_at, sent, times = list(range(len(prompts))), [time.monotonic()] * clients, {}, {}

    def intake():
        now = time.monotonic()
        while waiting and free_at and min(free_at) <= now:
            free_at.remove(min(free_at))
            i = waiting.pop(0)
            rid = f"{tag}-{i}"
            sent[rid], times[rid] = now, []
            params = SamplingParams(max_new_tokens=shapes[i].output_tokens, ignore_eos=True)
            engine.add_request(prompt_token_ids=prompts[i], request_id=rid, sampling_params=params)

    late = engine._late
    waits, idle = (late.waits, late.idle_seconds) if late else (0, 0.0)
    start, steps = time.monotonic(), engine.stats.steps
    with tqdm(total=len(prompts), desc=tag, leave=False) as bar:
        while waiting or engine.has_unfinished():
            intake()
            if not engine.has_unfinished():
                time.sleep(0.001)
                continue
            for out in engine.step(intake=intake):
                times[out.request_id] += [out.time] * len(out.new_token_ids)
                if out.finished:
                    free_at.append(time.monotonic() + CLIENT_DELAY)
                    bar.update()
    prompt_of = {f"{tag}-{i}": len(p) for i, p in enumerate(prompts)}
    return {
        "wall_seconds": time.monotonic() - start,
        "steps": engine.stats.steps - steps,
        "within_sla": sum(sla.judge(sent[r], prompt_of[r], ts).both for r, ts in times.items()),
        "requests": len(prompts),
        "ttft_p50": statistics.median(ts[0] - sent[r] for r, ts in times.items()),
        "late_waits": (late.waits - waits) if late else 0,
        "device_idle_seconds": (late.idle_seconds - idle) if late else 0.0,
        "loadavg": os.getloadavg(),
    }


def main(_):
    checkpoint = load_checkpoint(FLAGS.model)
    shapes = trace.fastgen_shaped(FLAGS.requests, 1.0, 1, 512, 32, 900)
    rng = np.random.default_rng(0)
    sla = SLA(FLAGS.prompt_rate, FLAGS.token_rate)
    engines = {}
    for timing in ("early", "late"):
        config = EngineConfig(
            token_budget=256,
            max_num_seqs=32,
            max_model_len=1024,
            num_pages=2048,
            policy=FLAGS.policy,
            launch_timing=timing,
            sla_prompt_rate=FLAGS.prompt_rate,
            sla_token_rate=FLAGS.token_rate,
        )
        engines[timing] = LLMEngine(checkpoint, config, progress=False)
    rows = []
    print("| repeat | launch | wall (s) | steps | within SLA | TTFT p50 (s) | late waits | device idle (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for repeat in range(FLAGS.repeats):
        prompts = [rng.integers(100, 40000, s.prompt_tokens).tolist() for s in shapes]
        for timing, engine in engines.items():
            row = run_once(engine, prompts, shapes, FLAGS.clients, sla, f"{repeat}-{timing}")
            row.update(repeat=repeat, launch_timing=timing, clients=FLAGS.clients, policy=FLAGS.policy)
            rows.append(row)
            print(
                f"| {repeat} | {timing} | {row['wall_seconds']:.1f} | {row['steps']} | "
                f"{row['within_sla']}/{row['requests']} | {row['ttft_p50']:.2f} | {row['late_waits']} | "
                f"{row['device_idle_seconds']:.2f} |",
                flush=True,
            )
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump({"model": FLAGS.model, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
