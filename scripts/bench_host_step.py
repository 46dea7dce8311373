"""Host time per engine step (scheduling + slab building + sampling arrays + output processing).

The device work is made negligible (a 1-layer, 64-wide random model with SmolLM2's tokenizer), so what
is measured is the host side the engine adds to every step while many sequences decode. Prints a table
and writes JSON.

    python scripts/bench_host_step.py --num_seqs=256
"""

from __future__ import annotations

import json
import os
import platform
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from fastgen_jax.checkpoints import Checkpoint, load_checkpoint
from fastgen_jax.config import EngineConfig, ModelConfig
from fastgen_jax.llm_engine import LLMEngine
from fastgen_jax.models import AttentionMetadata, build_model, init_kv_cache
from fastgen_jax.sampling_params import SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_seqs", 256, "Sequences decoding together.")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per sequence.")
flags.DEFINE_integer("decode_steps", 64, "Decode steps to time.")
flags.DEFINE_string("tokenizer_from", "checkpoints/smollm2-135m-instruct", "Checkpoint for the tokenizer.")
flags.DEFINE_string("output_json", "docs/benchmarks/host_step_cpu.json", "Where to write results.")


def tiny_checkpoint(tokenizer) -> Checkpoint:
    config = ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=32,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    model = build_model(config)
    md = AttentionMetadata(*(jnp.zeros(s, jnp.int32) for s in [(1,), (1,), (1,), (1, 1), (2,), (1,), (1,)]))
    kv = init_kv_cache(config, 2, 16, jnp.float32)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros(1, jnp.int32), kv, md)
    return Checkpoint(config, params, tokenizer, "tiny-random")


def main(argv):
    del argv
    tokenizer = load_checkpoint(FLAGS.tokenizer_from).tokenizer
    n = FLAGS.num_seqs
    engine = LLMEngine(
        tiny_checkpoint(tokenizer),
        EngineConfig(token_budget=512, max_num_seqs=n, max_model_len=1024, page_size=16),
        progress=True,
    )
    rng = np.random.default_rng(0)
    for _ in range(n):
        engine.add_request(
            prompt_token_ids=rng.integers(3, 1000, FLAGS.prompt_len).tolist(),
            sampling_params=SamplingParams(max_new_tokens=FLAGS.decode_steps + 64, ignore_eos=True),
        )
    while engine.scheduler.num_waiting or any(s.is_prefilling for s in engine.scheduler.running):
        engine.step()
    host, device = [], []
    for _ in range(FLAGS.decode_steps):
        h, d = engine.stats.host_seconds, engine.stats.device_seconds
        outs = engine.step()
        assert len(outs) == n, "every sequence decodes every step"
        host.append(engine.stats.host_seconds - h)
        device.append(engine.stats.device_seconds - d)
    row = {
        "num_running_seqs": n,
        "host_ms_median": 1e3 * statistics.median(host),
        "host_ms_p90": 1e3 * float(np.percentile(host, 90)),
        "device_ms_median_tiny_model": 1e3 * statistics.median(device),
    }
    header = ["running seqs", "host ms p50", "host ms p90", "device ms p50 (1-layer model)"]
    print(" | ".join(f"{h:>{w}}" for h, w in zip(header, (12, 11, 11, 29), strict=True)))
    print(
        f"{n:>12} | {row['host_ms_median']:>11.3f} | {row['host_ms_p90']:>11.3f} | "
        f"{row['device_ms_median_tiny_model']:>29.3f}"
    )
    os.makedirs(os.path.dirname(FLAGS.output_json) or ".", exist_ok=True)
    with open(FLAGS.output_json, "w") as f:
        json.dump(
            {
                "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "jax": jax.__version__,
                **row,
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    app.run(main)
