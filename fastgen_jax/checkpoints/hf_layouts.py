"""Where each family keeps its weights in a Hugging Face checkpoint, and how they become ours.

`layer_specs(config)` maps a path in our per-layer parameter tree (under params/layers) to a function
that reads one layer's array from the checkpoint: `get(suffix)` returns the float32 tensor
`model.layers.<i>.<suffix>`. Our layouts: projections are [in, heads, head_dim] / [heads, head_dim,
out], MLP weights [in, out], expert weights [experts, in, out]; fused checkpoint tensors (Phi-3's
qkv and gate-up) are split here, so the model never sees them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fastgen_jax.config import ModelConfig
from fastgen_jax.hf_config import ARCHITECTURES

Get = Callable[[str], np.ndarray]
Spec = Callable[[Get], np.ndarray]


def layer_specs(c: ModelConfig) -> dict[tuple[str, ...], Spec]:
    model_type = ARCHITECTURES[c.architecture][1]
    specs = {**_norms(c, model_type), **_attention(c, model_type)}
    if c.num_experts:
        specs.update(_experts(c, model_type))
    elif model_type == "phi3":
        specs.update(_phi3_mlp(c))
    else:
        specs.update(_mlp(c, ("mlp",), "mlp"))
    return specs


def _norms(c: ModelConfig, model_type: str) -> dict[tuple[str, ...], Spec]:
    specs = {("attn_norm", "scale"): _named("input_layernorm.weight")}
    if c.post_norms:  # Gemma: post_attention_layernorm follows attention, pre_feedforward precedes the MLP
        specs[("post_attn_norm", "scale")] = _named("post_attention_layernorm.weight")
        specs[("mlp_norm", "scale")] = _named("pre_feedforward_layernorm.weight")
        specs[("post_mlp_norm", "scale")] = _named("post_feedforward_layernorm.weight")
    else:
        specs[("mlp_norm", "scale")] = _named("post_attention_layernorm.weight")
    if c.qk_norm:
        specs[("attn", "q_norm", "scale")] = _named("self_attn.q_norm.weight")
        specs[("attn", "k_norm", "scale")] = _named("self_attn.k_norm.weight")
    return specs


def _attention(c: ModelConfig, model_type: str) -> dict[tuple[str, ...], Spec]:
    h, kvh, d, hid = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size
    heads = {"q": h, "k": kvh, "v": kvh}
    specs: dict[tuple[str, ...], Spec] = {
        ("attn", "wo"): lambda get: get("self_attn.o_proj.weight").T.reshape(h, d, hid)
    }
    for name, n in heads.items():
        if model_type == "phi3":  # one [(h + 2 kvh) * d, hidden] tensor, q then k then v
            start = {"q": 0, "k": h * d, "v": (h + kvh) * d}[name]
            specs[("attn", f"w{name}")] = _qkv_slice(start, n, d, hid)
        else:
            specs[("attn", f"w{name}")] = _projection(f"self_attn.{name}_proj.weight", n, d, hid)
        if c.attention_bias:
            specs[("attn", f"b{name}")] = _bias(f"self_attn.{name}_proj.bias", n, d)
    return specs


def _projection(name: str, heads: int, head_dim: int, hidden: int) -> Spec:
    return lambda get: get(name).T.reshape(hidden, heads, head_dim)


def _bias(name: str, heads: int, head_dim: int) -> Spec:
    return lambda get: get(name).reshape(heads, head_dim)


def _qkv_slice(start: int, heads: int, head_dim: int, hidden: int) -> Spec:
    rows = heads * head_dim
    return lambda get: get("self_attn.qkv_proj.weight")[start : start + rows].T.reshape(
        hidden, heads, head_dim
    )


def _named(name: str) -> Spec:
    return lambda get: get(name)


def _transposed(name: str) -> Spec:
    return lambda get: get(name).T


def _mlp(c: ModelConfig, path: tuple[str, ...], prefix: str) -> dict[tuple[str, ...], Spec]:
    return {
        (*path, "w_gate"): _transposed(f"{prefix}.gate_proj.weight"),
        (*path, "w_up"): _transposed(f"{prefix}.up_proj.weight"),
        (*path, "w_down"): _transposed(f"{prefix}.down_proj.weight"),
    }


def _phi3_mlp(c: ModelConfig) -> dict[tuple[str, ...], Spec]:
    f = c.intermediate_size  # gate_up_proj is [2f, hidden]: gate rows first, then up
    return {
        ("mlp", "w_gate"): lambda get: get("mlp.gate_up_proj.weight")[:f].T,
        ("mlp", "w_up"): lambda get: get("mlp.gate_up_proj.weight")[f:].T,
        ("mlp", "w_down"): _transposed("mlp.down_proj.weight"),
    }


def _experts(c: ModelConfig, model_type: str) -> dict[tuple[str, ...], Spec]:
    if model_type == "mixtral":
        prefix, names = "block_sparse_moe", {"w_gate": "w1", "w_up": "w3", "w_down": "w2"}
    else:
        prefix, names = "mlp", {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}

    def stacked(theirs: str) -> Spec:
        return lambda get: np.stack(
            [get(f"{prefix}.experts.{e}.{theirs}.weight").T for e in range(c.num_experts)]
        )

    specs = {("moe", ours): stacked(theirs) for ours, theirs in names.items()}
    specs[("moe", "router")] = _transposed(f"{prefix}.gate.weight")
    if c.shared_expert_intermediate_size:
        specs.update(_mlp(c, ("moe", "shared"), "mlp.shared_expert"))
        specs[("moe", "shared_gate")] = _transposed("mlp.shared_expert_gate.weight")
    return specs
