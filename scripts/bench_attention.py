"""Paged attention kernels, one layer at Llama-2-7B head shapes (32 query heads, 32 KV heads,
head_dim 128, bf16): our Pallas kernel against the pure-JAX reference and JAX's own Pallas GPU ops.

Scenarios (random K/V in pages scattered over the pool, page size `--page_size`):
- decode: `--decode_seqs` sequences, one new token each after `--decode_context` keys;
- prefill: one prompt of `--prefill_len` tokens, no context;
- mixed: a SplitFuse step, decodes plus two prompt chunks (one after earlier chunks).

Implementations:
- ours: `pallas_kernels.ragged_paged_attention` (Triton lowering);
- reference: `pallas_kernels.reference` (XLA), skipped where its gathered K/V would not fit;
- jax_paged: `jax.experimental.pallas.ops.gpu.paged_attention`, decode only (one query a sequence);
- jax_mha: `jax.experimental.pallas.ops.gpu.attention.mha`, causal over dense Q/K/V, prefill only.

Reported per (scenario, implementation): the median time of `--iters` calls; achieved bandwidth, the
bytes the step must move at least (all visible K/V once, plus Q and the output) over the time; and
achieved TFLOP/s, 4 x heads x head_dim x visible (query, key) pairs over the time. Beside them, the
device's ceilings measured here: a large elementwise copy (GB/s) and a large bf16 matmul (TFLOP/s).
Decode is bandwidth-bound (compare GB/s), prefill compute-bound (compare TFLOP/s). "max err" is the
largest |output - reference| where the reference ran.

    python scripts/bench_attention.py                      # GPU, default shapes
    python scripts/bench_attention.py --sweep_tiles        # plus a tile-size sweep for ours
    python scripts/bench_attention.py --interpret --quick  # CPU smoke test (tiny shapes)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import pathlib
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.reference import ragged_paged_attention_reference

_QUICK = flags.DEFINE_bool("quick", False, "Tiny shapes (4 heads, head_dim 64) for a smoke test.")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Run the Pallas kernels in interpret mode.")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed calls per measurement (median reported).")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per KV page.")
_DECODE_SEQS = flags.DEFINE_integer("decode_seqs", 128, "Sequences in the decode scenario.")
_DECODE_CONTEXT = flags.DEFINE_integer("decode_context", 2047, "Keys before each decode token.")
_PREFILL_LEN = flags.DEFINE_integer("prefill_len", 4096, "Prompt length in the prefill scenario.")
_IMPLS = flags.DEFINE_list("impls", ["ours", "reference", "jax_paged", "jax_mha"], "What to time.")
_SWEEP = flags.DEFINE_bool("sweep_tiles", False, "Also time ours over a grid of tile sizes.")
_REFERENCE_LIMIT = flags.DEFINE_float("reference_gib", 16.0, "Skip the reference above this.")
_OUT = flags.DEFINE_string("out", None, "JSON path (default docs/benchmarks/attention_<device>.json).")


@dataclasses.dataclass(frozen=True)
class Shapes:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str


LLAMA2_7B = Shapes(num_heads=32, num_kv_heads=32, head_dim=128, dtype="bfloat16")
TINY = Shapes(num_heads=4, num_kv_heads=4, head_dim=64, dtype="bfloat16")


def scenarios(quick: bool) -> dict[str, list[tuple[int, int]]]:
    """(context, new tokens) per sequence."""
    if quick:
        return {
            "decode": [(40, 1)] * 4,
            "prefill": [(0, 64)],
            "mixed": [(30, 1)] * 3 + [(0, 20), (17, 9)],
        }
    decode = [(_DECODE_CONTEXT.value, 1)] * _DECODE_SEQS.value
    mixed = [(1023, 1)] * 96 + [(0, 384), (1024, 512)]
    return {"decode": decode, "prefill": [(0, _PREFILL_LEN.value)], "mixed": mixed}


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def build_inputs(seqs, shapes: Shapes, page_size: int, seed: int = 0):
    """Positional arguments of both implementations: T and S padded to powers of two like the
    engine's buckets, pages shuffled over a pool just big enough."""
    pages_per_seq = [-(-(c + n) // page_size) for c, n in seqs]
    num_rows, num_slots = _pow2(sum(n for _, n in seqs)), _pow2(len(seqs))
    width = _pow2(max(pages_per_seq))
    num_pages = sum(pages_per_seq) + 1
    pool = np.random.default_rng(seed).permutation(np.arange(1, num_pages))
    kv_lens = np.zeros(num_slots, np.int32)
    cu_q_lens = np.zeros(num_slots + 1, np.int32)
    page_indices = np.zeros((num_slots, width), np.int32)
    start = 0
    for s, ((context, new), used) in enumerate(zip(seqs, pages_per_seq, strict=True)):
        kv_lens[s], cu_q_lens[s + 1] = context + new, cu_q_lens[s] + new
        page_indices[s, :used] = pool[start : start + used]
        start += used
    cu_q_lens[len(seqs) + 1 :] = cu_q_lens[len(seqs)]
    keys = jax.random.split(jax.random.key(seed), 3)
    kv_shape = (shapes.num_kv_heads, num_pages, page_size, shapes.head_dim)
    dtype = jnp.dtype(shapes.dtype)
    return (
        jax.random.normal(keys[0], (num_rows, shapes.num_heads, shapes.head_dim), dtype),
        jax.random.normal(keys[1], kv_shape, dtype),
        jax.random.normal(keys[2], kv_shape, dtype),
        jnp.asarray(kv_lens),
        jnp.asarray(page_indices),
        jnp.asarray(cu_q_lens),
        jnp.asarray([len(seqs)], jnp.int32),
    )


def work(seqs, shapes: Shapes) -> tuple[int, int]:
    """(minimum bytes moved, FLOPs) of one attention call over `seqs`."""
    itemsize = jnp.dtype(shapes.dtype).itemsize
    keys = sum(c + n for c, n in seqs)
    tokens = sum(n for _, n in seqs)
    kv_bytes = 2 * keys * shapes.num_kv_heads * shapes.head_dim * itemsize
    qo_bytes = 2 * tokens * shapes.num_heads * shapes.head_dim * itemsize
    pairs = sum(n * c + n * (n + 1) // 2 for c, n in seqs)  # causal (query, key) pairs
    return kv_bytes + qo_bytes, 4 * shapes.num_heads * shapes.head_dim * pairs


def time_call(fn: Callable, *args, iters: int) -> float:
    """Median wall time in seconds of `fn(*args)`, after one call that compiles and warms up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure_ceilings(quick: bool, iters: int) -> dict[str, float]:
    """Copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s) of this device."""
    n = 1 << (22 if quick else 30)  # float32 elements: 16 MiB or 4 GiB
    x = jnp.ones((n,), jnp.float32)
    copy_s = time_call(jax.jit(lambda x: x * 2.0), x, iters=iters)
    side = 512 if quick else 8192
    a = jnp.ones((side, side), jnp.bfloat16)
    matmul_s = time_call(jax.jit(jnp.matmul), a, a, iters=iters)
    return {"copy_gbps": 2 * 4 * n / copy_s / 1e9, "matmul_tflops": 2 * side**3 / matmul_s / 1e12}


def reference_bytes(args) -> float:
    """Rough peak memory of the reference: one block of gathered K/V per row, in float32."""
    q, k_pages = args[0], args[1]
    block_keys = 8 * k_pages.shape[2]
    return 3 * q.shape[0] * k_pages.shape[0] * block_keys * q.shape[2] * 4 * 2


def implementations(name: str, seqs, args, sm_scale: float, interpret: bool) -> dict:
    """The callables to time on this scenario, keyed by implementation name."""
    impls = {
        "ours": functools.partial(ragged_paged_attention, sm_scale=sm_scale, interpret=interpret),
        "reference": functools.partial(ragged_paged_attention_reference, sm_scale=sm_scale),
    }
    if reference_bytes(args) > _REFERENCE_LIMIT.value * 2**30:
        del impls["reference"]
    if name == "decode":
        impls["jax_paged"] = jax_paged_attention(args, sm_scale, interpret)
    if name == "prefill":
        impls["jax_mha"] = jax_mha(seqs, args, sm_scale, interpret)
    return {k: v for k, v in impls.items() if k in _IMPLS.value}


def jax_paged_attention(args, sm_scale: float, interpret: bool):
    """JAX's decode-only paged attention on the same pages (it takes unscaled q: scale it)."""
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged

    q, k_pages, v_pages, kv_lens, page_indices, _, num_seqs = args
    num_seqs = int(num_seqs[0])
    width = page_indices.shape[1]
    k_splits = min(16, width)
    call = functools.partial(
        jax_paged.paged_attention,
        pages_per_compute_block=min(8, width // k_splits),
        k_splits=k_splits,
        interpret=interpret,
    )
    q_dec, tables, lengths = q[:num_seqs] * sm_scale, page_indices[:num_seqs], kv_lens[:num_seqs]
    return lambda *_: call(q_dec, k_pages, v_pages, tables, lengths)


def jax_mha(seqs, args, sm_scale: float, interpret: bool):
    """JAX's dense causal flash attention over the prompt's own Q/K/V (no paging, no context)."""
    from jax.experimental.pallas.ops.gpu import attention

    [(_, length)] = seqs
    q = args[0][None, :length]  # [1, length, heads, head_dim]; also stands in for K and V
    block = min(128, length)
    sizes = attention.BlockSizes(block_q=block, block_k=block)
    call = functools.partial(
        attention.mha,
        segment_ids=None,
        sm_scale=sm_scale,
        causal=True,
        block_sizes=sizes,
        interpret=interpret,
    )
    return lambda *_: call(q, q, q)


def measure(name, seqs, shapes, interpret, iters) -> list[dict]:
    args = build_inputs(seqs, shapes, _PAGE_SIZE.value)
    sm_scale = shapes.head_dim**-0.5
    nbytes, flops = work(seqs, shapes)
    rows, outputs = [], {}
    for impl, fn in implementations(name, seqs, args, sm_scale, interpret).items():
        seconds = time_call(fn, *args, iters=iters)
        outputs[impl] = fn(*args)
        rows.append(
            dict(
                scenario=name,
                impl=impl,
                ms=seconds * 1e3,
                gbps=nbytes / seconds / 1e9,
                tflops=flops / seconds / 1e12,
            )
        )
    if "reference" in outputs:  # jax_mha runs on stand-in K/V: nothing to compare it with
        expected = outputs["reference"].astype(jnp.float32)
        for row in rows:
            if row["impl"] in ("ours", "jax_paged"):
                got = outputs[row["impl"]].astype(jnp.float32)
                row["max_err"] = float(jnp.abs(got - expected[: got.shape[0]]).max())
    return rows


def sweep_tiles(name, seqs, shapes, interpret, iters) -> list[dict]:
    """Ours over block_rows x keys per tile x num_warps x num_stages; fastest first."""
    args = build_inputs(seqs, shapes, _PAGE_SIZE.value)
    page_size, results = _PAGE_SIZE.value, []
    grid = itertools.product((16, 32, 64, 128), (32, 64, 128), (4, 8), (2, 3))
    for block_rows, block_kv, warps, stages in grid:
        pages = max(1, block_kv // page_size)
        fn = functools.partial(
            ragged_paged_attention,
            sm_scale=shapes.head_dim**-0.5,
            block_rows=block_rows,
            pages_per_block=pages,
            num_warps=warps,
            num_stages=stages,
            interpret=interpret,
        )
        try:
            ms = time_call(fn, *args, iters=iters) * 1e3
        except Exception as e:  # a tile too big for shared memory fails to compile: note it
            ms = None
            print(f"  {name} {block_rows=} {block_kv=} {warps=} {stages=}: {type(e).__name__}")
        tiles = dict(block_rows=block_rows, block_kv=pages * page_size)
        results.append(dict(scenario=name, **tiles, num_warps=warps, num_stages=stages, ms=ms))
    return sorted(results, key=lambda r: math.inf if r["ms"] is None else r["ms"])


def describe(seqs) -> dict[str, int]:
    return dict(num_seqs=len(seqs), tokens=sum(n for _, n in seqs), keys=sum(c + n for c, n in seqs))


def device_name() -> str:
    kind = jax.devices()[0].device_kind
    return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") or jax.default_backend()


def print_table(rows: list[dict], ceilings: dict[str, float]) -> None:
    print(
        f"\nceilings: copy {ceilings['copy_gbps']:.0f} GB/s, "
        f"bf16 matmul {ceilings['matmul_tflops']:.1f} TFLOP/s"
    )
    header = f"{'scenario':<9} {'impl':<10} {'ms':>9} {'GB/s':>8} {'%copy':>6} "
    print(header + f"{'TFLOP/s':>8} {'%mm':>6} {'max err':>9}")
    for r in rows:
        pct_bw = 100 * r["gbps"] / ceilings["copy_gbps"]
        pct_mm = 100 * r["tflops"] / ceilings["matmul_tflops"]
        err = f"{r['max_err']:.2e}" if "max_err" in r else ""
        print(
            f"{r['scenario']:<9} {r['impl']:<10} {r['ms']:>9.3f} {r['gbps']:>8.1f} {pct_bw:>6.1f} "
            f"{r['tflops']:>8.2f} {pct_mm:>6.1f} {err:>9}"
        )


def main(argv: list[str]) -> None:
    del argv
    quick, interpret, iters = _QUICK.value, _INTERPRET.value, _ITERS.value
    if quick:
        iters = min(iters, 3)
    shapes = TINY if quick else LLAMA2_7B
    ceilings = measure_ceilings(quick, iters)
    rows, sweep = [], []
    for name, seqs in scenarios(quick).items():
        rows += measure(name, seqs, shapes, interpret, iters)
        if _SWEEP.value:
            sweep += sweep_tiles(name, seqs, shapes, interpret, iters)
    print_table(rows, ceilings)
    for name in scenarios(quick):
        best = next((r for r in sweep if r["scenario"] == name and r["ms"] is not None), None)
        if best:
            print(f"fastest tiles for {name}: {best}")
    out = pathlib.Path(_OUT.value or f"docs/benchmarks/attention_{device_name()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = dict(
        device=jax.devices()[0].device_kind,
        jax_version=jax.__version__,
        shapes=dataclasses.asdict(shapes),
        page_size=_PAGE_SIZE.value,
        interpret=interpret,
        iters=iters,
        scenarios={k: describe(v) for k, v in scenarios(quick).items()},
        ceilings=ceilings,
        results=rows,
        tile_sweep=sweep,
    )
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
