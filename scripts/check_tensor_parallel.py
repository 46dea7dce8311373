"""Tensor parallelism on this machine's devices: the same greedy tokens as one device, how far the
log-probabilities drift, how the weights split, and decode throughput for each degree.

    python scripts/check_tensor_parallel.py --model=checkpoints/llama2-7b-random           # GPUs
    XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
        python scripts/check_tensor_parallel.py --model=checkpoints/smollm2-135m-instruct  # CPU

For each degree 1, 2, 4, 8 that the devices allow, it builds an engine over that many devices, runs
the same prompts greedily (ignore_eos, log-probabilities on), and compares every token and its
log-probability with degree 1. Weight bytes per device come from the arrays' shards. Throughput is
generated tokens over the wall time of the generation (compilation excluded). Prints a table, writes
JSON, and exits 1 if any degree's tokens differ.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "checkpoints/smollm2-135m-instruct", "Model directory.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: bf16 on GPU, f32 on CPU).")
flags.DEFINE_integer("num_prompts", 8, "Prompts generated together.")
flags.DEFINE_integer("prompt_len", 100, "Tokens per prompt (random ids).")
flags.DEFINE_integer("gen_len", 32, "Tokens generated per prompt.")
flags.DEFINE_integer("token_budget", 256, "Token budget of each engine.")
flags.DEFINE_string("output", "docs/benchmarks/tensor_parallel.json", "JSON output path.")


def generate(engine, prompts):
    from fastgen_jax.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=FLAGS.gen_len, ignore_eos=True, logprobs=True)
    ids = [engine.add_request(prompt_token_ids=p, sampling_params=params) for p in prompts]
    tokens = {i: [] for i in ids}
    logprobs = {i: [] for i in ids}
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            logprobs[out.request_id] += out.new_logprobs or []
    seconds = time.perf_counter() - start
    return [tokens[i] for i in ids], [logprobs[i] for i in ids], seconds


def main(argv):
    del argv
    import jax
    import numpy as np

    from fastgen_jax import parallel
    from fastgen_jax.checkpoints import load_checkpoint
    from fastgen_jax.config import EngineConfig
    from fastgen_jax.llm_engine import LLMEngine
    from fastgen_jax.runner import default_dtype

    dtype = FLAGS.dtype or default_dtype()
    checkpoint = load_checkpoint(FLAGS.model, dtype)
    rng = np.random.default_rng(0)
    vocab = checkpoint.config.vocab_size
    prompts = [rng.integers(3, vocab, FLAGS.prompt_len).tolist() for _ in range(FLAGS.num_prompts)]
    max_len = FLAGS.prompt_len + FLAGS.gen_len
    base = EngineConfig(
        token_budget=FLAGS.token_budget,
        max_num_seqs=FLAGS.num_prompts,
        max_model_len=max_len,
        num_pages=FLAGS.num_prompts * -(-max_len // 16) + 1,
    )
    whole = sum(x.nbytes for x in jax.tree.leaves(checkpoint.params))
    rows, reference = [], None
    for tp in [d for d in (1, 2, 4, 8) if d <= len(jax.devices())]:
        engine = LLMEngine(checkpoint, dataclasses.replace(base, tensor_parallel=tp), dtype, progress=False)
        tokens, logprobs, seconds = generate(engine, prompts)
        reference = reference or (tokens, logprobs)
        pairs = zip(sum(logprobs, []), sum(reference[1], []), strict=False)  # equal lengths: ignore_eos
        drift = max(abs(a - b) for a, b in pairs)
        per_device = max(parallel.bytes_per_device(engine.runner.params).values())
        rows.append(
            {
                "tensor_parallel": tp,
                "same_tokens": tokens == reference[0],
                "max_logprob_diff": drift,
                "weight_bytes_per_device": per_device,
                "fraction_of_weights": per_device / whole,
                "tokens_per_s": sum(map(len, tokens)) / seconds,
            }
        )
        del engine
    print(f"{len(jax.devices())} x {jax.devices()[0].device_kind}, {FLAGS.model}, {dtype}")
    print(f"{'tp':>3} | {'same tokens':>11} | {'max |dlogprob|':>14} | {'weights/device':>14} | {'tok/s':>8}")
    for r in rows:
        print(
            f"{r['tensor_parallel']:>3} | {str(r['same_tokens']):>11} | {r['max_logprob_diff']:>14.2e} | "
            f"{r['fraction_of_weights']:>14.3f} | {r['tokens_per_s']:>8.1f}"
        )
    os.makedirs(os.path.dirname(FLAGS.output) or ".", exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump(
            {"model": FLAGS.model, "devices": str(jax.devices()), "dtype": dtype, "rows": rows}, f, indent=1
        )
    print(f"wrote {FLAGS.output}")
    if not all(r["same_tokens"] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    app.run(main)
