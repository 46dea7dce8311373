"""Hugging Face config.json <-> ModelConfig, for every family we serve. Host side: no jax here.

`ARCHITECTURES` is the one list of what we serve: each `architectures` entry of a config.json maps to
the family module in `fastgen_jax.models` that implements it and to its `model_type`. A family's
reading rules are its entry in `_FAMILY_FIELDS` (switches the family always has) plus the optional
fields read by name below; anything a family sets that we cannot honour is a ConfigError naming it.
"""

from __future__ import annotations

import math
from typing import Any

from fastgen_jax.config import ConfigError, ModelConfig, RopeScaling

# architecture -> (family module in fastgen_jax.models, model_type)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", "llama"),
    "MistralForCausalLM": ("llama", "mistral"),
    "Qwen2ForCausalLM": ("llama", "qwen2"),
    "Qwen3ForCausalLM": ("llama", "qwen3"),
    "Phi3ForCausalLM": ("llama", "phi3"),
    "MixtralForCausalLM": ("moe", "mixtral"),
    "Qwen2MoeForCausalLM": ("moe", "qwen2_moe"),
    "Qwen3MoeForCausalLM": ("moe", "qwen3_moe"),
    "Gemma2ForCausalLM": ("gemma", "gemma2"),
    "Gemma3ForCausalLM": ("gemma", "gemma3_text"),
    "FalconForCausalLM": ("falcon", "falcon"),
    "OPTForCausalLM": ("llama", "opt"),
}
MODEL_TYPES = {model_type: arch for arch, (_, model_type) in ARCHITECTURES.items()}

_GEMMA = dict(norm_plus_one=True, post_norms=True, embed_scale=True, hidden_act="gelu_tanh")
# Switches implied by the architecture itself (not spelled out in its config.json).
_FAMILY_FIELDS: dict[str, dict[str, Any]] = {
    "qwen3": dict(qk_norm=True),
    "mixtral": dict(norm_topk_prob=True),
    "qwen2_moe": dict(norm_topk_prob=False),
    "qwen3_moe": dict(qk_norm=True, norm_topk_prob=False),
    "gemma2": _GEMMA,
    "gemma3_text": dict(_GEMMA, qk_norm=True),
    "falcon": dict(norm_kind="layer", mlp_gated=False, hidden_act="gelu"),
    "opt": dict(norm_kind="layer", mlp_gated=False, position_embedding="learned", learned_pos_offset=2),
}
# Families whose config.json names its fields otherwise: their own reader replaces _common_fields.
_OWN_READERS = {}  # filled below the readers
_DEFAULT_BIAS = ("qwen2", "qwen2_moe")  # q/k/v biases unless the config says otherwise


def family_of(architecture: str) -> str:
    return ARCHITECTURES[architecture][0]


