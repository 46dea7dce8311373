"""Writing a step's new K/V rows into the paged pool in place: the C++ kernel in `write_kv.cc`,
called through XLA's FFI with its output aliasing the (donated) pages.

`write_kv_pages(k_pages, v_pages, k, v, slot_mapping)` has the contract of
`pallas_kernels.reference.write_kv_pages_reference`: row t of k and v goes to flat slot
`slot_mapping[t]` of every KV head (rounded to the pages' type), out-of-range slots are dropped. XLA's
CPU backend widens a bfloat16 scatter to float32 over the whole pool; this writes only the rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpu_kernels import build

TARGET = "fastgen_write_kv"
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def write_kv_pages(
    k_pages: jax.Array,  # [num_kv_heads, total_num_pages, page_size, head_dim]
    v_pages: jax.Array,
    k: jax.Array,  # [T, num_kv_heads, head_dim]
    v: jax.Array,
    slot_mapping: jax.Array,  # i32[T]: page * page_size + offset; out of range means "drop"
) -> tuple[jax.Array, jax.Array]:
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype:
        raise ValueError(f"{k_pages.shape=} {v_pages.shape=} {k_pages.dtype=} {v_pages.dtype=}")
    if k_pages.dtype not in DTYPES:
        raise ValueError(f"{k_pages.dtype=} must be one of float32, bfloat16, float16")
    kvh, _, _, head_dim = k_pages.shape
    if k.shape != v.shape or k.shape[1:] != (kvh, head_dim) or slot_mapping.shape != k.shape[:1]:
        raise ValueError(f"{k.shape=} {v.shape=} {slot_mapping.shape=} do not match {k_pages.shape=}")
    build.load()
    slots = slot_mapping.astype(jnp.int32)
    out = jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype)
    call = jax.ffi.ffi_call(TARGET, out, input_output_aliases={0: 0}, vmap_method="sequential")
    return call(k_pages, k.astype(k_pages.dtype), slots), call(v_pages, v.astype(v_pages.dtype), slots)
