"""Servers on loopback for the tests: a random tiny Llama (SmolLM2's tokenizer) and SmolLM2 itself."""

import contextlib
import re

import httpx
import pytest

from fastgen_jax.config import EngineConfig
from fastgen_jax.llm_engine import LLMEngine
from fastgen_jax.server import ServerThread, build_app

# Small limits keep start-up compiles short; 32 sequences let 32 streams run at once.
TINY_CONFIG = EngineConfig(token_budget=64, max_num_seqs=32, max_model_len=256, num_pages=320, page_size=16)
SMOLLM2_CONFIG = EngineConfig(token_budget=64, max_num_seqs=8, max_model_len=512, num_pages=160)


@pytest.fixture(scope="session")
def tiny_random_dir(smollm2_dir, tmp_path_factory):
    from fastgen_jax.checkpoints.random_model import make_random_checkpoint
    from fastgen_jax.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("tiny-random")
    make_random_checkpoint(path, Tokenizer.from_hf_dir(smollm2_dir))
    return path


def make_engine(model_dir, config: EngineConfig) -> LLMEngine:
    return LLMEngine.from_pretrained(str(model_dir), config, "float32", progress=False)


@contextlib.contextmanager
def serving(engine: LLMEngine, model_name: str = "tiny", **app_options):
    """Serves `engine` on a free loopback port; yields the base URL."""
    with ServerThread(build_app(engine, model_name, **app_options)) as url:
        yield url


def metric(url: str, name: str, headers=None, missing: float | None = None) -> float:
    """One sample of /metrics by its full name (labels included); `missing` if absent, else fail."""
    text = httpx.get(f"{url}/metrics", headers=headers).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match or missing is not None, f"{name} is not in /metrics"
    return float(match.group(1)) if match else missing
