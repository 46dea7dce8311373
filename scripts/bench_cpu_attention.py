"""One layer of decode attention at SmolLM2's head shapes (9 query heads, 3 KV heads of 64, f32, pages
of 16 scattered over the pool): the C++ CPU kernel (`cpu_kernels`) against the pure-JAX reference.

    python scripts/bench_cpu_attention.py

Prints, per (sequences x context), the best of 20 calls in process CPU time (all threads: on a
shared machine this counts the work done, not the wait for a core) and the K/V bytes read per CPU
second.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from cpu_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.reference import ragged_paged_attention_reference

SHAPES = [(32, 128), (32, 512), (8, 2048), (32, 2048)]  # (sequences, context)
PAGE_SIZE, KV_HEADS, GROUP, HEAD_DIM = 16, 3, 3, 64


def best_cpu_seconds(fn, *args, repeats: int = 20) -> float:
    fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn(*args).block_until_ready()
        times.append(time.process_time() - start)
    return min(times)


def main() -> None:
    rng = np.random.default_rng(0)
    for seqs, context in SHAPES:
        width = context // PAGE_SIZE
        num_pages = seqs * width + 1
        k = jnp.asarray(rng.standard_normal((KV_HEADS, num_pages, PAGE_SIZE, HEAD_DIM), np.float32))
        v = k * 0.5
        pages = rng.permutation(np.arange(1, num_pages)).reshape(seqs, width).astype(np.int32)
        metadata = (
            jnp.full((seqs,), context, jnp.int32),
            jnp.asarray(pages),
            jnp.arange(seqs + 1, dtype=jnp.int32),
            jnp.array([seqs], jnp.int32),
        )
        q = jnp.asarray(rng.standard_normal((seqs, KV_HEADS * GROUP, HEAD_DIM), np.float32))
        kv_bytes = 2 * seqs * context * KV_HEADS * HEAD_DIM * 4
        cells = []
        for name, attend in (
            ("cpu kernel", ragged_paged_attention),
            ("reference", ragged_paged_attention_reference),
        ):
            step = jax.jit(lambda q, k, v, attend=attend, md=metadata: attend(q, k, v, *md, sm_scale=0.125))
            t = best_cpu_seconds(step, q, k, v)
            cells.append(f"{name} {t * 1e3:.2f} ms ({kv_bytes / t / 1e9:.1f} GB/s)")
        print(f"decode {seqs}x{context}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
