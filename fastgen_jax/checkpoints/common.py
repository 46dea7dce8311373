"""What every checkpoint source shares: the result type, its error, the converted layout's names."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import TYPE_CHECKING, Any

from fastgen_jax.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from fastgen_jax.tokenizer import Tokenizer


PARAMS_DIR = "params"
MARKER_FILE = "fastgen_checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint we cannot load, with a message saying which file and why."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    config: ModelConfig
    params: Any  # {"params": ...} pytree of arrays, ready for `module.apply`
    tokenizer: Tokenizer
    path: str


def load_config(model_dir: pathlib.Path) -> ModelConfig:
    try:
        return ModelConfig.from_json_file(model_dir / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
