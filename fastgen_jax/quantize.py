"""Weight-only int8 quantization (`EngineConfig.quantize="int8"`, `--quantize=int8`).

Each dense projection of the layer stack (q/k/v, the attention output, the MLP's gate/up and down)
and the LM head is replaced by int8 weights with one float32 scale per output channel:
scale[n] = max_k |w[k, n]| / 127, q[n, k] = round(w[k, n] / scale[n]), so w ~ q.T * scale. The
activations, norms, embeddings (their lookup), KV cache and everything else stay in the compute
dtype. A decode step reads every weight once and does little else, so on a CPU it is bound by the
weights' bytes: int8 reads a quarter of float32's (`cpu_kernels.matmul`, chosen by
`fastgen_jax.attention`; the README gives the measured speed and the accuracy against float32).

Layout: a weight `w` of the stack, [layers, *K, *N] (K the axes it contracts with the activations:
one, or two for the output projection's [heads, head_dim]), becomes `w_int8` [layers, N, K] (each
output channel's weights contiguous, N and K flattened) and `w_scale` f32 [layers, N]; the model
reshapes the product back. The LM head (`lm_head`, or the tied `embed`) becomes `lm_head_int8`
[vocab, hidden] and `lm_head_scale` [vocab]; a tied embedding stays for the lookup. Under tensor
parallelism the weights arrive padded and fused with their shard axis outermost in N or K, and
`fastgen_jax.parallel` splits the int8 rows and scales over the devices by that axis.
Mixture-of-experts blocks are left in the compute dtype (their experts go through `ragged_dot`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from fastgen_jax import parallel

# The stack's projections and how many leading axes (after the layer axis) they contract over.
PROJECTIONS = {
    "wqkv": 1,
    "wq": 1,
    "wk": 1,
    "wv": 1,
    "wo": 2,
    "w_gate_up": 1,
    "w_gate": 1,
    "w_up": 1,
    "w_down": 1,
}


@functools.partial(jax.jit, static_argnums=1)
def quantize_int8(w: jax.Array, k_axes: int) -> tuple[jax.Array, jax.Array]:
    """w [B, *K, *N] (B a batch of matrices, e.g. the layers) -> (int8 [B, N, K], f32 scales [B, N]),
    N and K flattened, per output channel (absmax / 127; an all-zero channel gets scale 1)."""
    w = w.reshape(w.shape[0], math.prod(w.shape[1 : 1 + k_axes]), -1).astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=1) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(w / scale[:, None, :]), -127, 127).astype(jnp.int8)
    return jnp.swapaxes(q, 1, 2), scale


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """int8 [..., N, K] and scales [..., N] -> f32 [..., K, N] (tests, accuracy reports)."""
    return jnp.swapaxes(q.astype(jnp.float32) * scale[..., :, None], -1, -2)


def quantize_params(variables: dict, tie_word_embeddings: bool, place=None) -> dict:
    """`variables` ({"params": ...}, fused by `parallel.fuse_projections`) with the projections and
    the LM head in int8, as the module docstring lays out. Every other leaf is passed on as it is (no
    copy). `place(name, ndim)`: the sharding each new leaf is made on (see `quantize_over`); None:
    where XLA puts it (the device the weights are on)."""
    params = variables["params"]
    out = dict(params)
    out["layers"] = _quantize_tree(params["layers"], place)
    head = params["embed"] if tie_word_embeddings else out.pop("lm_head")
    out["lm_head_int8"], out["lm_head_scale"] = _quantizer(None, _placement(place, "lm_head", 2))(head)
    return {**variables, "params": out}


def quantize_over(variables: dict, config, mesh) -> dict:
    """`quantize_params` of `variables` (padded, fused and placed by `parallel.shard_params` for
    `config` over `mesh`), each int8 leaf and scale made split over `mesh` by `parallel`'s rules:
    each device quantizes what it will hold (the scales of K-split weights take a max over devices),
    so no device ever holds another's weights, on one host or several."""
    return quantize_params(
        variables,
        config.tie_word_embeddings,
        lambda name, ndim: parallel.leaf_sharding(name, ndim, config, mesh),
    )


def quantized_nbytes(variables: dict, tie_word_embeddings: bool) -> int:
    """Bytes `quantize_params` leaves of `variables` (fused or not), from shapes alone (nothing is
    quantized or fused): what an engine with `quantize="int8"` holds for its weights."""
    held = jax.eval_shape(
        lambda v: quantize_params(parallel.fuse_projections(v, 1), tie_word_embeddings), variables
    )
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(held))


def _quantize_tree(tree: dict, place) -> dict:
    out = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            out[name] = value if name == "moe" else _quantize_tree(value, place)
        elif name in PROJECTIONS:
            quantize = _quantizer(PROJECTIONS[name], _placement(place, name, 3))  # [layers, N, K]
            out[f"{name}_int8"], out[f"{name}_scale"] = quantize(value)
        else:
            out[name] = value
    return out


def _placement(place, name: str, ndim: int):
    """The shardings of `name`'s int8 weights (`ndim` axes) and its scales (one fewer), or None."""
    return None if place is None else (place(f"{name}_int8", ndim), place(f"{name}_scale", ndim - 1))


@functools.cache
def _quantizer(k_axes: int | None, shardings: tuple | None):
    """`quantize_int8` over `k_axes` contracted axes, or for k_axes None the LM head's [vocab, hidden]
    (-> int8 [vocab, hidden], scales [vocab]), as one program whose results land on `shardings` (None:
    where XLA puts them). Cached, so every engine of a process reuses the compiled programs."""

    def quantize(w):
        if k_axes is not None:
            return quantize_int8(w, k_axes)
        q, scale = quantize_int8(w.T[None], 1)  # K = hidden
        return q[0], scale[0]

    return jax.jit(quantize) if shardings is None else jax.jit(quantize, out_shardings=shardings)
