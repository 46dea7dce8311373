"""Tensor parallelism and device groups, on JAX's own SPMD machinery.

A replica is one engine on a group of `tensor_parallel` devices, viewed as a one-axis `Mesh` ("tp").
Its parameters and KV pages are `NamedSharding`s over that axis (Megatron's split, gpt-fast's transform
of an unchanged model):

- attention: wq/wk/wv (and their biases) split over heads, wo over its input heads; each device keeps
  the KV pages of its own KV heads, so the cache is split over heads too;
- MLP: w_gate/w_up (and their biases) split over the hidden (intermediate) axis, w_down over its
  input rows;
- embedding and LM head: split over the model width, so a token lookup stays local and the logits are
  one all-reduce;
- norm scales: replicated (a few KiB);
- mixture of experts: each expert's (and the shared expert's) intermediate axis split like the MLP's,
  padded alike; the router replicated.

The step stays one jitted program: XLA's partitioner places the all-reduces after wo and w_down, and
attention runs per shard under `shard_map` (see `fastgen_jax.attention`), so the Pallas kernel and the
reference each see only their device's heads.

Heads must divide evenly. When `num_kv_heads` is a divisor of the device count, each KV head is
replicated (vLLM's rule: every device then holds one copy of its group's head); otherwise the heads are
padded with zero-weight heads up to a multiple of the device count (SmolLM2's 3 KV heads on 2 or 4
devices). A zero query head attends to zero values and meets a zero row of wo, so padding adds exactly
nothing to the output; the intermediate axis is padded the same way. `shard_config` gives the padded
shape, which is what the device program, the KV pages and their byte count follow.

Fused projections. `shard_params` also concatenates each layer's q/k/v projections into one `wqkv`
and the MLP's gate/up into one `w_gate_up` (and their biases), so a step runs one matmul where it
ran three and one where it ran two (`fuse_projections`). The fused weight keeps a shard axis of size
`tp`: wqkv is [layers, hidden, tp, (heads + 2 x kv_heads) / tp, head_dim], each shard holding its
own q heads, then its k heads, then its v heads, and w_gate_up is [layers, hidden, tp, 2,
intermediate / tp], each shard its own gate columns, then its up columns. Splitting that axis over
"tp" gives every device exactly the heads and columns the unfused split gives it; the model reads
the shard count off the weight's shape and splits the product back (`models.layers`).

Weight-only int8 (`EngineConfig.quantize="int8"`) quantizes those padded, fused weights in place
(`fastgen_jax.quantize`: w_int8 [layers, N, K], N and K flattened, shard axis outermost) and
splits them by the same rules: per output channel scales are unchanged by padding (a zero channel's
scale is 1) and by KV head replication (a copied channel gets the same scale), so every device holds
what one device would for its heads and columns. The model takes the shard count from the mesh
(`Attention.mesh`), and the products are XLA's dots, partitioned like the float weights'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fastgen_jax.config import ConfigError, ModelConfig

AXIS = "tp"


def device_groups(tensor_parallel: int, replicas: int = 1, devices: Sequence | None = None) -> list[list]:
    """`replicas` disjoint groups of `tensor_parallel` devices each, in device order."""
    devices = list(jax.devices() if devices is None else devices)
    needed = tensor_parallel * replicas
    if tensor_parallel <= 0 or replicas <= 0:
        raise ConfigError(f"tensor_parallel and replicas must be positive, got {tensor_parallel}, {replicas}")
    if needed > len(devices):
        raise ConfigError(
            f"tensor_parallel={tensor_parallel} x replicas={replicas} needs {needed} devices; "
            f"JAX sees {len(devices)} ({devices[0].platform}). On CPU, "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={needed} makes more."
        )
    return [devices[r * tensor_parallel : (r + 1) * tensor_parallel] for r in range(replicas)]


def make_mesh(devices: Sequence) -> Mesh:
    return Mesh(np.asarray(list(devices)), (AXIS,))


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """How the heads of a model are laid out over `tp` devices."""

    tp: int
    kv_repeat: int  # copies of each KV head (replication)
    num_kv_heads: int  # after replication or padding
    num_heads: int  # after padding
    intermediate_size: int  # after padding
    shard_width: bool  # embedding / LM head split over the model width
    moe_intermediate_size: int = 0  # each expert's, after padding
    shared_expert_intermediate_size: int = 0  # after padding


def head_layout(config: ModelConfig, tp: int) -> HeadLayout:
    kvh, h, group = config.num_kv_heads, config.num_heads, config.num_queries_per_kv
    repeat = 1
    if kvh % tp == 0:
        new_kvh = kvh
    elif tp % kvh == 0 and group % (tp // kvh) == 0:
        repeat, new_kvh = tp // kvh, tp
    else:
        new_kvh = -(-kvh // tp) * tp
    new_h = h if repeat > 1 else new_kvh * group
    return HeadLayout(
        tp,
        repeat,
        new_kvh,
        new_h,
        _round_up(config.intermediate_size, tp),
        config.hidden_size % tp == 0,
        _round_up(config.moe_intermediate_size, tp),
        _round_up(config.shared_expert_intermediate_size, tp),
    )


def _round_up(n: int, tp: int) -> int:
    return -(-n // tp) * tp


def shard_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The (possibly padded) shape the device program runs for `tp` devices."""
    layout = head_layout(config, tp)
    return dataclasses.replace(
        config,
        num_heads=layout.num_heads,
        num_kv_heads=layout.num_kv_heads,
        intermediate_size=layout.intermediate_size,
        moe_intermediate_size=layout.moe_intermediate_size,
        shared_expert_intermediate_size=layout.shared_expert_intermediate_size,
    )


