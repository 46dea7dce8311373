"""The one place that chooses the step's kernels: attention over the paged KV cache, and the matmuls
of the projections (float32, and weight-only int8 from `fastgen_jax.quantize`).

Models call `Attention.write_kv`, `Attention.paged_attention`, `Attention.matmul` and
`Attention.int8_matmul` and never import kernels directly, so a new kernel plugs in here and nowhere
else.

- "reference": pure JAX (`pallas_kernels.reference`), any backend.
- "pallas": the Pallas ragged paged attention kernel, compiled through Triton; GPU only.
- "pallas_interpret": the same kernel run by the Pallas interpreter on any backend (slow; tests).
- "cpu": the C++ kernels (`cpu_kernels`, XLA FFI), CPU only: ragged paged attention, the K/V page
  writer, and the float32 and int8 matmuls for decode-sized slabs. They are compiled on first use (see
  `cpu_kernels.build`); an explicit "cpu" that cannot be built raises. With any other choice int8
  weights are widened and multiplied by XLA.
- "auto": "pallas" on a GPU, "cpu" on a CPU, falling back to "reference" (with one log line) when
  the CPU kernel cannot be built. Shapes the Pallas kernel cannot take (a head_dim that is not a
  power of two, say) quietly use the reference instead; an explicit "pallas" raises.

The K/V write is the reference XLA scatter, except on "cpu": there a C++ writer updates the donated
pages in place (XLA's CPU scatter widens a bfloat16 pool to float32 and back on every step). Either
moves only the step's new rows; a write fused into the attention kernel would race with the kernel's
programs reading those rows. KV pages may be another float type than the queries (`kv_cache_dtype`):
"cpu" and "reference" read them into float32 scores and sums; the Pallas kernel takes one float type,
so the queries (and its output) are rounded to the pages' type.

Under tensor parallelism (`Attention.mesh` set, see `fastgen_jax.parallel`) both the write and the
attention run per device under `shard_map`: each device holds the query heads and KV pages of its own
KV heads, so either implementation runs unchanged on its slice and no device reads another's cache.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import cpu_kernels
from fastgen_jax import weight_layout
from fastgen_jax.config import ATTENTION_IMPLS, ConfigError
from fastgen_jax.parallel import AXIS
from pallas_kernels import ragged_paged_attention, reference

KERNEL_IMPLS = ("pallas", "pallas_interpret", "cpu")
# Weight-only int8 products (`Attention.int8_matmul`). Every path multiplies the rows rounded to
# bfloat16 with float32 sums, so the slab a request shares changes its results only through the order
# of the float32 sums (the kernel's and XLA's differ), not through the rows' precision.
# - At most INT8_KERNEL_ROWS rows, on the CPU kernels: the C++ kernel, which reads the int8 weights
#   once. Measured (`scripts/bench_int8_matmul.py`, SmolLM2's projections and int8 head, 2 cores,
#   reading the layers' stacks in place as the model does): 5.1-5.3 ms at 1 row and 7.2-7.7 at 4 (each
#   column's weights read in order since issue 19's last round; 9.8-16.2 and 9.6-10.8 before) against
#   23-26 for float32 weights; a review measured 0.42 / 1.27 ms at 1 row on 2048x8192 /
#   4096x8192 matrices against 2.84 / 4.40 in float32, and 6.8 ms at 32 rows against 10.1.
# - More than INT8_BF16_ROWS rows (prompt-sized): XLA's bfloat16 dot of the widened weights, at twice
#   float32's rate where the CPU has AVX512_BF16 (66 vs 145 ms at 64 rows, 249 vs 415 at 256). At few
#   rows the same dot is slow on large matrices (18.7 ms at 4 rows on 2048x8192, float32's 4.3).
# - Otherwise (no kernel, few rows): XLA's float32 dot of the widened weights.
INT8_KERNEL_ROWS = 32
INT8_BF16_ROWS = 32
# float32 projections (`Attention.matmul`): up to F32_KERNEL_ROWS rows of float32 weights on the CPU
# kernels go through the C++ kernel (`cpu_kernels.matmul.f32_matmul`), reading each layer's weights in
# place from the scanned stack; larger slabs through XLA's dot. Measured (`python
# scripts/bench_f32_matmul.py`, SmolLM2's 30 layers of projections, best of 15 in one process,
# docs/benchmarks/f32_matmul_cpu.json): 1 / 2 / 4 / 8 rows 18 / 20 / 24 / 31 ms against XLA's
# 24 / 27 / 28 / 32 (up to `cpu_kernels.matmul.STREAM_ROWS` rows the kernel reads each weight row in
# order); 16 / 32 / 64 / 128 / 256 rows 35 / 56 / 88 / 174 / 364 against 44 / 69 / 116 / 192 / 388;
# 512 rows 748 against 737 (that table predates asking ahead for the streamed rows: 1 / 4 / 8 rows now
# 13.2-14.1 / 14.6-14.9 / 21.9-22.6 ms in `scripts/matmul_harness.cc`). The LM head ([N, K]): at up to
# 8 rows each column read in order, 2.8-3.1 ms at 1 row and 3.1-3.4 at 4 (the harness; XLA's dot
# about 5.4 at 1 row); past 8 rows the column-group tiles, which measured 6.2-10.3 ms against XLA's
# 9.2-13.1 at 2-16 rows. Only the slab's real rows are multiplied (`rows=`). Whole steps
# (`scripts/profile_step.py --f32_kernel_rows`, alternating runs): decode 4 x 128 35-44 ms against
# 59-95, 8 x 128 52-61 against 85-100, 32 x 512 127-131 against 174-175, a 256-token prompt chunk
# 365-426 against 391-463. Since each thread asks for its next strip's weights while it multiplies
# (issue 19, this round): 256 rows 309-353 ms against XLA's 343-382, 512 rows 689-741 against
# 728-766 (six runs, the kernel faster in each), so a 512-token budget's prompt chunks take the
# kernel too (whole steps, alternating: a 512-token prompt chunk 762-876 ms against 877-944).
# Those figures are the AVX-512 build's (`cpu_kernels.build.vector_lanes()` 16). Built for AVX2 with
# FMA (8 lanes, 16 registers: the tiles sized for them, and past two row tiles each 16-column strip
# packed into contiguous rows first), on a 2-core AVX2-only EPYC (Zen 3), the same script measured
# 1 / 8 / 16 / 32 / 64 / 128 rows 25.4 / 29.9 / 51.2 / 72.5 / 113 / 254 ms against XLA's 33.4 / 45.9 /
# 56.3 / 93.2 / 138 / 279, and 256 / 512 rows 491 / 901 against 486 / 891 (even): so up to 128 rows
# there. Without either (0 lanes) XLA's dot takes every slab.
# With either build the model's projections are now packed at load time instead
# (`fastgen_jax.weight_layout`, `Attention.packed_matmul`: every row count by the kernel), so this
# applies only to weights left in [K, N] (tensor parallelism, weight_layout.PACKED = False).
F32_KERNEL_ROWS_BY_LANES = {16: 512, 8: 128}
# Set to an int to override the above (benchmarks compare programs this way); None: by the build.
F32_KERNEL_ROWS: int | None = None


def f32_kernel_rows() -> int:
    """The most rows the float32 kernel multiplies here (0: none; `F32_KERNEL_ROWS` when set)."""
    if F32_KERNEL_ROWS is not None:
        return F32_KERNEL_ROWS
    return F32_KERNEL_ROWS_BY_LANES.get(cpu_kernels.build.vector_lanes(), 0)


log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Attention:
    """A resolved attention implementation (hashable, so models can hold it as a static field).

    impl: "reference", "pallas", "pallas_interpret" or "cpu".
    fallback: use the reference for shapes the kernel does not support instead of raising.
    mesh: the tensor-parallel mesh the heads are split over (None: one device).
    """

    impl: str
    fallback: bool = False
    mesh: Mesh | None = None

    def __post_init__(self):
        if self.impl not in ("reference", *KERNEL_IMPLS):
            raise ConfigError(f"unresolved attention impl {self.impl!r}")

    @property
    def cost_follows_context(self) -> bool:
        """Whether a wider page table costs nothing (the kernel walks only the pages a sequence
        uses), so one page-table width serves every step."""
        return self.impl == "cpu"

    def over(self, mesh: Mesh | None) -> Attention:
        """This implementation, run per shard over `mesh` when it has more than one device."""
        return dataclasses.replace(self, mesh=mesh if mesh is not None and mesh.size > 1 else None)

    @property
    def shards(self) -> int:
        """Devices the heads are split over (1 without a mesh)."""
        return 1 if self.mesh is None else self.mesh.size

    @property
    def write_kv(self) -> Callable[..., tuple[jax.Array, jax.Array]]:
        # The C++ writer on the CPU kernels (XLA's CPU scatter widens a bfloat16 pool to float32).
        write = (
            cpu_kernels.write_kv.write_kv_pages if self.impl == "cpu" else reference.write_kv_pages_reference
        )
        if self.mesh is None:
            return write
        # (k_pages, v_pages, k [T, KVH, D], v, slot_mapping) -> (k_pages, v_pages)
        return _per_shard(write, self.mesh, (_PAGES, _PAGES, _HEADS, _HEADS, P()), (_PAGES, _PAGES))

    @property
    def paged_attention(self) -> Callable[..., jax.Array]:
        if self.impl == "reference":
            attend = reference.ragged_paged_attention_reference
        elif self.impl == "cpu":
            attend = cpu_kernels.ragged_paged_attention.ragged_paged_attention
        else:
            attend = functools.partial(
                ragged_paged_attention.ragged_paged_attention,
                interpret=self.impl == "pallas_interpret",
            )
            attend = _with_fallback(attend) if self.fallback else _queries_in_kv_dtype(attend)
        if self.mesh is None:
            return attend
        # (q [T, H, D], k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs) -> [T, H, D]
        return _per_shard(attend, self.mesh, (_HEADS, _PAGES, _PAGES, P(), P(), P(), P()), _HEADS)

    @property
    def _cpu_kernels(self) -> bool:
        """The C++ kernels on one device (under tensor parallelism XLA's dot handles the shards)."""
        return self.impl == "cpu" and self.mesh is None

    @property
    def reads_weight_stacks(self) -> bool:
        """Whether a scanned model should hand `matmul` each layer's weights as (whole stack, layer
        index) too: the float32 kernel reads them in place, where XLA would first copy a scanned
        slice out for a custom call (SmolLM2 at 32 rows: 60.5 ms of projections on slices, 56.4 on
        the stack). XLA's own dot reads slices in place, so it takes the slice."""
        return self._cpu_kernels and (f32_kernel_rows() > 0 or self.packs_weights)

    @property
    def packs_weights(self) -> bool:
        """Whether the model's float32 projections are stored packed for the CPU kernel
        (`fastgen_jax.weight_layout`; then `packed_matmul` multiplies them at every row count)."""
        return self._cpu_kernels and weight_layout.packs_here()

    def packed_matmul(
        self,
        x: jax.Array,
        w: jax.Array,
        stack: tuple[jax.Array, jax.Array] | None,
        out_shape: tuple[int, ...],
        *,
        rows: jax.Array | None = None,
    ) -> jax.Array:
        """A projection of packed float32 weights (`fastgen_jax.weight_layout`): x [T, *K] times w
        [strips, K, strip] -> [T, *out_shape], by the C++ kernel at every row count. `stack` (or None): (the
        whole stack [L, strips, K, strip] that w is a scanned slice of, w's index), read in place when
        given; `rows` as for `matmul`."""
        flat, n = x.reshape(x.shape[0], -1), math.prod(out_shape)
        if stack is not None:
            whole, index = stack
            if whole.shape[1:] != w.shape:
                raise ValueError(f"a stack {whole.shape} of slices {w.shape}: not w's stack")
            y = cpu_kernels.matmul.f32_packed_matmul(flat, whole, n, layer=index, rows=rows)
        else:
            y = cpu_kernels.matmul.f32_packed_matmul(flat, w, n, rows=rows)
        return y.reshape(x.shape[0], *out_shape)

    def _f32_kernel(self, x: jax.Array, w: jax.Array, *, any_rows: bool = False) -> bool:
        """Whether the float32 kernel can multiply x by w here: at x's rows, or (`any_rows`) at
        however many rows a traced `rows=` turns out to use, up to `f32_kernel_rows()`."""
        return (
            self.reads_weight_stacks
            and 0 < f32_kernel_rows()
            and (any_rows or x.shape[0] <= f32_kernel_rows())
            and x.dtype == jnp.float32
            and w.dtype == jnp.float32
        )

    def matmul(
        self,
        x: jax.Array,
        w: jax.Array,
        *,
        w_nk: bool = False,
        preferred_element_type=None,
        stack: tuple[jax.Array, jax.Array] | None = None,
        rows: jax.Array | None = None,
    ) -> jax.Array:
        """A projection: x [T, *K] times weights w [*K, *N] (contracting x's trailing axes with w's
        leading ones) -> [T, *N]; or with `w_nk`, x [T, K] times w [N, K] -> [T, N] (a tied LM
        head's embedding rows). float32 rows and weights of up to `f32_kernel_rows()` rows run the C++
        kernel on "cpu" (one device) over the flattened [K, N], reading `stack` =
        (the whole stack [L, *K, *N] that w is a scanned slice of, w's index) in place when given;
        every other case is XLA's dot (in x's dtype, or `preferred_element_type`), over the axes
        as they are (tensor parallelism shards them). `rows` (i32[], traced): how many leading rows
        of x are real (the step's slab pads them to its bucket); the kernel multiplies only those
        and gives zeros below; XLA's dot computes every row."""
        use_kernel = self._f32_kernel(x, w)
        if w_nk:
            kernel = lambda x, w: cpu_kernels.matmul.f32_matmul(x, w, w_nk=True, rows=rows)
            xla = lambda x, w: jnp.einsum("tk,nk->tn", x, w, preferred_element_type=preferred_element_type)
            if use_kernel:
                return kernel(x, w)
            if rows is not None and self._f32_kernel(x, w, any_rows=True):
                # More rows than the kernel takes, of which a step mostly uses a few (a prompt step's
                # LM head: its sequences' last rows of a 256-row bucket): the kernel over those when
                # they fit it, else XLA's dot over all. On a 2-core AVX2 EPYC, SmolLM2's head at 32
                # rows of 256 took 24 ms against XLA's 105; at 256 of 256, 111 against 97.
                return jax.lax.cond(rows <= f32_kernel_rows(), kernel, xla, x, w)
            return xla(x, w)
        k_axes = x.ndim - 1
        if use_kernel:
            k, flat = math.prod(w.shape[:k_axes]), x.reshape(x.shape[0], -1)
            if stack is not None:
                whole, index = stack
                if whole.shape[1:] != w.shape:
                    raise ValueError(f"a stack {whole.shape} of slices {w.shape}: not w's stack")
                y = cpu_kernels.matmul.f32_matmul(
                    flat, whole.reshape(whole.shape[0], k, -1), layer=index, rows=rows
                )
            else:
                y = cpu_kernels.matmul.f32_matmul(flat, w.reshape(k, -1), rows=rows)
            return y.reshape(x.shape[0], *w.shape[k_axes:])
        return jnp.tensordot(x, w, axes=k_axes, preferred_element_type=preferred_element_type)

    def int8_matmul(
        self,
        x: jax.Array,
        q: jax.Array,
        scale: jax.Array,
        stack: tuple[jax.Array, jax.Array, jax.Array] | None = None,
        *,
        preferred_element_type=None,
        rows: jax.Array | None = None,
    ) -> jax.Array:
        """x [T, K] times weight-only int8 weights q [N, K] with per-channel scales [N] (see
        `fastgen_jax.quantize`) -> [T, N] in x's dtype (or `preferred_element_type`). `stack`, when
        given, is (the whole stacks [L, N, K] and [L, N] that q and scale are scanned slices of, their
        index): the C++ kernel then reads the layer in place instead of XLA copying the slice out
        first (SmolLM2's projections at one row, `scripts/bench_int8_matmul.py`, two runs: 5.1-5.3 ms
        in place against 7.3-8.6 on slices; about equal at 4-32 rows).

        The rows are rounded to bfloat16 on every path (int8 values are exact there; llama.cpp's
        Q8_0 rounds rows to 8-bit blocks), the sums are float32; which path runs follows the rows
        and the implementation (see INT8_KERNEL_ROWS). `rows` as for `matmul`."""
        out_dtype = preferred_element_type or x.dtype
        xb = x.astype(jnp.bfloat16)
        if self._cpu_kernels and x.shape[0] <= INT8_KERNEL_ROWS:
            if stack is not None:
                whole_q, whole_scale, index = stack
                if whole_q.shape[1:] != q.shape or whole_scale.shape[1:] != scale.shape:
                    raise ValueError(
                        f"stacks {whole_q.shape}, {whole_scale.shape} of {q.shape}, {scale.shape}"
                    )
                y = cpu_kernels.matmul.int8_matmul(xb, whole_q, whole_scale, layer=index, rows=rows)
            else:
                y = cpu_kernels.matmul.int8_matmul(xb, q, scale, rows=rows)
            return y.astype(out_dtype)
        compute = jnp.bfloat16 if x.shape[0] > INT8_BF16_ROWS else jnp.float32
        y = jnp.einsum("tk,nk->tn", xb.astype(compute), q.astype(compute), preferred_element_type=jnp.float32)
        return (y * scale.astype(jnp.float32)).astype(out_dtype)


_HEADS = P(None, AXIS, None)  # [T, heads, head_dim]
_PAGES = P(AXIS)  # [kv_heads, pages, page_size, head_dim]


def _per_shard(fn: Callable, mesh: Mesh, in_specs: tuple, out_specs) -> Callable:
    """`fn` run on each device's slice of the heads. Keyword arguments are settings: Python values
    stay static, arrays (a layer's traced sliding window) enter replicated."""

    def call(*args, **kwargs):
        traced = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
        static = {k: v for k, v in kwargs.items() if k not in traced}

        def body(*a):
            return fn(*a[: len(args)], **dict(zip(traced, a[len(args) :], strict=True)), **static)

        specs = (*in_specs, *(P() for _ in traced))
        return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=out_specs, check_vma=False)(
            *args, *traced.values()
        )

    return call


