"""The package's public names stay the functions they are, whatever submodules get imported."""

import importlib

import fastgen_jax


def test_pipeline_and_client_stay_callable_after_every_submodule_import():
    for name in ("offline", "http_client", "llm_engine", "server", "serve", "generate"):
        importlib.import_module(f"fastgen_jax.{name}")
    assert callable(fastgen_jax.pipeline) and fastgen_jax.pipeline.__name__ == "pipeline"
    assert callable(fastgen_jax.client) and fastgen_jax.client.__name__ == "client"
    assert callable(fastgen_jax.build_app) and callable(fastgen_jax.LLMEngine)
