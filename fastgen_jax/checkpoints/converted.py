"""Our converted form (config.json, tokenizer files, orbax `params/`) and `load_checkpoint`, which takes
any of the three sources."""

from __future__ import annotations

import json
import os
import pathlib
from typing import TYPE_CHECKING, Any

from fastgen_jax.config import ModelConfig

if TYPE_CHECKING:
    from fastgen_jax.tokenizer import Tokenizer
from fastgen_jax.checkpoints.common import (
    MARKER_FILE,
    PARAMS_DIR,
    Checkpoint,
    CheckpointError,
    load_config,
)
from fastgen_jax.checkpoints.gguf_file import load_gguf
from fastgen_jax.checkpoints.hf import load_hf_dir


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
        config = load_config(path)
        tokenizer = _load_tokenizer(path)
        return Checkpoint(config, _restore_params(path / PARAMS_DIR, dtype), tokenizer, str(path))
    elif path.is_dir():
        config, params = load_hf_dir(path)
        tokenizer = _load_tokenizer(path)
    else:
        raise CheckpointError(f"no checkpoint at {path} (expected a model directory or a .gguf file)")
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    return Checkpoint(config, params, tokenizer, str(path))


def _load_tokenizer(path: pathlib.Path) -> Tokenizer:
    from fastgen_jax.tokenizer import Tokenizer, TokenizerError

    try:
        return Tokenizer.from_hf_dir(path)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
