"""Whole decode steps of SmolLM2 (float32, the CPU kernels) compiled under different values of
`cpu_kernels.matmul.STREAM_ROWS`, timed in turns in one process so a slow spell of a shared machine
falls on all of them. The steps are `scripts/profile_step.py`'s synthetic plans (pages scattered).

    python scripts/ab_stream_rows.py --stream_rows=8,0 --decode_seqs=1,4,16 --context=128

Prints the median and best device ms of each step program and writes JSON.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

flags.DEFINE_list("stream_rows", ["8", "0"], "Values of STREAM_ROWS to compare (0: register tiles only).")
flags.DEFINE_integer("context", 128, "Each sequence's context.")
flags.DEFINE_integer("calls", 25, "Timed calls of each program (after 3 untimed).")
flags.DEFINE_string("output_json", "docs/benchmarks/stream_rows_cpu.json", "Where to write the figures.")
FLAGS = flags.FLAGS
import profile_step  # noqa: E402  (its flags, --model among them)


def main(argv):
    del argv
    import jax
    import numpy as np

    import cpu_kernels.matmul as cm
    from fastgen_jax.benchmarks.timing import times_in_turns, write_report
    from fastgen_jax.checkpoints import load_checkpoint
    from fastgen_jax.config import EngineConfig
    from fastgen_jax.llm_engine import LLMEngine

    config = EngineConfig(
        token_budget=256, max_num_seqs=max(int(s) for s in FLAGS.decode_seqs) + 1, max_model_len=2048,
        num_pages=512, page_size=16, enable_prefix_caching=False,
    )  # fmt: skip
    engine = LLMEngine(
        load_checkpoint(FLAGS.model, "float32"), config, "float32", warmup=False, progress=False
    )
    runner, default, rows = engine.runner, cm.STREAM_ROWS, []
    for seqs in (int(s) for s in FLAGS.decode_seqs):
        plan = profile_step.synthetic_plan(engine, [(FLAGS.context - 1, 1)] * seqs, np.random.default_rng(0))
        programs = {}
        for value in (int(v) for v in FLAGS.stream_rows):
            cm.STREAM_ROWS = value
            jax.clear_caches()  # else the model's trace, made under another value, is reused
            runner._executables.pop(plan.shape, None)
            runner.compile(plan)
            programs[value] = runner._executables.pop(plan.shape)
        cm.STREAM_ROWS = default
        args = runner.step_args(plan)

        def call(program, args=args):
            out, runner.kv_cache, _ = program(runner.params, runner.kv_cache, runner.sampled_tokens, *args)
            jax.block_until_ready(out)

        calls = {value: (lambda p=program: call(p)) for value, program in programs.items()}
        times = times_in_turns(calls, FLAGS.calls, warmup=3)
        row = {"seqs": seqs, "context": FLAGS.context, "bucket": plan.bucket}
        row |= {
            f"stream_rows={v}": {"median_ms": 1e3 * float(np.median(t)), "best_ms": 1e3 * min(t)}
            for v, t in times.items()
        }
        rows.append(row)
        cells = ", ".join(
            f"{k}: median {v['median_ms']:.1f} best {v['best_ms']:.1f}" for k, v in row.items() if "=" in k
        )
        print(f"decode {seqs}x{FLAGS.context} (slab {plan.bucket} rows): {cells} ms", flush=True)
    if FLAGS.output_json:
        write_report(FLAGS.output_json, rows)


if __name__ == "__main__":
    app.run(main)
