"""Host time per engine step, and what overlapping it with the device buys (steps per second).

`--measure=host`: many sequences decode on a model whose device work is small (1 layer, 64 wide, a
512-token vocabulary, SmolLM2's tokenizer for detokenizing); per step it times schedule + plan (the
host work that must happen before a step can launch) and the engine's whole host time (schedule,
plan, detokenize, stop checks: `stats.host_seconds`), one step at a time so nothing overlaps. It runs
against whichever `fastgen_jax` is first on the path, so the same command measures a tree from before
the step plan (`PYTHONPATH=/path/to/old/tree`).

`--measure=planner`: schedule + plan alone, no model and no device (the scheduler and planner are
numpy only; a step's sampled tokens are drawn at random): the host code's own cost with its caches
warm, beside `host`'s, which pays for caches the device step and output processing left cold. It also
runs under `valgrind --tool=callgrind` (instructions: deterministic where timings are noisy).

`--measure=overlap`: steps per second of steady decoding with `async_scheduling` off and on (the
same engine and compiled programs, the flag flipped between runs), for the tiny model or
`--model=<checkpoint>` (e.g. SmolLM2).

    python scripts/bench_host_step.py --measure=host --num_seqs=16,64,256
    python scripts/bench_host_step.py --measure=planner --num_seqs=16,64,256
    python scripts/bench_host_step.py --measure=overlap --num_seqs=16,64,256
    python scripts/bench_host_step.py --measure=overlap --model=checkpoints/smollm2-135m-instruct

Prints a markdown table and writes JSON (with `os.getloadavg()`: on a shared machine, timings are
only comparable at similar load).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time

import jax
import numpy as np
from absl import app, flags

from fastgen_jax.checkpoints import Checkpoint, load_checkpoint
from fastgen_jax.config import EngineConfig, ModelConfig
from fastgen_jax.engine.batch import StepPlanner
from fastgen_jax.engine.scheduler import Scheduler
from fastgen_jax.engine.sequence import Sequence
from fastgen_jax.llm_engine import LLMEngine
from fastgen_jax.models import param_shapes
from fastgen_jax.sampling_params import SamplingParams
from fastgen_jax.tokenizer import Tokenizer

FLAGS = flags.FLAGS
flags.DEFINE_enum(
    "measure", "host", ["host", "planner", "overlap"], "What to measure (see the module docstring)."
)
flags.DEFINE_list("num_seqs", ["16", "64", "256"], "Sequences decoding together, one run each.")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per sequence.")
flags.DEFINE_integer("decode_steps", 32, "Decode steps timed per run.")
flags.DEFINE_string("model", "", "A checkpoint to run instead of the tiny random model.")
flags.DEFINE_integer("vocab_size", 512, "Vocabulary of the tiny random model.")
flags.DEFINE_string(
    "tokenizer_from", "checkpoints/smollm2-135m-instruct", "Model dir of the tokenizer (no weights needed)."
)
flags.DEFINE_string("output_json", "", "Where to write results (default: docs/benchmarks/<measure>...).")


def tiny_checkpoint(tokenizer, vocab_size: int) -> Checkpoint:
    config = ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=32,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    shapes = param_shapes(config)
    keys = iter(jax.random.split(jax.random.PRNGKey(0), len(jax.tree.leaves(shapes))))
    params = jax.tree.map(lambda s: 0.2 * jax.random.normal(next(keys), s.shape, s.dtype), shapes)
    return Checkpoint(config, params, tokenizer, "tiny-random")


def make_config(max_seqs: int) -> EngineConfig:
    buckets = sorted({*(int(n) for n in FLAGS.num_seqs), 512})
    return EngineConfig(
        token_budget=512, token_buckets=tuple(buckets), max_num_seqs=max_seqs, max_model_len=256, page_size=16
    )


def make_engine(max_seqs: int, vocab: int) -> LLMEngine:
    config = make_config(max_seqs)
    if FLAGS.model:
        checkpoint = load_checkpoint(FLAGS.model)
    else:
        checkpoint = tiny_checkpoint(Tokenizer.from_hf_dir(FLAGS.tokenizer_from), vocab)
    return LLMEngine(checkpoint, config, progress=True)


def set_overlap(engine: LLMEngine, on: bool) -> bool:
    """Flips async_scheduling where this tree has it; False where it does not (a tree from before)."""
    if "async_scheduling" not in EngineConfig.__dataclass_fields__:
        return False
    engine.engine_config = dataclasses.replace(engine.engine_config, async_scheduling=on)
    return True


def start_decoding(engine: LLMEngine, n: int, vocab: int) -> list[str]:
    rng = np.random.default_rng(n)
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)
    ids = [
        engine.add_request(
            prompt_token_ids=rng.integers(3, vocab, FLAGS.prompt_len).tolist(), sampling_params=params
        )
        for _ in range(n)
    ]
    while engine.scheduler.num_waiting or any(s.is_prefilling for s in engine.scheduler.running):
        engine.step()
    engine.step()
    return ids


class Timed:
    """Wraps a method so each call's seconds are summed."""

    def __init__(self, owner, name: str):
        self.owner, self.name, self.seconds = owner, name, 0.0
        self.real = getattr(owner, name)
        setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.real(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def host_run(engine: LLMEngine, n: int, vocab: int) -> dict:
    set_overlap(engine, False)
    ids = start_decoding(engine, n, vocab)
    planner = getattr(engine, "planner", None) or engine.slab_builder  # the tree before: a slab builder
    timers = [Timed(engine.scheduler, "schedule"), Timed(planner, "build")]
    if hasattr(engine, "_sampling_arrays"):  # the tree before built the sampling arrays apart
        timers.append(Timed(engine, "_sampling_arrays"))
    plan_ms, host_ms = [], []
    for _ in range(FLAGS.decode_steps):
        before, host = sum(t.seconds for t in timers), engine.stats.host_seconds
        outs = engine.step()
        assert len(outs) == n, "every sequence decodes every step"
        plan_ms.append(1e3 * (sum(t.seconds for t in timers) - before))
        host_ms.append(1e3 * (engine.stats.host_seconds - host))
    for t in timers:
        setattr(t.owner, t.name, t.real)
    for rid in ids:
        engine.abort(rid)
    return {
        "num_seqs": n,
        "schedule_plan_ms_p50": statistics.median(plan_ms),
        "schedule_plan_ms_p90": float(np.percentile(plan_ms, 90)),
        "host_ms_p50": statistics.median(host_ms),
        "host_ms_p90": float(np.percentile(host_ms, 90)),
    }


def planner_run(engine: LLMEngine, n: int, vocab: int) -> dict:
    """Schedule + plan of steady decoding on a scheduler and planner of their own (the engine's
    config), the device replaced by random tokens."""
    del engine
    config = dataclasses.replace(make_config(n), num_pages=n * 17)
    scheduler = Scheduler(config)
    planner = StepPlanner.for_scheduler(scheduler)
    rng = np.random.default_rng(n)
    params = SamplingParams(max_new_tokens=200, ignore_eos=True).with_seed()
    for i in range(n):
        scheduler.add(Sequence(f"r{i}", rng.integers(3, vocab, FLAGS.prompt_len).tolist(), 200, params))

    def step() -> float:
        start = time.perf_counter()
        output = scheduler.schedule()
        planner.build(output)
        seconds = time.perf_counter() - start
        scheduler.postprocess(output, rng.integers(3, vocab, output.num_seqs))
        return seconds

    while scheduler.num_waiting or any(s.is_prefilling for s in scheduler.running):
        step()  # the prompts, untimed
    times = [step() for _ in range(FLAGS.decode_steps)]
    plan_ms = [1e3 * t for t in times]
    return {
        "num_seqs": n,
        "schedule_plan_ms_p50": statistics.median(plan_ms),
        "schedule_plan_ms_p90": float(np.percentile(plan_ms, 90)),
    }


def overlap_run(engine: LLMEngine, n: int, vocab: int) -> dict:
    row = {"num_seqs": n}
    for on in (True, False):
        if not set_overlap(engine, on):
            raise SystemExit("this tree has no async_scheduling")
        ids = start_decoding(engine, n, vocab)
        start, tokens = time.perf_counter(), 0
        for _ in range(FLAGS.decode_steps):
            tokens += sum(len(out.new_token_ids) for out in engine.step())
        seconds = time.perf_counter() - start
        mode = "on" if on else "off"
        row[f"steps_per_s_{mode}"] = FLAGS.decode_steps / seconds
        row[f"tokens_per_s_{mode}"] = tokens / seconds
        for rid in ids:
            engine.abort(rid)
    row["speedup"] = row["steps_per_s_on"] / row["steps_per_s_off"]
    return row


def print_table(rows: list[dict]) -> None:
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


def main(argv):
    del argv
    sizes = [int(n) for n in FLAGS.num_seqs]
    vocab = FLAGS.vocab_size
    engine = None if FLAGS.measure == "planner" else make_engine(max(sizes), vocab)
    vocab = vocab if engine is None else engine.model_config.vocab_size
    run = {"host": host_run, "planner": planner_run, "overlap": overlap_run}[FLAGS.measure]
    rows = []
    for n in sizes:
        load_before = os.getloadavg()[0]
        rows.append({**run(engine, n, vocab), "load_1min": round((load_before + os.getloadavg()[0]) / 2, 2)})
    print_table(rows)
    model = FLAGS.model or f"tiny random (1 layer, vocab {vocab})"
    if FLAGS.measure == "planner":
        model = "none: scheduler and planner only, random tokens"
    path = FLAGS.output_json or f"docs/benchmarks/host_step_{FLAGS.measure}_cpu.json"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        info = {"machine": platform.machine(), "cpus": os.cpu_count(), "jax": jax.__version__, "model": model}
        json.dump({**info, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
