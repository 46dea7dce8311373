"""Step times of the engine against the machine's rooflines: decode steps (HBM-bound) and full-budget
prefill steps (matmul-bound).

    python scripts/bench_step_roofline.py --model=checkpoints/llama2-7b-random        # on a GPU
    python scripts/bench_step_roofline.py --model=checkpoints/smollm2-135m-instruct --decode_batches=1,8 \
        --context=256 --token_budget=128                                            # on a CPU

Two ceilings are measured first with JAX on this device: a large matrix product (FLOP/s) and a large
element-wise add (bytes/s, read + write). For a decode step of B sequences at context C the floor is
max(FLOPs / matmul rate, (weight bytes + KV bytes read) / bandwidth), with FLOPs = 2 x params x B +
4 x layers x heads x head_dim x B x C and KV bytes = 2 x layers x kv_heads x head_dim x B x C x dtype
size. For a prefill step of T prompt tokens it is max(2 x params x T / matmul rate, weight bytes /
bandwidth). A step's time is the engine's whole `step()` (host work included), median of several.
Prints a table and writes JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "checkpoints/llama2-7b-random", "Model directory.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: bf16 on GPU, f32 on CPU).")
flags.DEFINE_list("decode_batches", ["1", "16", "64", "256"], "Sequences per decode step.")
flags.DEFINE_integer("context", 1024, "Context length of every decoding sequence.")
flags.DEFINE_integer("token_budget", 768, "Tokens per prefill step (FastGen's default budget).")
flags.DEFINE_integer("repeats", 8, "Timed steps per point (median reported).")
flags.DEFINE_string("output", "docs/benchmarks/step_roofline.json", "JSON output path.")


def ceilings(dtype) -> tuple[float, float]:
    """(matmul FLOP/s, bandwidth bytes/s) measured on the default device."""
    import jax
    import jax.numpy as jnp

    gpu = jax.default_backend() == "gpu"
    n = 8192 if gpu else 1024
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    x = jax.random.normal(jax.random.PRNGKey(2), ((1 << 28) if gpu else (1 << 24),), jnp.float32)
    mm, add = jax.jit(lambda a, b: a @ b), jax.jit(lambda x: x + 1.0)

    def best(f, *args):
        f(*args).block_until_ready()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            f(*args).block_until_ready()
            times.append(time.perf_counter() - start)
        return min(times)

    return 2 * n**3 / best(mm, a, b), 2 * x.nbytes / best(add, x)


def timed_steps(engine, repeats: int, want_samples: int | None = None) -> float:
    times = []
    while len(times) < repeats:
        start = time.perf_counter()
        outs = engine.step()
        elapsed = time.perf_counter() - start
        if want_samples is None or len(outs) == want_samples:
            times.append(elapsed)
    return statistics.median(times)


def main(argv):
    del argv
    from fastgen_jax.checkpoints import load_checkpoint
    from fastgen_jax.config import EngineConfig
    from fastgen_jax.llm_engine import LLMEngine
    from fastgen_jax.runner import default_dtype
    from fastgen_jax.sampling_params import SamplingParams

    dtype = FLAGS.dtype or default_dtype()
    checkpoint = load_checkpoint(FLAGS.model, dtype)
    c = checkpoint.config
    batches = [int(b) for b in FLAGS.decode_batches]
    budget = max(FLAGS.token_budget, max(batches))
    max_len = FLAGS.context + 4 * FLAGS.repeats + 8
    pages = max(batches) * (-(-max_len // 16)) + 1 + 2 * (-(-(3 * budget + 8) // 16))
    max_len = max(max_len, 3 * budget + 8)
    config = EngineConfig(
        token_budget=budget, max_num_seqs=max(batches), max_model_len=max_len, num_pages=pages
    )
    engine = LLMEngine(checkpoint, config, dtype)
    import jax
    import jax.numpy as jnp

    flops_rate, bandwidth = ceilings(jnp.dtype(dtype))
    size = jnp.dtype(dtype).itemsize
    embed = c.vocab_size * c.hidden_size
    params = sum(x.size for x in jax.tree_util.tree_leaves(engine.runner.params))
    weight_bytes = params * size
    body_params = params - embed * (1 if c.tie_word_embeddings else 2)
    rows = []
    greedy = SamplingParams(max_new_tokens=4 * FLAGS.repeats + 4, ignore_eos=True)
    for b in batches:
        ids = [engine.add_request(prompt_token_ids=[100 + i % 1000] * FLAGS.context, sampling_params=greedy)
               for i in range(b)]  # fmt: skip
        while any(len(o.new_token_ids) == 0 for o in engine.step()) or engine.scheduler.num_waiting:
            pass  # prefill until every sequence decodes
        t = timed_steps(engine, FLAGS.repeats, want_samples=b)
        attention_flops = 4 * c.num_layers * c.num_heads * c.head_dim * b * FLAGS.context
        flops = 2 * (body_params + c.vocab_size * c.hidden_size) * b + attention_flops
        kv_bytes = 2 * c.num_layers * c.num_kv_heads * c.head_dim * b * FLAGS.context * size
        floor = max(flops / flops_rate, (weight_bytes + kv_bytes) / bandwidth)
        rows.append({"step": "decode", "sequences": b, "context": FLAGS.context, "ms": t * 1e3,
                     "floor_ms": floor * 1e3, "fraction_of_floor": floor / t})  # fmt: skip
        for i in ids:
            engine.abort(i)
    long_prompt = [100 + i % 1000 for i in range(3 * budget)]
    rid = engine.add_request(prompt_token_ids=long_prompt, sampling_params=SamplingParams(max_new_tokens=1))
    t = timed_steps(engine, 2)  # two full-budget chunks of the same prompt
    engine.abort(rid)
    floor = max(2 * body_params * budget / flops_rate, weight_bytes / bandwidth)  # attention left out
    rows.append({"step": "prefill", "sequences": 1, "context": budget, "ms": t * 1e3, "floor_ms": floor * 1e3,
                 "fraction_of_floor": floor / t})  # fmt: skip
    report = {
        "device": jax.devices()[0].device_kind,
        "model": FLAGS.model,
        "dtype": dtype,
        "params": params,
        "matmul_tflops": flops_rate / 1e12,
        "bandwidth_gbs": bandwidth / 1e9,
        "rows": rows,
    }
    print(f"{report['device']}: matmul {flops_rate / 1e12:.1f} TFLOP/s, bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"{'step':>8} {'seqs':>5} {'context':>8} {'ms':>9} {'floor ms':>9} {'of floor':>9}")
    for r in rows:
        print(f"{r['step']:>8} {r['sequences']:>5} {r['context']:>8} {r['ms']:>9.2f} {r['floor_ms']:>9.2f} "
              f"{r['fraction_of_floor']:>9.2f}")  # fmt: skip
    os.makedirs(os.path.dirname(FLAGS.output) or ".", exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    app.run(main)
