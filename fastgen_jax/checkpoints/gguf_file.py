"""GGUF files of Llama-architecture models: config from metadata, dequantized tensors, and llama.cpp's
q/k row permutation undone (interleaved RoPE back to Hugging Face's half split)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from fastgen_jax.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from fastgen_jax.tokenizer import Tokenizer
from fastgen_jax.checkpoints.common import CheckpointError
from fastgen_jax.checkpoints.hf import hf_tensors_to_params

# GGUF tensor names (llama.cpp) -> Hugging Face names, per layer and global.
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
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


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
    """ModelConfig from GGUF metadata (llama.cpp's `<arch>.*` keys)."""
    arch = _gguf_field(reader, "general.architecture")
    if arch not in _GGUF_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(_GGUF_ARCHITECTURES)})"
        )
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise CheckpointError(
            f"{path}: GGUF RoPE frequency tensors (Llama 3.1 scaling) are not "
            "supported; load the Hugging Face directory instead"
        )
    names = {t.name for t in reader.tensors}
    heads = int(_gguf_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_gguf_field(reader, f"{arch}.embedding_length"))
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens") or []
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    try:
        return ModelConfig(
            architecture=_GGUF_ARCHITECTURES[arch],
            vocab_size=int(_gguf_field(reader, f"{arch}.vocab_size", len(tokens))),
            hidden_size=hidden,
            intermediate_size=int(_gguf_field(reader, f"{arch}.feed_forward_length")),
            num_layers=int(_gguf_field(reader, f"{arch}.block_count")),
            num_heads=heads,
            num_kv_heads=int(_gguf_field(reader, f"{arch}.attention.head_count_kv", heads)),
            head_dim=int(_gguf_field(reader, f"{arch}.attention.key_length", hidden // heads)),
            rms_norm_eps=float(_gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
            rope_theta=float(_gguf_field(reader, f"{arch}.rope.freq_base", 10000.0)),
            max_position_embeddings=int(_gguf_field(reader, f"{arch}.context_length", 4096)),
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
        )
    except TypeError as e:  # a required key was missing (int(None))
        raise CheckpointError(f"{path}: GGUF metadata incomplete: {e}") from None
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


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
    permute = config.architecture == "LlamaForCausalLM"
    for tensor in reader.tensors:
        name = tensor.name
        if name in _GGUF_GLOBAL_NAMES:
            yield _GGUF_GLOBAL_NAMES[name], _dequantize(tensor, path)
            continue
        prefix, _, rest = name.partition(".")
        layer, _, suffix = rest.partition(".")
        if prefix != "blk" or suffix not in _GGUF_LAYER_NAMES:
            raise CheckpointError(f"{path}: unexpected GGUF tensor {name!r}")
        w = _dequantize(tensor, path)
        if permute and suffix in ("attn_q.weight", "attn_q.bias"):
            w = _unpermute_rope_rows(w, config.num_heads)
        elif permute and suffix in ("attn_k.weight", "attn_k.bias"):
            w = _unpermute_rope_rows(w, config.num_kv_heads)
        yield f"model.layers.{layer}.{_GGUF_LAYER_NAMES[suffix]}", w


def load_gguf(path: str | os.PathLike, dtype=np.float32) -> tuple[ModelConfig, Any, Tokenizer]:
    """Reads, dequantizes and converts a GGUF file: (config, params, tokenizer)."""
    path = str(path)
    reader = _open_gguf(path)
    config = gguf_config(reader, path)
    tensors = dict(_gguf_hf_tensors(reader, config, path))
    params = hf_tensors_to_params(config, tensors, dtype, source=path)
    from fastgen_jax.tokenizer import Tokenizer

    return config, params, Tokenizer.from_gguf(reader)
