"""fastgen-jax: Dynamic SplitFuse text generation on JAX/XLA.

Public API (heavy modules load on first use, so `import fastgen_jax` stays cheap):

    pipe = fastgen_jax.pipeline("checkpoints/smollm2-135m-instruct", token_budget=512)
    responses = pipe(["Hello!"], max_new_tokens=32)

`LLMEngine` is the step-level API (add_request / step / abort) that servers drive.
`python -m fastgen_jax.serve` is the OpenAI-compatible server; `client(url)` talks to it:

    client = fastgen_jax.client("http://127.0.0.1:8000")
    responses = client.generate(["Hello!"], max_new_tokens=32)
"""

from fastgen_jax.config import EngineConfig, ModelConfig
from fastgen_jax.sampling_params import SamplingParams

__all__ = ["EngineConfig", "LLMEngine", "ModelConfig", "SamplingParams", "build_app", "client", "pipeline"]


def __getattr__(name: str):
    if name == "pipeline":
        from fastgen_jax.offline import pipeline

        return pipeline
    if name == "LLMEngine":
        from fastgen_jax.llm_engine import LLMEngine

        return LLMEngine
    if name == "client":
        from fastgen_jax.http_client import client

        return client
    if name == "build_app":
        from fastgen_jax.server import build_app

        return build_app
    raise AttributeError(f"module 'fastgen_jax' has no attribute {name!r}")
