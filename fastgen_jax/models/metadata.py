"""The step plan on the device: the host's `StepPlan`, `AttentionMetadata` and `SamplingArrays`
(defined once, in `fastgen_jax.engine.batch`, which never imports jax) registered as pytrees here,
so a plan passes through jit whole and its fields arrive as jax arrays of the same shapes.

Attention metadata is an explicit argument of every model call, never a global. Shapes are static
given the slab size T, the number of sequence slots S and the page-table width W, so each (T, S, W)
compiles once.
"""

from __future__ import annotations

import dataclasses

import jax

from fastgen_jax.engine.batch import AttentionMetadata, SamplingArrays, StepPlan


def _register(cls) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])


for _cls in (AttentionMetadata, SamplingArrays, StepPlan):
    _register(_cls)

__all__ = ["AttentionMetadata", "SamplingArrays", "StepPlan"]
