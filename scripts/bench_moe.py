"""Times the expert formulations of `fastgen_jax.models.moe` on this backend: per slab size (rows) and
per number of experts at a fixed top-k, so one can see (a) which formulation to use for which slab
size and (b) whether a step's cost follows the active experts or all of them.

python scripts/bench_moe.py [--hidden=512 --intermediate=1024 --top_k=2]
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from fastgen_jax.models.moe import EXPERTS, route

flags.DEFINE_integer("hidden", 512, "model width")
flags.DEFINE_integer("intermediate", 1024, "each expert's intermediate width")
flags.DEFINE_integer("top_k", 2, "experts per token")
flags.DEFINE_list("rows", ["1", "8", "32", "128", "512"], "slab sizes")
flags.DEFINE_list("experts", ["4", "16", "64"], "numbers of experts")
flags.DEFINE_integer("repeats", 10, "timed calls per case (best is reported)")
flags.DEFINE_float(
    "max_gathered_gib",
    1.0,
    "skip (print '-') the gathered formulation where its copies of the chosen experts' weights would "
    "exceed this many GiB (rows x top_k x 3 x hidden x intermediate x 4 bytes; 512 rows are 6 GiB at "
    "the defaults, more than a small machine holds; the engine never gathers for slabs that large)",
)
FLAGS = flags.FLAGS


def time_case(impl: str, rows: int, num_experts: int) -> float:
    rng = np.random.default_rng(0)
    h, f, k = FLAGS.hidden, FLAGS.intermediate, FLAGS.top_k
    w = [jnp.asarray(rng.standard_normal(s, np.float32) * 0.02) for s in ((num_experts, h, f),) * 2]
    w.append(jnp.asarray(rng.standard_normal((num_experts, f, h), np.float32) * 0.02))
    router = jnp.asarray(rng.standard_normal((h, num_experts), np.float32))
    x = jnp.asarray(rng.standard_normal((rows, h), np.float32))

    @jax.jit
    def step(x, router, *w):
        weights, experts = route(x @ router, k, True)
        return jnp.einsum("tkd,tk->td", EXPERTS[impl](x, experts, *w, jax.nn.silu), weights)

    step(x, router, *w).block_until_ready()
    best = float("inf")
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        step(x, router, *w).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def fits(impl: str, rows: int) -> bool:
    gathered_bytes = rows * FLAGS.top_k * 3 * FLAGS.hidden * FLAGS.intermediate * 4
    return impl != "gathered" or gathered_bytes <= FLAGS.max_gathered_gib * (1 << 30)


def main(_):
    print(f"backend={jax.default_backend()} hidden={FLAGS.hidden} intermediate={FLAGS.intermediate} "
          f"top_k={FLAGS.top_k}; best of {FLAGS.repeats}, ms")  # fmt: skip
    print(f"{'experts':>8} {'rows':>6} " + " ".join(f"{impl:>9}" for impl in EXPERTS))
    for num_experts in map(int, FLAGS.experts):
        for rows in map(int, FLAGS.rows):
            times = [time_case(impl, rows, num_experts) if fits(impl, rows) else None for impl in EXPERTS]
            cells = [f"{t:>9.3f}" if t is not None else f"{'-':>9}" for t in times]
            print(f"{num_experts:>8} {rows:>6} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    app.run(main)
