"""The layer stack's float32 projections in the layout the CPU kernels read best (`Attention.packs_weights`).

A projection `w` of the stack, [layers, *K, *N] (K the axes it contracts with the activations: one,
or two for the output projection's [heads, head_dim]), becomes `w_packed` [layers, strips, K, strip]
(`cpu_kernels.matmul.pack_f32` of the flattened [K, N]): its columns cut into strips of `strip`
(the kernel's register tile width, `cpu_kernels.build.packed_strip()`), each strip's K rows one after
another. The model multiplies it with `Attention.packed_matmul` and reshapes the product to N's axes.

Why: in the [K, N] layout a strip's K rows lie N floats apart, so the kernel's tiles either waited on
scattered reads or copied each strip first, and past 128 rows XLA's dot was no slower. Packed, every
row count reads each strip in order. `scripts/matmul_harness.cc` on a 2-core AVX2 EPYC (Zen 3),
SmolLM2's 30 layers of projections from memory, ms: 1 / 4 / 8 / 16 / 32 / 64 / 256 rows 14.1 / 19.4 /
29.6 / 32.0 / 54.2 / 93.2 / 343 packed against 19.7 / 30.7 / 45.4 / 54.3 / 72.8 / 109 / 367 in place
(docs/benchmarks/cpu_step_profile.md has the whole-step figures).

On AVX-512 too (a 2-core Zen 4 EPYC, `scripts/matmul_ab.cc --layouts`, both layouts timed in turns in
one process, median time ratios packed / in place): 1-4 rows 0.90-1.03, 6-12 rows 0.61-0.79, 16-64
rows 0.51-0.81, 128-512 rows 0.92-0.98; the LM head packed 3.2 / 4.4 ms at 8 / 16 rows against 4.7 /
7.8 in its [N, K] form (the harness), 1-4 rows even; whole decode steps of 1 and 8 sequences at
context 128 took 15.0-17.1 and 23.5-26.6 ms packed against 18.1-18.8 and 25.5-28.9 in place (three
rounds in turns).

Where the kernels have register tiles (`PACKED_BY_LANES`: AVX-512 and AVX2); on one device (the CPU kernels;
tensor parallelism keeps XLA's dot over sharded [K, N] weights); float32 weights not quantized. The
LM head is packed too ([vocab, hidden] read as the [K, N] = [hidden, vocab] it multiplies), and a tied
embedding's lookup reads the packed copy (`packed_rows`). Packing runs once at load
time, one small program per projection shape (a transpose: SmolLM2's 424 MB in well under a second).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import cpu_kernels.build
import cpu_kernels.matmul
from fastgen_jax.quantize import PROJECTIONS

SUFFIX = "_packed"
# Whether the float32 projections are packed, by the kernels' vector lanes (`vector_lanes()`): both
# builds measured faster packed (the module docstring); 0 lanes (no kernel tiles): XLA's dot.
PACKED_BY_LANES = {8: True, 16: True}
# Set to a bool to override the above (tests and benchmarks compare both layouts); None: by the build.
PACKED: bool | None = None


def packs_here() -> bool:
    """Whether this build of the CPU kernels takes packed float32 projections (`PACKED` when set)."""
    if PACKED is not None:
        return PACKED
    return PACKED_BY_LANES.get(cpu_kernels.build.vector_lanes(), False)


def pack_params(variables: dict, strip: int | None = None) -> dict:
    """`variables` ({"params": ...}, fused by `parallel.fuse_projections`, float32) with every
    projection of the layer stack and the LM head packed as the module docstring lays out; every
    other leaf passed on as it is (no copy). The layer stack's dicts are consumed: each projection is
    dropped from them as soon as its packed copy exists, so loading holds one projection twice at
    most, not all of them.
    `strip`: the library's (`cpu_kernels.build.packed_strip()`) unless given. Raises ValueError for
    a projection that is not float32 (the packed kernel multiplies float32 rows only)."""
    strip = cpu_kernels.build.packed_strip() if strip is None else strip
    params = dict(variables["params"])
    params["layers"] = _pack_tree(params["layers"], strip)
    # The LM head: its own weight when untied, else the embedding, whose lookup then reads the packed
    # copy too (`CausalLM`), so packing adds no memory.
    head = "lm_head" if "lm_head" in params else "embed"
    _check_float32(head, params[head])
    params[f"{head}{SUFFIX}"] = _head_packer(strip)(params.pop(head))
    return {**variables, "params": params}


def _pack_tree(tree: dict, strip: int) -> dict:
    out = {}
    for name in list(tree):
        value = tree[name]
        if isinstance(value, dict):
            out[name] = value if name == "moe" else _pack_tree(value, strip)
        elif name in PROJECTIONS:
            _check_float32(name, value)
            del value
            out[f"{name}{SUFFIX}"] = _packer(PROJECTIONS[name], strip)(tree.pop(name))
        else:
            out[name] = value
    return out


def _check_float32(name: str, value: jax.Array) -> None:
    """ValueError where `value` is not float32 (the packed kernel multiplies float32 only)."""
    if value.dtype != jnp.float32:
        raise ValueError(f"{name} is {value.dtype}: only float32 projections are packed")


@functools.cache
def _packer(k_axes: int, strip: int):
    """w [layers, *K, *N] -> [layers, strips, prod(K), strip], one compiled program per shape."""

    def pack(w):
        k = 1
        for size in w.shape[1 : 1 + k_axes]:
            k *= size
        return cpu_kernels.matmul.pack_f32(w.reshape(w.shape[0], k, -1), strip)

    return jax.jit(pack)


@functools.cache
def _head_packer(strip: int):
    """[vocab, hidden] (the embedding's rows) -> [strips, hidden, strip]: the LM head's [K, N] packed."""
    return jax.jit(lambda w: cpu_kernels.matmul.pack_f32(w.T, strip))


def packed_rows(packed: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows `ids` [T] of the [vocab, hidden] matrix that `packed` [strips, hidden, strip] holds
    (an embedding lookup on the packed head): [T, hidden]."""
    strip = packed.shape[-1]
    return packed[ids // strip, :, ids % strip]