def _pad_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return np.pad(x, pad)


def _kv_heads(x: np.ndarray, axis: int, layout: HeadLayout) -> np.ndarray:
    if layout.kv_repeat > 1:
        return np.repeat(x, layout.kv_repeat, axis=axis)
    return _pad_axis(x, axis, layout.num_kv_heads)


# Leaf name -> (axis split over "tp", how to reshape it for the layout). Axes count the stacked layer
# axis of the scanned layers; names not listed are replicated.
_LAYER_RULES = {
    "wq": (2, lambda x, lay: _pad_axis(x, 2, lay.num_heads)),
    "bq": (1, lambda x, lay: _pad_axis(x, 1, lay.num_heads)),
    "wk": (2, lambda x, lay: _kv_heads(x, 2, lay)),
    "wv": (2, lambda x, lay: _kv_heads(x, 2, lay)),
    "bk": (1, lambda x, lay: _kv_heads(x, 1, lay)),
    "bv": (1, lambda x, lay: _kv_heads(x, 1, lay)),
    "wo": (1, lambda x, lay: _pad_axis(x, 1, lay.num_heads)),
    "w_gate": (2, lambda x, lay: _pad_axis(x, 2, lay.intermediate_size)),
    "w_up": (2, lambda x, lay: _pad_axis(x, 2, lay.intermediate_size)),
    "b_gate": (1, lambda x, lay: _pad_axis(x, 1, lay.intermediate_size)),
    "b_up": (1, lambda x, lay: _pad_axis(x, 1, lay.intermediate_size)),
    "w_down": (1, lambda x, lay: _pad_axis(x, 1, lay.intermediate_size)),
    # Fused by `fuse_projections` after padding: their shard axis is split, nothing is reshaped.
    "wqkv": (2, None),
    "bqkv": (1, None),
    "w_gate_up": (2, None),
    "b_gate_up": (1, None),
    # Experts [layers, experts, in, out]: each expert's intermediate axis is split, like the MLP's.
    "moe/w_gate": (3, lambda x, lay: _pad_axis(x, 3, lay.moe_intermediate_size)),
    "moe/w_up": (3, lambda x, lay: _pad_axis(x, 3, lay.moe_intermediate_size)),
    "moe/w_down": (2, lambda x, lay: _pad_axis(x, 2, lay.moe_intermediate_size)),
    "moe/shared/w_gate": (2, lambda x, lay: _pad_axis(x, 2, lay.shared_expert_intermediate_size)),
    "moe/shared/w_up": (2, lambda x, lay: _pad_axis(x, 2, lay.shared_expert_intermediate_size)),
    "moe/shared/w_down": (1, lambda x, lay: _pad_axis(x, 1, lay.shared_expert_intermediate_size)),
    # Weight-only int8 (`fastgen_jax.quantize`), made from the padded and fused weights above: w_int8
    # [layers, N, K] and w_scale [layers, N]. The shard axis is the outermost factor of the flattened N
    # (wqkv, w_gate_up, the unfused q/k/v and gate/up) or K (wo's heads, w_down's rows), so splitting
    # that axis gives each device the rows the float weights' split gives it. wo and w_down's scales
    # (their N is the model width) are replicated.
    **{f"{name}_int8": (1, None) for name in ("wqkv", "wq", "wk", "wv", "w_gate_up", "w_gate", "w_up")},
    **{f"{name}_scale": (1, None) for name in ("wqkv", "wq", "wk", "wv", "w_gate_up", "w_gate", "w_up")},
    "wo_int8": (2, None),
    "w_down_int8": (2, None),
}
_WIDTH_SPLIT = ("embed", "lm_head", "lm_head_int8")  # [vocab, hidden], split over hidden


