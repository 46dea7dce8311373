"""Matrix products for decode-sized slabs on the CPU: the C++ kernels in `matmul.cc`, called through
XLA's FFI so the step stays one compiled program.

`f32_matmul(x, w)` is `x @ w` for float32 rows x [M, K] and float32 weights w [K, N] (or, with
`w_nk=True`, `x @ w.T` for w [N, K], the LM head's layout), summed in float32. XLA's CPU dot runs
4-256 rows of SmolLM2's shapes below this kernel (`scripts/bench_f32_matmul.py`); the caller
(`fastgen_jax.attention`) uses the kernel for the rows where it wins.

`f32_packed_matmul(x, w_packed, n)` is the same product for weights stored in the CPU's packed layout
(`pack_f32`: the columns cut into strips of `build.packed_strip()`, each strip's rows contiguous),
which `fastgen_jax.weight_layout` gives a model's projections at load time: every row count reads
the weights in order there, and at every row count it ran faster than both the [K, N] kernel and
XLA's dot (docs/benchmarks/cpu_step_profile.md).

`int8_matmul(x, q, scale)` is `(x @ q.T) * scale` for bfloat16 rows x [M, K], int8 weights q [N, K]
(each output column's weights contiguous) and float32 per-column scales [N], summed in float32 into
a float32 [M, N]: a weight-only quantized projection. It is meant for the few rows of a decode step
(bound by reading the weights: the kernel reads a quarter of float32's bytes, widening them in
registers) up to a small fused step's (bound by the multiplies: bfloat16 pairs at twice float32's
rate where the CPU has AVX512_BF16). For many rows the caller (`fastgen_jax.attention`) widens the
weights and uses XLA's dot instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cpu_kernels import build

TARGET = "fastgen_int8_matmul"
F32_TARGET = "fastgen_f32_matmul"

# Up to this many rows, f32_matmul with w [K, N] reads each weight row in order, a group of 8 rows at
# a time, keeping the sums in cache; above it, each 64-column strip is held in registers and its
# weights read 256 bytes per row, N floats apart (fewer passes over the weights, but at one to two
# rows those short strided reads ran at 9-17 GB/s where in-order reads ran at 19-26 on 2 cores).
# Set by `scripts/bench_f32_matmul.py`'s "kernel, tiles" column against "kernel, stack".
STREAM_ROWS = 8


def f32_matmul(
    x: jax.Array,
    w: jax.Array,
    *,
    w_nk: bool = False,
    layer: jax.Array | int | None = None,
    stream_rows: int | None = None,
    rows: jax.Array | int | None = None,
) -> jax.Array:
    """f32 [M, K] x f32 [K, N] (or [N, K] with `w_nk`) -> f32 [M, N].

    With `rows` (an i32[], traced or not) only x's first `rows` rows (clamped to [0, M]) are
    multiplied, as a call on those rows alone would (the same path, the same bits), and the rest of
    the result is zeros: a step's slab pads its real rows up to a compiled bucket, and the padding
    then costs nothing here.

    Up to `stream_rows` (default: STREAM_ROWS, read at trace time) rows of w [K, N] stream the
    weights' rows in order, more go by register tiles of 64-column strips.

    With `layer` (an i32[] index, traced or not) w is a stack [L, K, N] (or [L, N, K]) and the
    product is with layer `layer`'s weights, read in place: inside a scan over layers, a slice of the
    stack would be copied out before the call (SmolLM2's 30 layers at 32 rows: 60.5 ms on slices,
    56.4 on the stack, `scripts/bench_f32_matmul.py`)."""
    stacked = layer is not None
    if x.ndim != 2 or w.ndim != 2 + stacked:
        raise ValueError(f"{x.shape=}, {w.shape=}: want [M, K] and [(L,) K, N] (or [(L,) N, K])")
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        raise ValueError(f"{x.dtype=}, {w.dtype=}: want float32")
    k, n = (w.shape[-1], w.shape[-2]) if w_nk else w.shape[-2:]
    if k != x.shape[1]:
        raise ValueError(f"{x.shape=} and {w.shape=} (w_nk={w_nk}) do not match")
    build.load()
    index = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    call = jax.ffi.ffi_call(F32_TARGET, out, vmap_method="sequential")
    limit = _rows_operand(x, rows)
    return call(
        x,
        w,
        index,
        limit,
        w_nk=w_nk,
        stream_rows=np.int64(STREAM_ROWS if stream_rows is None else stream_rows),
    )


PACKED_TARGET = "fastgen_f32_packed_matmul"


def pack_f32(w: jax.Array, strip: int | None = None) -> jax.Array:
    """w [..., K, N] -> [..., ceil(N / strip), K, strip]: strip j holds columns [j * strip, (j + 1) *
    strip) of every row, row after row; the last strip's missing columns are zeros. `strip`: the
    library's (`build.packed_strip()`) unless given."""
    strip = build.packed_strip() if strip is None else strip
    *lead, k, n = w.shape
    strips = -(-n // strip)
    w = jnp.pad(w, [(0, 0)] * (len(lead) + 1) + [(0, strips * strip - n)])
    w = w.reshape(*lead, k, strips, strip)
    return jnp.swapaxes(w, -3, -2)


def unpack_f32(packed: jax.Array, n: int) -> jax.Array:
    """The inverse of `pack_f32`: [..., strips, K, strip] -> [..., K, n]."""
    *lead, strips, k, strip = packed.shape
    return jnp.swapaxes(packed, -3, -2).reshape(*lead, k, strips * strip)[..., :n]


def f32_packed_matmul(
    x: jax.Array,
    w: jax.Array,
    n: int,
    *,
    layer: jax.Array | int | None = None,
    rows: jax.Array | int | None = None,
) -> jax.Array:
    """f32 [M, K] x the packed f32 [strips, K, strip] (`pack_f32` of a [K, n]) -> f32 [M, n].

    Every row goes through the same register tiles (up to 6 rows by one strip), each strip read in
    order once per tile, so a row's result is the same bits whatever other rows share the call.
    `layer` and `rows` as for `f32_matmul`: w a stack [L, strips, K, strip] read in place at layer
    `layer`; only the first `rows` rows multiplied, the rest zeros."""
    stacked = layer is not None
    if x.ndim != 2 or w.ndim != 3 + stacked:
        raise ValueError(f"{x.shape=}, {w.shape=}: want [M, K] and [(L,) strips, K, strip]")
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        raise ValueError(f"{x.dtype=}, {w.dtype=}: want float32")
    strips, k, strip = w.shape[-3:]
    if k != x.shape[1] or strips != -(-n // strip) or n <= 0:
        raise ValueError(f"{x.shape=} and {w.shape=} (n={n}) do not match")
    build.load()
    if strip != build.packed_strip():
        raise ValueError(f"weights packed in strips of {strip}; this library reads {build.packed_strip()}")
    index = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    call = jax.ffi.ffi_call(PACKED_TARGET, out, vmap_method="sequential")
    return call(x, w, index, _rows_operand(x, rows))


def _rows_operand(x: jax.Array, rows: jax.Array | int | None) -> jax.Array:
    """i32[1]: how many of x's leading rows the kernel multiplies (all of them without `rows`)."""
    return jnp.asarray(x.shape[0] if rows is None else rows, jnp.int32).reshape(1)


def int8_matmul(
    x: jax.Array,
    q: jax.Array,
    scale: jax.Array,
    *,
    layer: jax.Array | int | None = None,
    rows: jax.Array | int | None = None,
) -> jax.Array:
    """bf16 [M, K] x int8 [N, K] (times f32 [N] per column) -> f32 [M, N]. `rows` as for
    `f32_matmul`: only the first `rows` rows are multiplied, the rest of the result is zeros.

    With `layer` (an i32[] index, traced or not) q is a stack [L, N, K] and scale [L, N], and the
    product is with layer `layer`'s weights, read in place (a slice would be copied out first)."""
    stacked = layer is not None
    if x.ndim != 2 or q.ndim != 2 + stacked or scale.ndim != 1 + stacked:
        raise ValueError(f"{x.shape=}, {q.shape=}, {scale.shape=}: want [M, K], [(L,) N, K], [(L,) N]")
    if x.dtype != jnp.bfloat16 or q.dtype != jnp.int8 or scale.dtype != jnp.float32:
        raise ValueError(f"{x.dtype=}, {q.dtype=}, {scale.dtype=}: want bfloat16, int8, float32")
    if q.shape[-1] != x.shape[1] or scale.shape != q.shape[:-1]:
        raise ValueError(f"{x.shape=}, {q.shape=} and {scale.shape=} do not match")
    build.load()
    index = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
    out = jax.ShapeDtypeStruct((x.shape[0], q.shape[-2]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x, q, scale, index, _rows_operand(x, rows))
