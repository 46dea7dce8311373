"""Where each family keeps its weights in a Hugging Face checkpoint, and how they become ours.

`global_names(config)` names the tensors outside the layers. `layer_specs(config)` maps a path in our
per-layer parameter tree (under params/layers) to a function that reads one layer's array from the
checkpoint: `get(suffix)` returns the float32 tensor `<layer prefix>.<i>.<suffix>`. Our layouts:
projections are [in, heads, head_dim] / [heads, head_dim, out], MLP weights [in, out], expert weights
[experts, in, out]; fused checkpoint tensors (Phi-3's qkv and gate-up, Falcon's query_key_value) are
split here, so the model never sees them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fastgen_jax.config import ModelConfig
from fastgen_jax.hf_config import ARCHITECTURES

Get = Callable[[str], np.ndarray]
Spec = Callable[[Get], np.ndarray]


_LLAMA_GLOBALS = {
    "layers": "model.layers",
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm",
    "lm_head": "lm_head.weight",
}
_GLOBALS = {
    "falcon": {
        "layers": "transformer.h",
        "embed": "transformer.word_embeddings.weight",
        "final_norm": "transformer.ln_f",
        "lm_head": "lm_head.weight",
    },
    "opt": {
        "layers": "model.decoder.layers",
        "embed": "model.decoder.embed_tokens.weight",
        "final_norm": "model.decoder.final_layer_norm",
        "lm_head": "lm_head.weight",
        "pos_embed": "model.decoder.embed_positions.weight",
    },
}


def global_names(c: ModelConfig) -> dict[str, str]:
    """Checkpoint names of the layer prefix, embedding, final norm (without .weight), LM head and (OPT)
    the position table."""
    return _GLOBALS.get(ARCHITECTURES[c.architecture][1], _LLAMA_GLOBALS)


def layer_specs(c: ModelConfig) -> dict[tuple[str, ...], Spec]:
    model_type = ARCHITECTURES[c.architecture][1]
    if model_type in _OWN_LAYOUTS:
        return _OWN_LAYOUTS[model_type](c)
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


def _layer_norm(ours: str, theirs: str) -> dict[tuple[str, ...], Spec]:
    return {(ours, "scale"): _named(f"{theirs}.weight"), (ours, "bias"): _named(f"{theirs}.bias")}


def _linear(ours: tuple[str, str], theirs: str, bias: bool) -> dict[tuple[str, ...], Spec]:
    """A [out, in] Linear as our [in, out] weight `w_<name>` (+ bias `b_<name>`)."""
    group, name = ours
    specs = {(group, f"w_{name}"): _transposed(f"{theirs}.weight")}
    if bias:
        specs[(group, f"b_{name}")] = _named(f"{theirs}.bias")
    return specs


def _opt_layout(c: ModelConfig) -> dict[tuple[str, ...], Spec]:
    h, d, hid, bias = c.num_heads, c.head_dim, c.hidden_size, c.attention_bias
    specs = {
        **_layer_norm("attn_norm", "self_attn_layer_norm"),
        **_layer_norm("mlp_norm", "final_layer_norm"),
    }
    for name in ("q", "k", "v"):
        specs[("attn", f"w{name}")] = _projection(f"self_attn.{name}_proj.weight", h, d, hid)
        if bias:
            specs[("attn", f"b{name}")] = _bias(f"self_attn.{name}_proj.bias", h, d)
    specs[("attn", "wo")] = lambda get: get("self_attn.out_proj.weight").T.reshape(h, d, hid)
    if c.attn_out_bias:
        specs[("attn", "bo")] = _named("self_attn.out_proj.bias")
    specs.update(_linear(("mlp", "up"), "fc1", c.mlp_bias))
    specs.update(_linear(("mlp", "down"), "fc2", c.mlp_bias))
    return specs


def _falcon_layout(c: ModelConfig) -> dict[tuple[str, ...], Spec]:
    h, d, hid = c.num_heads, c.head_dim, c.hidden_size
    if c.parallel_norms == 2:
        specs = {**_layer_norm("attn_norm", "ln_attn"), **_layer_norm("mlp_norm", "ln_mlp")}
    else:
        specs = _layer_norm("attn_norm", "input_layernorm")
        if not c.parallel_attn:
            specs.update(_layer_norm("mlp_norm", "post_attention_layernorm"))
    for name in ("q", "k", "v"):
        specs[("attn", f"w{name}")] = _falcon_qkv(name, c, "weight")
        if c.attention_bias:
            specs[("attn", f"b{name}")] = _falcon_qkv(name, c, "bias")
    specs[("attn", "wo")] = lambda get: get("self_attention.dense.weight").T.reshape(h, d, hid)
    if c.attn_out_bias:
        specs[("attn", "bo")] = _named("self_attention.dense.bias")
    specs.update(_linear(("mlp", "up"), "mlp.dense_h_to_4h", c.mlp_bias))
    specs.update(_linear(("mlp", "down"), "mlp.dense_4h_to_h", c.mlp_bias))
    return specs


def _falcon_qkv(name: str, c: ModelConfig, kind: str) -> Spec:
    """One of q/k/v out of Falcon's fused query_key_value rows, laid out per KV group as [its query
    heads, k, v] (new decoder architecture and multi-query alike: one group), or per head as [q, k,
    v] when every head has its own K/V (without multi_query)."""
    h, kvh, d, group = c.num_heads, c.num_kv_heads, c.head_dim, c.num_queries_per_kv

    def read(get):
        w = get(f"self_attention.query_key_value.{kind}")  # [rows, hidden] or [rows]
        tail = w.shape[1:]
        if kvh == h and h > 1:
            per_head = w.reshape(h, 3, d, *tail)[:, "qkv".index(name)]  # [h, d, ...]
        else:
            grouped = w.reshape(kvh, group + 2, d, *tail)
            part = {"q": grouped[:, :group], "k": grouped[:, group : group + 1], "v": grouped[:, group + 1 :]}
            per_head = part[name].reshape(-1, d, *tail)
        if kind == "bias":
            return per_head  # [heads, d]
        return per_head.transpose(2, 0, 1)  # [hidden, heads, d]

    return read


_OWN_LAYOUTS = {"opt": _opt_layout, "falcon": _falcon_layout}
