"""The sampler alone at a decode step's logits (32 rows x SmolLM2's 49,152 vocabulary, float32), all
rows greedy, as the engine calls it (with an all-ones token bitmask) and without a bitmask, beside
jnp.argmax and a plain max (the floor: one read of the logits).

    python scripts/bench_sampler.py

Prints the best and median of `--repeats` jitted calls in process CPU time (all threads).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from fastgen_jax import sampler
from fastgen_jax.sampler import SamplingArrays, sample

FLAGS = flags.FLAGS
flags.DEFINE_integer("rows", 32, "Logit rows.")
flags.DEFINE_integer("vocab", 49152, "Vocabulary size.")
flags.DEFINE_integer("repeats", 50, "Calls timed per variant.")


def cpu_times(fn, *args, repeats: int) -> list[float]:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.process_time()
        jax.block_until_ready(fn(*args))
        times.append(time.process_time() - start)
    return sorted(times)


def main(argv) -> None:
    del argv
    rows, vocab = FLAGS.rows, FLAGS.vocab
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(rows, vocab)).astype(np.float32))
    settings = jax.device_put(SamplingArrays.greedy(rows))
    all_allowed = jnp.full((rows, -(-vocab // 32)), -1, jnp.int32)
    variants = {
        "sample, all-ones bitmask (the engine's call)": (jax.jit(sample), (logits, settings, all_allowed)),
        "sample, no bitmask": (jax.jit(sample), (logits, settings)),
        "jnp.argmax": (jax.jit(lambda x: jnp.argmax(x, axis=-1)), (logits,)),
        "max (floor: one read)": (jax.jit(lambda x: jnp.max(x, axis=-1)), (logits,)),
    }
    if hasattr(sampler, "argmax"):
        variants["sampler.argmax"] = (jax.jit(sampler.argmax), (logits,))
    print(
        f"[{rows}, {vocab}] f32 logits, all rows greedy, best / median of {FLAGS.repeats} (process CPU time)"
    )
    for label, (fn, args) in variants.items():
        t = cpu_times(fn, *args, repeats=FLAGS.repeats)
        print(f"{label}: {t[0] * 1e3:.3f} / {t[len(t) // 2] * 1e3:.3f} ms")


if __name__ == "__main__":
    app.run(main)
