"""The projections of a whole step (SmolLM2-135M's shapes: 30 layers of q/k/v, o, gate/up and down,
then the 49k-row LM head) at a given number of rows, six ways, each one jitted program:

- float32: XLA's dot over float32 weights (what `--quantize=none` runs without the CPU kernels);
- float32 kernel: `cpu_kernels.matmul.f32_matmul` over each layer's slice (the model passes the
  kernel the whole stack instead, and one row to XLA: `scripts/bench_f32_matmul.py` times that);
- int8 kernel: `cpu_kernels.matmul.int8_matmul` of bfloat16 rows over int8 weights (each layer's
  slice of the scanned stack, as the model passes it);
- int8 kernel, stack: the same reading the whole stack in place with the layer as an operand;
- int8 XLA, bf16: `Attention("reference").int8_matmul`, what the model runs past `INT8_KERNEL_ROWS`
  rows: XLA widens the weights to bfloat16 and multiplies the rows rounded to bfloat16, summing in
  float32;
- int8 XLA, f32: XLA widening the weights to float32 and multiplying in float32 (for comparison).

    python scripts/bench_int8_matmul.py --rows=1,4,8,16,32,64,128,256

Best of 10 timed calls each (wall time). Prints a table and writes JSON; the rows where the int8
kernel stops beating XLA's widened dot set `fastgen_jax.attention.INT8_KERNEL_ROWS`, and where the
float32 kernel stops beating XLA's float32 dot `F32_KERNEL_ROWS`.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cpu_kernels.matmul import f32_matmul, int8_matmul  # noqa: E402
from fastgen_jax.attention import Attention  # noqa: E402
from fastgen_jax.benchmarks.timing import times_in_turns, write_report  # noqa: E402
from fastgen_jax.quantize import quantize_int8  # noqa: E402

flags.DEFINE_list("rows", ["1", "4", "8", "16", "32", "64", "128", "256"], "Rows (slab sizes) to time.")
flags.DEFINE_string("output_json", "docs/benchmarks/int8_matmul_cpu.json", "Where to write the figures.")
FLAGS = flags.FLAGS

LAYERS, HIDDEN, VOCAB = 30, 576, 49152
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # [K, N]: qkv, o, gate/up, down


def programs():
    rng = np.random.default_rng(0)
    w32 = [jnp.asarray(rng.standard_normal((LAYERS, k, n), np.float32) * 0.02) for k, n in SHAPES]
    w8 = [quantize_int8(w, 1) for w in w32]
    head32 = jnp.asarray(rng.standard_normal((VOCAB, HIDDEN), np.float32) * 0.02)
    q, s = quantize_int8(head32.T[None], 1)
    head8 = (q[0], s[0])

    def stack(mm):  # mm(h, layer weights or index, j) -> h @ projection j of that layer
        def body(h, layer):
            a, b, c = mm(h, layer, 0), mm(h, layer, 1), mm(h, layer, 2)
            return h + 0.01 * (a[:, :HIDDEN] + b + mm(c[:, :1536], layer, 3)), None

        return body

    def f32(x):
        h, _ = jax.lax.scan(stack(lambda h, w, j: h @ w[j]), x, w32)
        return h @ head32.T

    def f32_kernel(x):
        h, _ = jax.lax.scan(stack(lambda h, w, j: f32_matmul(h, w[j])), x, w32)
        return f32_matmul(h, head32, w_nk=True)

    def rows(h):  # the kernel multiplies bfloat16 rows, as the model's int8 path rounds them
        return h.astype(jnp.bfloat16)

    def kernel(x):
        h, _ = jax.lax.scan(stack(lambda h, w, j: int8_matmul(rows(h), *w[j])), x, w8)
        return int8_matmul(rows(h), *head8)

    def kernel_stack(x):
        mm = stack(lambda h, i, j: int8_matmul(rows(h), *w8[j], layer=i))
        h, _ = jax.lax.scan(mm, x, jnp.arange(LAYERS))
        return int8_matmul(rows(h), *head8)

    def widened(h, q, s):
        return jnp.einsum("tk,nk->tn", h, q.astype(jnp.float32)) * s

    def xla8(x):
        h, _ = jax.lax.scan(stack(lambda h, w, j: widened(h, *w[j])), x, w8)
        return widened(h, *head8)

    model_path = Attention("reference").int8_matmul

    def xla8_bf16(x):
        h, _ = jax.lax.scan(stack(lambda h, w, j: model_path(h, *w[j])), x, w8)
        return model_path(h, *head8)

    return {
        "float32": f32,
        "float32 kernel": f32_kernel,
        "int8 kernel": kernel,
        "int8 kernel, stack": kernel_stack,
        "int8 XLA, bf16": xla8_bf16,
        "int8 XLA, f32": xla8,
    }


def best_ms(fn, x) -> float:
    times = times_in_turns({"fn": lambda: fn(x).block_until_ready()}, repeats=10)
    return 1e3 * min(times["fn"])


def main(argv):
    del argv
    fns = {name: jax.jit(f) for name, f in programs().items()}
    rng = np.random.default_rng(1)
    rows = []
    print(f"{'rows':>5}" + "".join(f"{n:>19}" for n in fns) + "   (ms per step's projections)")
    for m in (int(r) for r in FLAGS.rows):
        x = jnp.asarray(rng.standard_normal((m, HIDDEN), np.float32))
        ref = np.asarray(fns["int8 XLA, f32"](x))
        np.testing.assert_allclose(
            np.asarray(fns["float32 kernel"](x)), np.asarray(fns["float32"](x)), rtol=1e-4, atol=1e-4
        )
        for name, fn in fns.items():
            if name.startswith("int8"):  # the bf16 rows' rounding grows through 30 residual layers
                tol = 1e-3 if name == "int8 XLA, f32" else 5e-2
                np.testing.assert_allclose(np.asarray(fn(x)), ref, rtol=tol, atol=tol * np.abs(ref).max())
        row = {"rows": m, **{name: best_ms(fn, x) for name, fn in fns.items()}}
        rows.append(row)
        print(f"{m:>5}" + "".join(f"{row[n]:>19.2f}" for n in fns), flush=True)
    if FLAGS.output_json:
        write_report(FLAGS.output_json, rows)


if __name__ == "__main__":
    app.run(main)
