"""The OpenAI-compatible server: app factory, engine-thread bridge, uvicorn helpers."""

from fastgen_jax.server.app import build_app
from fastgen_jax.server.async_engine import AsyncEngine, GenerationRequest
from fastgen_jax.server.http import Server, ServerThread

__all__ = ["AsyncEngine", "GenerationRequest", "Server", "ServerThread", "build_app"]
