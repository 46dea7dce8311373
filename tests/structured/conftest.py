"""The server tests' tiny random model (SmolLM2's tokenizer, its full vocabulary) serves these too."""

from tests.server.conftest import tiny_random_dir  # noqa: F401