def _leaf_name(path) -> str:
    """The leaf's name for the rules above: its own name, or "moe/[shared/]name" inside a MoE block."""
    keys = [str(getattr(p, "key", p)) for p in path]
    if "moe" in keys:
        return "/".join(keys[keys.index("moe") :])
    return keys[-1]


def _spec(name: str, ndim: int, layout: HeadLayout) -> P:
    if name in _LAYER_RULES:
        axis = _LAYER_RULES[name][0]
    elif name in _WIDTH_SPLIT and layout.shard_width:
        axis = 1
    else:
        return P()
    return P(*[AXIS if i == axis else None for i in range(ndim)])


def leaf_sharding(name: str, ndim: int, config: ModelConfig, mesh: Mesh) -> NamedSharding:
    """Where a leaf named `name` (as `_leaf_name` gives it) with `ndim` axes lives over `mesh`."""
    return NamedSharding(mesh, _spec(name, ndim, head_layout(config, mesh.size)))


def param_shardings(params, config: ModelConfig, mesh: Mesh):
    """A pytree of NamedShardings matching `params` (already in the padded layout)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: leaf_sharding(_leaf_name(path), np.ndim(x), config, mesh), params
    )


def shard_params(params, config: ModelConfig, mesh: Mesh, dtype):
    """`params` of `config`, padded to `shard_config(config, mesh.size)`, with their projections
    fused (`fuse_projections`), and placed over `mesh`.

    With one device nothing is padded; the arrays are only cast, fused and put on it. A numpy leaf
    that already has `dtype` is not copied first, and on the CPU `jax.device_put` may alias it rather
    than copy it: the caller must not modify `params` in place afterwards (nothing here does)."""
    layout = head_layout(config, mesh.size)

    def transform(path, x):
        name = _leaf_name(path)
        if mesh.size > 1 and _LAYER_RULES.get(name, (0, None))[1] is not None:
            x = _LAYER_RULES[name][1](np.asarray(x), layout)
        return x.astype(dtype, copy=False) if isinstance(x, np.ndarray) else jax.numpy.asarray(x, dtype)

    padded = fuse_projections(jax.tree_util.tree_map_with_path(transform, params), mesh.size)
    return jax.device_put(padded, param_shardings(padded, config, mesh))


# Groups fused by `fuse_projections`: the fused leaf's name and the leaves it replaces, in order.
_FUSED_GROUPS = (("wqkv", ("wq", "wk", "wv")), ("bqkv", ("bq", "bk", "bv")))
_FUSED_PAIRS = (("w_gate_up", ("w_gate", "w_up")), ("b_gate_up", ("b_gate", "b_up")))


def _xp(x):
    return np if isinstance(x, np.ndarray) else jax.numpy


def _fuse_heads(parts, tp: int):
    """q/k/v [..., heads_i, head_dim] (stacked layers first) -> [..., tp, sum(heads_i) / tp, head_dim]."""
    split = [x.reshape(*x.shape[:-2], tp, x.shape[-2] // tp, x.shape[-1]) for x in parts]
    return _xp(parts[0]).concatenate(split, axis=-2)


def _fuse_columns(parts, tp: int):
    """gate/up [..., f] -> [..., tp, 2, f / tp]: each shard's gate columns, then its up columns."""
    split = [x.reshape(*x.shape[:-1], tp, 1, x.shape[-1] // tp) for x in parts]
    return _xp(parts[0]).concatenate(split, axis=-2)


def fuse_projections(params, tp: int):
    """`params` (a nested dict, already padded for `tp` devices) with every attention block's
    wq/wk/wv (and bq/bk/bv) concatenated into wqkv (bqkv), and every dense MLP's w_gate/w_up (and
    b_gate/b_up) into w_gate_up (b_gate_up), in the per-shard layout the module docstring gives.
    Mixture-of-experts blocks are left as they are."""
    if not isinstance(params, dict):
        return params
    out = {k: v if k == "moe" else fuse_projections(v, tp) for k, v in params.items()}
    for fused, names in _FUSED_GROUPS:
        if all(n in out for n in names):
            out[fused] = _fuse_heads([out.pop(n) for n in names], tp)
    for fused, names in _FUSED_PAIRS:
        if all(n in out for n in names):
            out[fused] = _fuse_columns([out.pop(n) for n in names], tp)
    return out


def kv_sharding(mesh: Mesh) -> NamedSharding:
    """KV pages [num_kv_heads, pages, page_size, head_dim] are split over their heads."""
    return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def bytes_per_device(tree) -> dict[str, int]:
    """Bytes each device holds of the arrays in `tree` (a sharded array counts its local shard)."""
    out: dict[str, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            key = str(shard.device)
            out[key] = out.get(key, 0) + shard.data.nbytes
    return out
