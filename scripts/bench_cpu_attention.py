"""One layer of attention at SmolLM2's head shapes (9 query heads, 3 KV heads of 64, pages of 16
scattered over the pool): the C++ CPU kernel (`cpu_kernels`) against the pure-JAX reference, next to
its floor.

    python scripts/bench_cpu_attention.py --output_json=docs/benchmarks/cpu_attention.json
    python scripts/bench_cpu_attention.py --kv_dtype=bfloat16 --shapes="decode 32x512,prompt 1x256+256"
    python scripts/bench_cpu_attention.py --layers=30 --noreference   # as in a whole step of SmolLM2

Prints, per step shape, the best of `--repeats` calls in process CPU time (all threads: on a shared
machine this counts the work done, not the wait for a core), the K/V bytes read per CPU second, and
the floor: the larger of the K/V bytes the real rows must read (each sequence's keys and values
once) over the bandwidth of a plain numpy sum of a 64 MiB array (one thread), and the attention's
FLOPs (q.k and p.v over each row's visible keys) over the rate of a 1024^3 float32 numpy matmul,
both measured first in the same process (process CPU time, best of `--repeats`). "x floor" is the
kernel's time over that floor. The kernel's best wall-clock time is printed too (what its threads,
and splitting long contexts over them, buy; it also counts waiting for a busy core).

One layer's pool of a shape up to 8 x 2048 (25 MB of keys and values) fits this CPU's 32 MB L3, so
repeated calls partly read from cache. `--layers=L` lays out L layers' pages in one pool as the engine
does ([KV heads, L x pages, page size, head size]) and times one compiled call of all L layers, one
after another (each layer's pages read once, as in a model's step); figures are per layer.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time

if __name__ == "__main__":  # before jax loads: as the server runs, malloc on huge pages
    from fastgen_jax import hugepages

    hugepages.restart_with_huge_pages()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from cpu_kernels.ragged_paged_attention import ragged_paged_attention  # noqa: E402
from pallas_kernels.reference import ragged_paged_attention_reference  # noqa: E402

PAGE_SIZE, KV_HEADS, GROUP, HEAD_DIM = 16, 3, 3, 64
# name -> (context, new rows) per sequence
SHAPES = {
    "decode 1x128": [(127, 1)],
    "decode 4x128": [(127, 1)] * 4,
    "decode 8x128": [(127, 1)] * 8,
    "decode 1x512": [(511, 1)],
    "decode 4x512": [(511, 1)] * 4,
    "decode 8x512": [(511, 1)] * 8,
    "decode 32x128": [(127, 1)] * 32,
    "decode 32x512": [(511, 1)] * 32,
    "decode 1x2048": [(2047, 1)],
    "decode 8x2048": [(2047, 1)] * 8,
    "decode 32x2048": [(2047, 1)] * 32,
    "prompt 1x256+256": [(256, 256)],  # 256 new rows over 256 cached tokens
    "fused 32+224": [(511, 1)] * 32 + [(256, 224)],  # profile_step.py's fused step
}

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 20, "Calls timed per shape (the best is reported).")
flags.DEFINE_enum("kv_dtype", "float32", ["float32", "bfloat16"], "KV page dtype.")
flags.DEFINE_list("shapes", list(SHAPES), f"Shapes to run, of {list(SHAPES)}.")
flags.DEFINE_boolean("reference", True, "Also time the pure-JAX reference.")
flags.DEFINE_string("output_json", None, "Write the figures here as JSON.")
flags.DEFINE_integer(
    "layers", 1, "Layers whose pages share the pool, called one after another (figures per layer)."
)


def best_cpu_seconds(fn, repeats: int, clock=time.process_time) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def sum_bandwidth(repeats: int) -> float:
    """Bytes per CPU second of numpy summing a 64 MiB float32 array (one thread)."""
    a = np.ones(16 << 20, np.float32)
    return a.nbytes / best_cpu_seconds(a.sum, repeats)


def matmul_flops_per_second(repeats: int) -> float:
    """FLOPs per CPU second of a 1024 x 1024 float32 matmul (numpy's BLAS, all its threads)."""
    a = np.ones((1024, 1024), np.float32)
    return 2 * 1024**3 / best_cpu_seconds(lambda: a @ a, repeats)


def attention_flops(seqs: list[tuple[int, int]]) -> int:
    """2 FLOPs per multiply-add of q.k and p.v, per query head, over the keys each real row sees."""
    visible = sum(context + i + 1 for context, new in seqs for i in range(new))
    return 4 * HEAD_DIM * KV_HEADS * GROUP * visible


def inputs(seqs: list[tuple[int, int]], dtype, rng: np.random.Generator, layers: int = 1) -> tuple:
    """(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs), pages shuffled over the pool;
    the pool holds every layer's pages and page_indices is [layers, seqs, width]."""
    width = max(-(-(c + n) // PAGE_SIZE) for c, n in seqs)
    per_layer = len(seqs) * width + 1
    num_pages = layers * per_layer
    k = rng.standard_normal((KV_HEADS, num_pages, PAGE_SIZE, HEAD_DIM), np.float32)
    v = rng.standard_normal((KV_HEADS, num_pages, PAGE_SIZE, HEAD_DIM), np.float32)
    shuffled = [rng.permutation(np.arange(1, per_layer)).reshape(len(seqs), width) for _ in range(layers)]
    pages = np.stack([layer * per_layer + p for layer, p in enumerate(shuffled)]).astype(np.int32)
    new = np.array([n for _, n in seqs], np.int32)
    q = rng.standard_normal((int(new.sum()), KV_HEADS * GROUP, HEAD_DIM), np.float32)
    return (
        jnp.asarray(q),
        jnp.asarray(k, dtype),
        jnp.asarray(v, dtype),
        jnp.asarray([c + n for c, n in seqs], jnp.int32),
        jnp.asarray(pages),
        jnp.asarray(np.concatenate([[0], np.cumsum(new)]), jnp.int32),
        jnp.array([len(seqs)], jnp.int32),
    )


def every_layer(attend, layers: int):
    """attend over each layer's page_indices in turn (a Python loop: L calls in one program), the
    outputs summed so that none is dropped."""

    def step(q, k, v, kv_lens, pages, cu_q_lens, num_seqs):
        out = None
        for layer in range(layers):
            o = attend(q, k, v, kv_lens, pages[layer], cu_q_lens, num_seqs, sm_scale=HEAD_DIM**-0.5)
            out = o if out is None else out + o
        return out

    return step


def main(argv) -> None:
    del argv
    unknown = set(FLAGS.shapes) - set(SHAPES)
    if unknown:
        raise app.UsageError(f"--shapes: unknown {sorted(unknown)}; known: {list(SHAPES)}")
    dtype = jnp.dtype(FLAGS.kv_dtype)
    bandwidth = sum_bandwidth(FLAGS.repeats)
    rate = matmul_flops_per_second(FLAGS.repeats)
    print(f"numpy sum of 64 MiB: {bandwidth / 1e9:.1f} GB/s, 1024^3 matmul: {rate / 1e9:.0f} GFLOP/s")
    rng = np.random.default_rng(0)
    impls = {"kernel": ragged_paged_attention}
    if FLAGS.reference:
        impls["reference"] = ragged_paged_attention_reference
    results = []
    for name in FLAGS.shapes:
        seqs = SHAPES[name]
        args = inputs(seqs, dtype, rng, FLAGS.layers)
        kv_bytes = 2 * sum(c + n for c, n in seqs) * KV_HEADS * HEAD_DIM * dtype.itemsize  # per layer
        flops = attention_flops(seqs)
        floor = max(kv_bytes / bandwidth, flops / rate)
        row = {"shape": name, "kv_bytes": kv_bytes, "flops": flops, "floor_ms": floor * 1e3}
        for label, attend in impls.items():
            step = jax.jit(every_layer(attend, FLAGS.layers))
            t = best_cpu_seconds(lambda step=step, args=args: step(*args).block_until_ready(), FLAGS.repeats)
            t /= FLAGS.layers
            row[f"{label}_ms"] = t * 1e3
            row[f"{label}_gb_per_s"] = kv_bytes / t / 1e9
        row["kernel_x_floor"] = row["kernel_ms"] / row["floor_ms"]
        kernel = jax.jit(every_layer(ragged_paged_attention, FLAGS.layers))
        call = functools.partial(lambda kernel, args: kernel(*args).block_until_ready(), kernel, args)
        wall = best_cpu_seconds(call, FLAGS.repeats, time.perf_counter) / FLAGS.layers
        row["kernel_wall_ms"] = wall * 1e3
        results.append(row)
        cells = [f"{k} {row[f'{k}_ms']:.2f} ms ({row[f'{k}_gb_per_s']:.1f} GB/s)" for k in impls]
        print(
            f"{name}: floor {row['floor_ms']:.2f} ms, "
            + ", ".join(cells)
            + f", {row['kernel_x_floor']:.2f}x floor; kernel wall {row['kernel_wall_ms']:.2f} ms"
        )
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump(
                {
                    "kv_dtype": FLAGS.kv_dtype,
                    "layers": FLAGS.layers,
                    "repeats": FLAGS.repeats,
                    "sum_bandwidth_gb_per_s": bandwidth / 1e9,
                    "matmul_gflop_per_s": rate / 1e9,
                    "load_average": list(os.getloadavg()),
                    "machine": platform.processor() or platform.machine(),
                    "jax": jax.__version__,
                    "results": results,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    app.run(main)
