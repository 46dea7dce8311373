"""The float32 projections of SmolLM2-135M's 30 layers (q/k/v fused, o, gate/up fused, down; each a
scan over the stacked weights, as the model runs them) at a given number of rows, four ways:

- XLA: XLA's dot of each scanned slice (what the model runs without the CPU kernels, and past
  `fastgen_jax.attention.F32_KERNEL_ROWS` rows);
- kernel, slice: `cpu_kernels.matmul.f32_matmul` of each scanned slice (XLA copies the slice out of
  the stack before the custom call);
- kernel, stack: the same kernel reading the layer's weights in place from the stack, with the layer
  as an operand (what the model runs for up to `F32_KERNEL_ROWS` rows);
- kernel, tiles: the same on the stack with `stream_rows=0`, every slab by register tiles (where it
  beats "kernel, stack" sets `cpu_kernels.matmul.STREAM_ROWS`).

    python scripts/bench_f32_matmul.py --rows=1,4,8,16,32,64,128,256,512

Best of 15 timed calls each (wall time, the four taking turns), in one process. Prints a table (ms
for all 30 layers' projections) and writes JSON; where "kernel, stack" stops beating "XLA" sets the
thresholds.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

if __name__ == "__main__":  # before jax loads: as the server runs, malloc on huge pages
    from fastgen_jax import hugepages

    hugepages.restart_with_huge_pages()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from cpu_kernels.matmul import f32_matmul  # noqa: E402
from fastgen_jax.benchmarks.timing import times_in_turns, write_report  # noqa: E402

flags.DEFINE_list("rows", ["1", "4", "8", "16", "32", "64", "128", "256", "512"], "Slab sizes to time.")
flags.DEFINE_string("output_json", "docs/benchmarks/f32_matmul_cpu.json", "Where to write the figures.")
FLAGS = flags.FLAGS

LAYERS = 30
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # [K, N]: qkv, o, gate/up, down


def programs():
    def over_slices(mm):
        return lambda x, ws: jax.lax.scan(lambda c, w: (c, mm(x, w)), 0, ws)[1]

    def over_stack(**kw):
        def run(x, ws):
            return jax.lax.scan(
                lambda c, i: (c, f32_matmul(x, ws, layer=i, **kw)), 0, jnp.arange(ws.shape[0])
            )[1]

        return jax.jit(run)

    return {
        "XLA": jax.jit(over_slices(lambda x, w: x @ w)),
        "kernel, slice": jax.jit(over_slices(f32_matmul)),
        "kernel, stack": over_stack(),
        "kernel, tiles": over_stack(stream_rows=0),
    }


def best_ms(fns: dict, *args, repeats: int = 15) -> dict[str, float]:
    """Best wall ms of each of `fns` on `args`, the calls taking turns."""
    calls = {name: (lambda fn=fn: fn(*args).block_until_ready()) for name, fn in fns.items()}
    return {name: 1e3 * min(t) for name, t in times_in_turns(calls, repeats).items()}


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.standard_normal((LAYERS, k, n), np.float32) * 0.02) for k, n in SHAPES]
    fns = programs()
    rows = []
    print(f"{'rows':>5}" + "".join(f"{n:>16}" for n in fns) + "   (ms, 30 layers' projections)")
    for m in (int(r) for r in FLAGS.rows):
        row = {"rows": m} | {name: 0.0 for name in fns}
        for ws in weights:
            x = jnp.asarray(rng.standard_normal((m, ws.shape[1])), jnp.float32)
            expected = np.asarray(fns["XLA"](x, ws))
            for fn in fns.values():
                np.testing.assert_allclose(np.asarray(fn(x, ws)), expected, rtol=1e-4, atol=1e-4)
            for name, ms in best_ms(fns, x, ws).items():
                row[name] += ms
        rows.append(row)
        print(f"{m:>5}" + "".join(f"{row[n]:>16.2f}" for n in fns), flush=True)
    if FLAGS.output_json:
        write_report(FLAGS.output_json, rows)


if __name__ == "__main__":
    app.run(main)
