"""Attention metadata: what a forward pass needs to know about the token slab besides the token ids.

It is an explicit argument of every model call (a pytree), never a global. Shapes are static given the
slab size T, the number of sequence slots S and the page-table width W, so each (T, S, W) compiles once.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import struct


@struct.dataclass
class AttentionMetadata:
    positions: jax.Array  # i32[T]: position of each slab row in its sequence
    slot_mapping: jax.Array  # i32[T]: KV slot (page * page_size + offset) per row; out of range = padding
    kv_lens: jax.Array  # i32[S]: keys per sequence slot after this step (0 for empty slots)
    page_indices: jax.Array  # i32[S, W]: each slot's KV pages, in order
    cu_q_lens: jax.Array  # i32[S + 1]: slot s owns slab rows cu_q_lens[s]:cu_q_lens[s + 1]
    num_seqs: jax.Array  # i32[1]: slots in use
    logits_indices: jax.Array  # i32[R]: slab rows whose vocabulary logits are wanted

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> AttentionMetadata:
        """Builds metadata from a dict of host arrays keyed by the field names (extra keys ignored)."""
        return cls(**{f: arrays[f] for f in cls.__dataclass_fields__})