def _queries_in_kv_dtype(kernel: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """The Pallas kernel takes one float type: with KV pages of another (`kv_cache_dtype`), the
    queries are cast to the pages' type going in and the output back to theirs coming out."""

    def paged_attention(q, k_pages, v_pages, *args, **kwargs):
        if q.dtype == k_pages.dtype:
            return kernel(q, k_pages, v_pages, *args, **kwargs)
        return kernel(q.astype(k_pages.dtype), k_pages, v_pages, *args, **kwargs).astype(q.dtype)

    return paged_attention


def _with_fallback(kernel: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """The kernel where it supports the (static) shapes and dtype (queries in the pages' type), the
    reference elsewhere (which takes queries and pages of different types as they are)."""

    def paged_attention(q, k_pages, v_pages, *args, **kwargs):
        if ragged_paged_attention.supports(q.astype(k_pages.dtype), k_pages):
            return _queries_in_kv_dtype(kernel)(q, k_pages, v_pages, *args, **kwargs)
        return reference.ragged_paged_attention_reference(q, k_pages, v_pages, *args, **kwargs)

    return paged_attention


@functools.cache
def get_attention(impl: str = "auto") -> Attention:
    """Resolves `EngineConfig.attention_impl` for the current default backend."""
    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    backend = jax.default_backend()
    if impl == "auto":
        if backend == "gpu":
            return Attention("pallas", fallback=True)
        if backend == "cpu" and _cpu_kernel_error() is None:
            return Attention("cpu")
        return Attention("reference")
    if impl == "pallas" and backend != "gpu":
        raise ConfigError(
            f"attention_impl='pallas' needs a GPU (backend is {backend!r}); "
            "use 'pallas_interpret' to run the kernel through the interpreter"
        )
    if impl == "cpu":
        if backend != "cpu":
            raise ConfigError(f"attention_impl='cpu' needs the CPU backend (backend is {backend!r})")
        if (error := _cpu_kernel_error()) is not None:
            raise ConfigError(f"attention_impl='cpu': the kernel is unavailable: {error}")
    return Attention(impl)


def build_cpu_kernels() -> str:
    """Builds the C++ kernels now if the CPU backend will use them (the README's set-up does, through
    `python -m fastgen_jax.checkpoints fetch`, so that a first server start does not); returns a line
    saying what happened. A failed build is reported, not raised: `auto` then uses the reference."""
    if jax.default_backend() != "cpu":
        return f"CPU kernels: not needed on the {jax.default_backend()} backend"
    path = cpu_kernels.build.library_path()
    if path.exists():
        return f"CPU kernels: already built ({path})"
    start = time.perf_counter()
    try:
        cpu_kernels.build.build()
    except cpu_kernels.build.KernelBuildError as error:
        first = str(error).splitlines()[0]
        return f"CPU kernels: the build failed, the engine will use the reference attention: {first}"
    return f"CPU kernels: built in {time.perf_counter() - start:.1f} s ({path})"


@functools.cache
def _cpu_kernel_error() -> str | None:
    """None once the CPU kernel is built and registered, else why not (said once in the log)."""
    try:
        cpu_kernels.build.load()
    except cpu_kernels.build.KernelBuildError as error:
        log.warning("CPU attention kernel unavailable, using the reference: %s", str(error).splitlines()[0])
        return str(error)
    return None
