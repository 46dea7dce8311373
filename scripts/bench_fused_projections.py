"""The layer projections a step runs, separate (q, k, v, gate, up: five matmuls per layer) against
fused (`parallel.fuse_projections`: wqkv and w_gate_up, two per layer), at SmolLM2-135M's shapes
(hidden 576, 9 query and 3 KV heads of 64, intermediate 1536, 30 layers, float32), for slabs of
`--rows` tokens. Each variant is one jitted `lax.scan` over the layers (as the model runs them); the
figure is the best of `--repeats` calls in wall time and in process CPU time (all threads: on a
shared machine it counts the work done, not the wait for a core).

    python scripts/bench_fused_projections.py
    python scripts/bench_fused_projections.py --rows=1,8,32,256 --repeats=30
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from fastgen_jax import parallel

_ROWS = flags.DEFINE_list("rows", ["1", "8", "32", "256"], "Slab sizes (tokens per step).")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per figure (best reported).")
LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 30, 576, 9, 3, 64, 1536


def weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    def w(*shape):
        return rng.standard_normal((LAYERS, *shape), np.float32) * 0.02

    return {
        "wq": w(HIDDEN, HEADS, HEAD_DIM),
        "wk": w(HIDDEN, KV_HEADS, HEAD_DIM),
        "wv": w(HIDDEN, KV_HEADS, HEAD_DIM),
        "w_gate": w(HIDDEN, INTERMEDIATE),
        "w_up": w(HIDDEN, INTERMEDIATE),
    }


def separate(x, p):
    def layer(acc, w):
        q = jnp.einsum("td,dhk->thk", x, w["wq"])
        k = jnp.einsum("td,dhk->thk", x, w["wk"])
        v = jnp.einsum("td,dhk->thk", x, w["wv"])
        gate, up = x @ w["w_gate"], x @ w["w_up"]
        return acc + q.sum() + k.sum() + v.sum() + (jax.nn.silu(gate) * up).sum(), None

    return jax.lax.scan(layer, jnp.zeros((), jnp.float32), p)[0]


def fused(x, p):
    def layer(acc, w):
        y = jnp.einsum("td,dshk->tshk", x, w["wqkv"])
        gu = jnp.einsum("td,dsgf->tsgf", x, w["w_gate_up"])
        gate, up = gu[:, :, 0].reshape(x.shape[0], -1), gu[:, :, 1].reshape(x.shape[0], -1)
        return acc + y.sum() + (jax.nn.silu(gate) * up).sum(), None

    return jax.lax.scan(layer, jnp.zeros((), jnp.float32), p)[0]


def best(fn, *args, repeats: int) -> tuple[float, float]:
    """(best wall seconds, best process CPU seconds) of `fn(*args)` after one untimed call."""
    fn(*args).block_until_ready()
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn(*args).block_until_ready()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu)


def main(argv: list[str]) -> None:
    del argv
    rng = np.random.default_rng(0)
    unfused = weights(rng)
    fused_params = parallel.fuse_projections(unfused, 1)
    fns = {"separate": (jax.jit(separate), unfused), "fused": (jax.jit(fused), fused_params)}
    print(f"{'rows':>5} {'separate wall/cpu ms':>22} {'fused wall/cpu ms':>20} {'cpu ratio':>10}")
    for rows in map(int, _ROWS.value):
        x = jnp.asarray(rng.standard_normal((rows, HIDDEN), np.float32))
        got = {}
        for name, (fn, p) in fns.items():
            p = jax.device_put(p)
            got[name] = best(fn, x, p, repeats=_REPEATS.value)
        (sw, sc), (fw, fc) = got["separate"], got["fused"]
        separate_ms = f"{sw * 1e3:>10.2f} / {sc * 1e3:<9.2f}"
        print(f"{rows:>5} {separate_ms} {fw * 1e3:>8.2f} / {fc * 1e3:<9.2f} {sc / fc:>9.2f}x")


if __name__ == "__main__":
    app.run(main)