def fields_from_hf(d: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig keyword arguments from the fields of a Hugging Face config.json."""
    architecture = _architecture_of(d)
    model_type = ARCHITECTURES[architecture][1]
    try:
        common = _OWN_READERS.get(model_type, _common_fields)
        fields = {
            **common(d, architecture, model_type),
            **_rope_fields(d, model_type),
            **_FAMILY_FIELDS.get(model_type, {}),
            **_gemma_fields(d),
            **_moe_fields(d, model_type),
        }
    except KeyError as e:
        raise ConfigError(f"config.json lacks the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config.json has a field of the wrong type: {e}") from None
    return fields


def _common_fields(d: dict[str, Any], architecture: str, model_type: str) -> dict[str, Any]:
    hidden = int(d["hidden_size"])
    heads = int(d["num_attention_heads"])
    eos = d.get("eos_token_id")
    window = d.get("sliding_window")
    if d.get("use_sliding_window") is False:  # Qwen2/3 list a window they do not use
        window = None
    layer_types = d.get("layer_types")
    bias = d.get("attention_bias", d.get("qkv_bias", model_type in _DEFAULT_BIAS))
    return dict(
        architecture=architecture,
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or hidden // heads),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", model_type.startswith("gemma"))),
        attention_bias=bool(bias),
        sliding_window=int(window) if window else None,
        layer_types=tuple(layer_types) if window and layer_types else None,
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)),
    )


def _falcon_fields(d: dict[str, Any], architecture: str, model_type: str) -> dict[str, Any]:
    """Falcon: the 7B layout (multi-query, parallel attention and MLP under one LayerNorm) and the new
    decoder architecture (grouped KV heads, a LayerNorm each); ALiBi variants are refused."""
    if d.get("alibi"):
        raise ConfigError("Falcon with alibi=true (ALiBi positions) is not supported; only rotary Falcon")
    hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
    new_arch = bool(d.get("new_decoder_architecture"))
    kv_heads = (
        int(d.get("num_kv_heads") or heads) if new_arch else (1 if d.get("multi_query", True) else heads)
    )
    parallel = new_arch or bool(d.get("parallel_attn", True))
    if new_arch and not d.get("parallel_attn", True) and d.get("num_ln_in_parallel_attn") == 1:
        raise ConfigError(
            "Falcon with new_decoder_architecture, parallel_attn=false and one norm is not supported"
        )
    bias = bool(d.get("bias", False))
    renamed = {
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "intermediate_size": int(d.get("ffn_hidden_size") or 4 * hidden),
        "sliding_window": None,
    }
    fields = _common_fields({**d, **renamed}, architecture, model_type)
    fields.update(
        rms_norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        attention_bias=bias,
        attn_out_bias=bias,
        mlp_bias=bias,
        parallel_attn=parallel,
        parallel_norms=int(d.get("num_ln_in_parallel_attn") or 2) if new_arch else 1,
    )
    return fields


def _opt_fields(d: dict[str, Any], architecture: str, model_type: str) -> dict[str, Any]:
    """OPT: learned positions (offset 2), pre-LayerNorm, ReLU, biases everywhere."""
    hidden = int(d["hidden_size"])
    if not d.get("do_layer_norm_before", True):
        raise ConfigError(
            "OPT with do_layer_norm_before=false (opt-350m's post-norm layout) is not supported"
        )
    if int(d.get("word_embed_proj_dim") or hidden) != hidden:
        raise ConfigError(
            "OPT with word_embed_proj_dim != hidden_size (projected embeddings) is not supported"
        )
    if d.get("layer_norm_elementwise_affine") is False or d.get("_remove_final_layer_norm"):
        raise ConfigError("OPT without affine LayerNorms or without its final LayerNorm is not supported")
    bias = bool(d.get("enable_bias", True))
    fields = _common_fields(
        {**d, "intermediate_size": d["ffn_dim"], "sliding_window": None}, architecture, model_type
    )
    fields.update(
        rms_norm_eps=1e-5,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        attention_bias=bias,
        attn_out_bias=bias,
        mlp_bias=bias,
    )
    act = d.get("activation_function", "relu")
    if act not in ("relu", "gelu"):
        raise ConfigError(f"unsupported OPT activation_function {act!r} (supported: relu, gelu)")
    fields["hidden_act"] = act
    return fields


_OWN_READERS.update(falcon=_falcon_fields, opt=_opt_fields)


def _rope_fields(d: dict[str, Any], model_type: str) -> dict[str, Any]:
    params = d.get("rope_parameters") or {}
    local: dict[str, Any] = {}
    if "full_attention" in params:  # transformers 5 writes Gemma 3's settings per layer type
        params, local = params["full_attention"], params.get("sliding_attention") or {}
    scaling = d.get("rope_scaling") or params
    fields = dict(
        rope_theta=float(d.get("rope_theta") or params.get("rope_theta") or 10000.0),
        rope_scaling=_rope_scaling_of(scaling, d),
        partial_rotary_factor=float(
            d.get("partial_rotary_factor") or params.get("partial_rotary_factor") or 1.0
        ),
    )
    if model_type == "gemma3_text":
        fields["rope_local_theta"] = float(
            d.get("rope_local_base_freq") or local.get("rope_theta") or 10000.0
        )
    return fields


def _rope_scaling_of(scaling: dict[str, Any], d: dict[str, Any]) -> RopeScaling | None:
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind == "llama3":
        return RopeScaling(
            kind,
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    if kind == "linear":
        return RopeScaling(kind, factor=float(scaling["factor"]))
    if kind == "longrope":
        return _longrope_of(scaling, d)
    raise ConfigError(
        f"unsupported rope_scaling type {kind!r} (supported: default, llama3, linear, longrope)"
    )


def _longrope_of(scaling: dict[str, Any], d: dict[str, Any]) -> RopeScaling:
    """Phi-3's LongRoPE, with the factor and attention factor resolved as transformers does."""
    original = int(scaling.get("original_max_position_embeddings") or d["original_max_position_embeddings"])
    factor = float(scaling.get("factor") or int(d.get("max_position_embeddings", 4096)) / original)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeScaling(
        "longrope",
        factor=factor,
        original_max_position_embeddings=original,
        short_factor=tuple(float(x) for x in scaling["short_factor"]),
        long_factor=tuple(float(x) for x in scaling["long_factor"]),
        attention_factor=float(attention_factor),
    )


def _gemma_fields(d: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for ours, theirs in (
        ("query_pre_attn_scalar", "query_pre_attn_scalar"),
        ("attn_logit_softcap", "attn_logit_softcapping"),
        ("final_logit_softcap", "final_logit_softcapping"),
    ):
        if d.get(theirs) is not None:
            fields[ours] = float(d[theirs])
    act = d.get("hidden_activation") or d.get("hidden_act")
    if act is not None and "activation_function" not in d and "activation" not in d:
        if act not in ("silu", "gelu_pytorch_tanh"):
            raise ConfigError(f"unsupported hidden_act {act!r} (supported: silu, gelu_pytorch_tanh)")
        fields["hidden_act"] = "silu" if act == "silu" else "gelu_tanh"
    return fields


def _moe_fields(d: dict[str, Any], model_type: str) -> dict[str, Any]:
    num_experts = int(d.get("num_local_experts") or d.get("num_experts") or 0)
    if not num_experts:
        return {}
    if int(d.get("decoder_sparse_step", 1)) != 1 or d.get("mlp_only_layers"):
        raise ConfigError(
            "decoder_sparse_step != 1 and mlp_only_layers (dense layers among expert layers) are "
            "not supported: every layer must be a mixture of experts"
        )
    fields = dict(
        num_experts=num_experts,
        num_experts_per_tok=int(d["num_experts_per_tok"]),
        moe_intermediate_size=int(d.get("moe_intermediate_size") or d["intermediate_size"]),
        shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0),
    )
    if model_type != "mixtral" and "norm_topk_prob" in d:
        fields["norm_topk_prob"] = bool(d["norm_topk_prob"])
    return fields


def _architecture_of(d: dict[str, Any]) -> str:
    archs = d.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return arch
    model_type = d.get("model_type")
    if not archs and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    raise ConfigError(
        f"unsupported architecture {archs or model_type!r}: fastgen-jax serves {', '.join(ARCHITECTURES)}"
    )


def hf_from_config(c: ModelConfig) -> dict[str, Any]:
    """A config.json for `c` that both `fields_from_hf` and transformers read back to the same model."""
    model_type = ARCHITECTURES[c.architecture][1]
    d: dict[str, Any] = {
        "architectures": [c.architecture],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias,
        "hidden_act": "silu" if c.hidden_act == "silu" else "gelu_pytorch_tanh",
        "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_ids) if len(c.eos_token_ids) != 1 else c.eos_token_ids[0],
    }
    if model_type.startswith("gemma"):
        d["hidden_activation"] = d["hidden_act"]
    if model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        d["use_sliding_window"] = c.sliding_window is not None
    if c.partial_rotary_factor != 1.0:
        d["partial_rotary_factor"] = c.partial_rotary_factor
    if c.rope_scaling is not None:
        d["rope_scaling"] = _hf_rope_scaling(c.rope_scaling)
        if c.rope_scaling.kind == "longrope":
            d["original_max_position_embeddings"] = c.rope_scaling.original_max_position_embeddings
    if c.rope_local_theta is not None:
        d["rope_local_base_freq"] = c.rope_local_theta
    if c.sliding_window is not None:
        d["sliding_window"] = c.sliding_window
    if c.layer_types is not None:
        d["layer_types"] = list(c.layer_types)
    for ours, theirs in (
        ("query_pre_attn_scalar", "query_pre_attn_scalar"),
        ("attn_logit_softcap", "attn_logit_softcapping"),
        ("final_logit_softcap", "final_logit_softcapping"),
    ):
        d[theirs] = getattr(c, ours)
    if c.num_experts:
        d.update(_hf_moe(c, model_type))
    if model_type == "falcon":
        d.update(_hf_falcon(c))
    if model_type == "opt":
        d.update(
            ffn_dim=c.intermediate_size,
            do_layer_norm_before=True,
            word_embed_proj_dim=c.hidden_size,
            enable_bias=c.attention_bias,
            activation_function=c.hidden_act,
        )
    return d


def _hf_falcon(c: ModelConfig) -> dict[str, Any]:
    new_arch = c.parallel_norms == 2 or c.num_kv_heads not in (1, c.num_heads)
    return dict(
        new_decoder_architecture=new_arch,
        multi_query=c.num_kv_heads == 1,
        num_kv_heads=c.num_kv_heads,
        num_ln_in_parallel_attn=c.parallel_norms if new_arch else None,
        parallel_attn=c.parallel_attn,
        bias=c.attention_bias,
        alibi=False,
        ffn_hidden_size=c.intermediate_size,
        layer_norm_epsilon=c.rms_norm_eps,
        activation=c.hidden_act,
    )


def _hf_rope_scaling(s: RopeScaling) -> dict[str, Any]:
    out = {"rope_type": s.kind, "factor": s.factor}
    if s.kind == "llama3":
        out.update(
            low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
            original_max_position_embeddings=s.original_max_position_embeddings,
        )
    if s.kind == "longrope":
        out.update(
            short_factor=list(s.short_factor),
            long_factor=list(s.long_factor),
            attention_factor=s.attention_factor,
            original_max_position_embeddings=s.original_max_position_embeddings,
        )
    return out


def _hf_moe(c: ModelConfig, model_type: str) -> dict[str, Any]:
    if model_type == "mixtral":
        return {"num_local_experts": c.num_experts, "num_experts_per_tok": c.num_experts_per_tok}
    d = {
        "num_experts": c.num_experts,
        "num_experts_per_tok": c.num_experts_per_tok,
        "moe_intermediate_size": c.moe_intermediate_size,
        "norm_topk_prob": c.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }
    if c.shared_expert_intermediate_size:
        d["shared_expert_intermediate_size"] = c.shared_expert_intermediate_size
    return d
