"""GGUF files (llama.cpp's format) of the families llama.cpp names `llama` (Llama, Mistral, Mixtral),
`qwen2`, `qwen3`, `qwen2moe` and `qwen3moe`: the config rebuilt from metadata, tensors dequantized by
the `gguf` package and renamed to their Hugging Face names, so `hf_tensors_to_params` does the rest.

Two things llama.cpp's converter changes that we undo: for the `llama` architecture it permutes the
q/k projection rows for its interleaved RoPE (back to Hugging Face's half split here), and it stacks
each layer's experts into one `ffn_{gate,up,down}_exps` tensor (split back into experts here; the
older per-expert `ffn_gate.<e>` tensors of early Mixtral files are read too).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from fastgen_jax.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from fastgen_jax.tokenizer import Tokenizer
from fastgen_jax.checkpoints.common import CheckpointError
from fastgen_jax.checkpoints.hf import hf_tensors_to_params

# GGUF tensor names (llama.cpp) -> Hugging Face names, per layer and global. "{moe}" is the MoE
# block's prefix (Mixtral's block_sparse_moe, Qwen's mlp).
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "{moe}.gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Stacked expert tensors -> each expert's projection name in Mixtral and in Qwen MoE checkpoints.
_GGUF_EXPERT_NAMES = {"gate": ("w1", "gate_proj"), "up": ("w3", "up_proj"), "down": ("w2", "down_proj")}
_EXPERT_TENSOR = re.compile(r"ffn_(gate|up|down)(?:_exps|\.(\d+))\.weight")
# general.architecture -> (Hugging Face architecture without experts, with experts)
_GGUF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "MixtralForCausalLM"),
    "qwen2": ("Qwen2ForCausalLM", None),
    "qwen3": ("Qwen3ForCausalLM", None),
    "qwen2moe": (None, "Qwen2MoeForCausalLM"),
    "qwen3moe": (None, "Qwen3MoeForCausalLM"),
}
# Whether the chosen experts' router weights are renormalised, as llama.cpp's graph for the
# architecture does when the file lacks `<arch>.expert_weights_norm`.
_NORM_TOPK_PROB = {"llama": True, "qwen2moe": False, "qwen3moe": True}
_REQUIRED_KEYS = ("embedding_length", "feed_forward_length", "block_count", "attention.head_count")


def _gguf_field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _open_gguf(path: str | os.PathLike):
    import gguf

    if not os.path.isfile(path):
        raise CheckpointError(f"no GGUF file at {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueErrors / struct errors on bad files
        raise CheckpointError(f"{path} is not a readable GGUF file: {e}") from None


def gguf_config(reader, path: str = "gguf") -> ModelConfig:
    """ModelConfig from GGUF metadata (llama.cpp's `<arch>.*` keys), read as the config.json they
    were converted from so each family's rules (`hf_config`) apply unchanged."""
    arch = _gguf_field(reader, "general.architecture")
    if arch not in _GGUF_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(_GGUF_ARCHITECTURES)})"
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise CheckpointError(
            f"{path}: GGUF RoPE frequency tensors (Llama 3.1 scaling) are not "
            "supported; load the Hugging Face directory instead"
        )
    for key in _REQUIRED_KEYS:
        if _gguf_field(reader, f"{arch}.{key}") is None:
            raise CheckpointError(f"{path}: GGUF metadata incomplete: no {arch}.{key}")
    try:
        return ModelConfig.from_hf_dict(_config_json(reader, arch, names, path))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _config_json(reader, arch: str, names: set[str], path: str) -> dict[str, Any]:
    """The Hugging Face config.json fields that GGUF metadata holds."""

    def meta(key: str, default: Any = None) -> Any:
        return _gguf_field(reader, f"{arch}.{key}", default)

    heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    num_experts = int(meta("expert_count", 0) or 0)
    architecture = _GGUF_ARCHITECTURES[arch][1 if num_experts else 0]
    if architecture is None:
        kind = "an expert_count" if num_experts else f"no {arch}.expert_count"
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} with {kind} is not a model we know")
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    d = {
        "architectures": [architecture],
        "vocab_size": int(meta("vocab_size", len(_gguf_field(reader, "tokenizer.ggml.tokens") or []))),
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": int(meta("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta, path),
        "max_position_embeddings": int(meta("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": None if eos is None else int(eos),
    }
    if num_experts:
        d.update(
            num_local_experts=num_experts,
            num_experts=num_experts,
            num_experts_per_tok=int(meta("expert_used_count", 0)),
            moe_intermediate_size=int(meta("expert_feed_forward_length") or d["intermediate_size"]),
            shared_expert_intermediate_size=int(meta("expert_shared_feed_forward_length", 0)),
            norm_topk_prob=bool(meta("expert_weights_norm", _NORM_TOPK_PROB[arch])),
        )
    return d


def _rope_scaling(meta, path: str) -> dict[str, Any] | None:
    kind = meta("rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(meta("rope.scaling.factor"))}
    raise CheckpointError(f"{path}: unsupported GGUF rope.scaling.type {kind!r} (supported: none, linear)")


def _unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (interleaved RoPE back to Hugging Face's half split)."""
    out_dim = w.shape[0]
    return w.reshape(num_heads, out_dim // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor, path: str) -> np.ndarray:
    import gguf

    try:
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    except (NotImplementedError, ValueError, KeyError) as e:
        kind = getattr(tensor.tensor_type, "name", tensor.tensor_type)
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} uses the unsupported GGUF quantization type {kind} ({e})"
        ) from None


def _gguf_hf_tensors(reader, config: ModelConfig, path: str) -> Iterator[tuple[str, np.ndarray]]:
    permute = config.architecture in ("LlamaForCausalLM", "MixtralForCausalLM")
    mixtral = config.architecture == "MixtralForCausalLM"
    moe = "block_sparse_moe" if mixtral else "mlp"
    for tensor in reader.tensors:
        name = tensor.name
        if name in _GGUF_GLOBAL_NAMES:
            yield _GGUF_GLOBAL_NAMES[name], _dequantize(tensor, path)
            continue
        prefix, _, rest = name.partition(".")
        layer, _, suffix = rest.partition(".")
        expert = _EXPERT_TENSOR.fullmatch(suffix) if config.num_experts else None
        if prefix != "blk" or (expert is None and suffix not in _GGUF_LAYER_NAMES):
            raise CheckpointError(f"{path}: unexpected GGUF tensor {name!r}")
        w = _dequantize(tensor, path)
        if expert is not None:
            yield from _experts(w, f"model.layers.{layer}.{moe}.experts", expert, mixtral)
            continue
        if permute and suffix in ("attn_q.weight", "attn_q.bias"):
            w = _unpermute_rope_rows(w, config.num_heads)
        elif permute and suffix in ("attn_k.weight", "attn_k.bias"):
            w = _unpermute_rope_rows(w, config.num_kv_heads)
        elif suffix == "ffn_gate_inp_shexp.weight":  # llama.cpp may store the [1, hidden] gate as 1-D
            w = w.reshape(1, -1)
        yield f"model.layers.{layer}.{_GGUF_LAYER_NAMES[suffix].format(moe=moe)}", w


def _experts(w: np.ndarray, prefix: str, match: re.Match, mixtral: bool) -> Iterator[tuple[str, np.ndarray]]:
    """One layer's expert projections under their Hugging Face names: a stacked `ffn_*_exps`
    tensor (f32[experts, out, in]) split into experts, or one expert's own tensor."""
    projection, index = match.groups()
    theirs = _GGUF_EXPERT_NAMES[projection][0 if mixtral else 1]
    if index is not None:
        yield f"{prefix}.{index}.{theirs}.weight", w
        return
    for e, one in enumerate(w):
        yield f"{prefix}.{e}.{theirs}.weight", one


def load_gguf(path: str | os.PathLike, dtype=np.float32) -> tuple[ModelConfig, Any, Tokenizer]:
    """Reads, dequantizes and converts a GGUF file: (config, params, tokenizer)."""
    path = str(path)
    reader = _open_gguf(path)
    config = gguf_config(reader, path)
    tensors = dict(_gguf_hf_tensors(reader, config, path))
    params = hf_tensors_to_params(config, tensors, dtype, source=path)
    from fastgen_jax.tokenizer import Tokenizer

    return config, params, Tokenizer.from_gguf(reader)
