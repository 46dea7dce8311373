"""Hugging Face model directories: safetensors (bf16 included) read without torch, and the mapping from
Hugging Face tensor names and layouts to our stacked parameter pytree."""

from __future__ import annotations

import json
import os
import pathlib
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from fastgen_jax.checkpoints.common import CheckpointError, load_config
from fastgen_jax.checkpoints.hf_layouts import global_names, layer_specs
from fastgen_jax.config import ModelConfig

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
    """Memory-maps every tensor of a .safetensors file (bf16 included, which numpy lacks). A header
    that does not describe the file (offsets out of range, a shape that does not fit its bytes, a
    field missing) is a CheckpointError naming the tensor."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a readable safetensors file: its header is not an object")
    return {name: _tensor(data, name, info, path) for name, info in header.items() if name != "__metadata__"}


def _tensor(data: np.ndarray, name: str, info: Any, path) -> np.ndarray:
    try:
        start, end = (int(x) for x in info["data_offsets"])
        dtype = _np_dtype(info["dtype"])
        shape = tuple(int(d) for d in info["shape"])
        if not 0 <= start <= end <= data.shape[0]:
            raise ValueError(f"data_offsets [{start}, {end}) outside the {data.shape[0]} data bytes")
        return data[start:end].view(dtype).reshape(shape)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: tensor {name!r} is malformed: {e}") from None


def _safetensors_files(model_dir: pathlib.Path) -> list[pathlib.Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is corrupt: {e}") from None
        return [_inside(model_dir, name, index) for name in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {model_dir}")
    return files


def _inside(model_dir: pathlib.Path, name: Any, index: pathlib.Path) -> pathlib.Path:
    """A weight_map entry as a path; it must name a file inside the model directory."""
    root = model_dir.resolve()
    if not isinstance(name, str) or not (root / name).resolve().is_relative_to(root):
        raise CheckpointError(f"{index}: weight_map entry {name!r} points outside {model_dir}")
    return model_dir / name


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
    """Converts a Hugging Face checkpoint's tensors into our stacked pytree (see `hf_layouts`)."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for astype)

    dtype = np.dtype(dtype)
    names = global_names(c)
    embed = _get(tensors, names["embed"], source)
    _check_shape(names["embed"], embed, (c.vocab_size, c.hidden_size), source)
    layers: dict[str, Any] = {}
    for path, read in layer_specs(c).items():
        per_layer = [
            read(_layer_getter(tensors, f"{names['layers']}.{i}", source)) for i in range(c.num_layers)
        ]
        node = layers
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.stack(per_layer).astype(dtype)
    params = {"embed": np.asarray(embed).astype(dtype), "layers": layers, "final_norm": {}}
    params["final_norm"]["scale"] = np.asarray(_get(tensors, names["final_norm"] + ".weight", source)).astype(
        dtype
    )
    if c.norm_kind == "layer":
        params["final_norm"]["bias"] = np.asarray(
            _get(tensors, names["final_norm"] + ".bias", source)
        ).astype(dtype)
    if c.position_embedding == "learned":
        table = _get(tensors, names["pos_embed"], source)
        rows = c.max_position_embeddings + c.learned_pos_offset
        _check_shape(names["pos_embed"], table, (rows, c.hidden_size), source)
        params["pos_embed"] = np.asarray(table).astype(dtype)
    if not c.tie_word_embeddings:
        lm_head = _get(tensors, names["lm_head"], source)
        _check_shape(names["lm_head"], lm_head, (c.vocab_size, c.hidden_size), source)
        params["lm_head"] = np.asarray(lm_head).astype(dtype)
    _check_layer_shapes(c, layers, source)
    return {"params": params}


def _layer_getter(tensors: Mapping[str, np.ndarray], prefix: str, source: str):
    def get(suffix: str) -> np.ndarray:
        return np.asarray(_get(tensors, f"{prefix}.{suffix}", source), np.float32)

    return get


def _check_layer_shapes(c: ModelConfig, layers: dict[str, Any], source: str):
    n, hid = c.num_layers, c.hidden_size
    expected = {
        ("attn", "wq"): (n, hid, c.num_heads, c.head_dim),
        ("attn", "wk"): (n, hid, c.num_kv_heads, c.head_dim),
        ("attn", "wo"): (n, c.num_heads, c.head_dim, hid),
        ("attn_norm", "scale"): (n, hid),
    }
    if c.num_experts:
        e, f = c.num_experts, c.moe_intermediate_size
        expected[("moe", "w_gate")] = (n, e, hid, f)
        expected[("moe", "w_down")] = (n, e, f, hid)
    else:
        expected[("mlp", "w_up")] = (n, hid, c.intermediate_size)
        expected[("mlp", "w_down")] = (n, c.intermediate_size, hid)
    for (group, name), shape in expected.items():
        _check_shape(f"{group}/{name}", layers[group][name], shape, source)


def load_hf_dir(model_dir: str | os.PathLike, dtype=np.float32) -> tuple[ModelConfig, Any]:
    model_dir = pathlib.Path(model_dir)
    config = load_config(model_dir)
    tensors: dict[str, np.ndarray] = {}
    for file in _safetensors_files(model_dir):
        tensors.update(read_safetensors(file))
    return config, hf_tensors_to_params(config, tensors, dtype, source=str(model_dir))
