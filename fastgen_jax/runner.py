"""The device side of a step: parameters and KV pages on device, one compiled program per slab shape.

A slab's shapes depend only on its token bucket T and page-table width W, so the runner compiles one
executable per (T, W) pair ahead of time (`warmup`) and afterwards only ever calls those executables:
a shape it has not compiled is an error, never a silent recompile. The KV cache is donated to every
step, so XLA updates it in place. Sampling happens inside the same program; the step returns device
arrays and does not wait for them, so the caller decides when to block.

Structured outputs enter as one optional entry of the sampling arrays, `token_bitmask`
(i32[S, ceil(V/32)], see `sampler.apply_token_bitmask`). A step without it gets an all-ones mask
that stays on the device, so every step runs the same program and only constrained steps send one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fastgen_jax import distributed, parallel
from fastgen_jax.attention import get_attention
from fastgen_jax.config import ConfigError, EngineConfig, ModelConfig
from fastgen_jax.models import AttentionMetadata, build_model, init_kv_cache, kv_bytes_per_page
from fastgen_jax.sampler import SamplingArrays, sample

log = logging.getLogger(__name__)

_CACHE_ENV = "FASTGEN_JAX_COMPILATION_CACHE"


def enable_compilation_cache(path: str | None = None) -> None:
    """Turns on JAX's persistent compilation cache so a second start skips XLA compilation."""
    path = path or os.environ.get(_CACHE_ENV) or os.path.expanduser("~/.cache/fastgen_jax/xla")
    if path.lower() in ("0", "off", "none"):
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def default_dtype() -> str:
    """bfloat16 on accelerators, float32 on the CPU (where bf16 matmuls are slow and inexact)."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


@dataclasses.dataclass(frozen=True)
class ResolvedEngine:
    """Engine limits found at run time (not configuration): the KV pool size and the longest sequence."""

    num_pages: int
    page_size: int
    max_model_len: int
    kv_cache_bytes: int


def resolve_engine(model: ModelConfig, engine: EngineConfig, dtype) -> ResolvedEngine:
    max_model_len = engine.max_model_len or model.max_position_embeddings
    if max_model_len > model.max_position_embeddings:
        raise ConfigError(
            f"max_model_len={max_model_len} exceeds the model's "
            f"max_position_embeddings={model.max_position_embeddings}"
        )
    page_bytes = kv_bytes_per_page(model, engine.page_size, dtype)
    pages_per_seq = -(-max_model_len // engine.page_size)
    if engine.num_pages is not None:
        num_pages = engine.num_pages
    else:
        # Never more than every sequence slot at full length could use (+1 for the scratch page).
        num_pages = min(engine.kv_cache_bytes // page_bytes, engine.max_num_seqs * pages_per_seq + 1)
    if num_pages - 1 < pages_per_seq:
        raise ConfigError(
            f"the KV pool ({num_pages} pages of {engine.page_size} tokens) cannot hold one "
            f"sequence of max_model_len={max_model_len}; raise num_pages/kv_cache_bytes or "
            "lower max_model_len"
        )
    return ResolvedEngine(num_pages, engine.page_size, max_model_len, num_pages * page_bytes)


class ModelRunner:
    """Owns the device state (params, KV pages) and the compiled step executables.

    `devices`: the group the step runs on, `engine_config.tensor_parallel` of them (default: the
    first ones JAX lists). `model_config` is the shape the device program runs: the checkpoint's,
    padded for tensor parallelism where its heads do not divide (`parallel.shard_config`).
    """

    def __init__(
        self,
        model_config: ModelConfig,
        params: Any,
        engine_config: EngineConfig,
        dtype="float32",
        devices: list | None = None,
    ):
        tp = engine_config.tensor_parallel
        devices = devices if devices is not None else parallel.device_groups(tp)[0]
        if len(devices) != tp:
            raise ConfigError(f"tensor_parallel={tp} needs {tp} devices, got {len(devices)}")
        self.mesh = parallel.make_mesh(devices)
        self._multiprocess = distributed.is_multiprocess()
        self.model_config = parallel.shard_config(model_config, tp)
        self.engine_config = engine_config
        self.dtype = jnp.dtype(dtype)
        self.resolved = resolve_engine(self.model_config, engine_config, self.dtype)
        self.params = parallel.shard_params(params, model_config, self.mesh, self.dtype)
        kv_sharding = parallel.kv_sharding(self.mesh)
        r = self.resolved
        self.kv_cache = jax.jit(  # zeroed where it lives: no device ever holds the whole pool
            lambda: init_kv_cache(self.model_config, r.num_pages, r.page_size, self.dtype),
            out_shardings=kv_sharding,
        )()
        self.attention = get_attention(engine_config.attention_impl).over(self.mesh)
        self._model = build_model(self.model_config, self.dtype, self.attention, r.max_model_len)
        self._replicated = parallel.replicated(self.mesh)
        self._jitted = jax.jit(
            self._step,
            donate_argnums=(1,),
            in_shardings=(
                jax.tree.map(lambda x: x.sharding, self.params),
                kv_sharding,
                self._replicated,
                self._replicated,
                self._replicated,
                self._replicated,
            ),
            out_shardings=(self._replicated, kv_sharding),
        )
        self._executables: dict[tuple[int, int], Any] = {}
        self._all_allowed: dict[int, jax.Array] = {}  # rows -> an all-ones token bitmask on device
        self.compile_seconds = 0.0

    @property
    def token_bitmask_words(self) -> int:
        """int32 words in one row of the token bitmask: ceil(vocab / 32) of the logits' vocabulary."""
        return -(-self.model_config.vocab_size // 32)

    def _step(self, params, kv_cache, token_ids, md: AttentionMetadata, sampling: SamplingArrays, bitmask):
        logits, kv_cache = self._model.apply(params, token_ids, kv_cache, md)
        return sample(logits, sampling, bitmask), kv_cache

    @property
    def num_compiled(self) -> int:
        return len(self._executables)

    def compile(self, arrays: dict[str, np.ndarray], sampling: dict[str, np.ndarray]) -> None:
        """Compiles the executable for the shapes of `arrays` (a padding slab is enough)."""
        key = _shape_key(arrays)
        if key in self._executables:
            return
        start = time.perf_counter()
        args = self._device_args(arrays, sampling)
        self._executables[key] = self._jitted.lower(self.params, self.kv_cache, *args).compile()
        self.compile_seconds += time.perf_counter() - start

    def warmup(
        self,
        slabs: Iterable[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
        progress: bool = True,
    ) -> None:
        """Compiles every (slab arrays, sampling arrays) shape given, e.g. one per bucket."""
        from tqdm.auto import tqdm

        plans = list(slabs)
        for arrays, sampling in tqdm(
            plans,
            desc="compiling step programs",
            unit="program",
            disable=not progress,
            leave=False,
        ):
            self.compile(arrays, sampling)
        if self._multiprocess:
            distributed.warm_broadcasts(plans)

    def execute(
        self, arrays: dict[str, np.ndarray], sampling: dict[str, np.ndarray]
    ) -> tuple[jax.Array, ...]:
        """Runs one step; returns (tokens i32[S], logprobs f32[S], top_ids i32[S, K], top_logprobs
        f32[S, K]) as device arrays, not yet waited on (see `sampler.sample`). In a multi-host group
        the leader first sends the step to the other processes (`fastgen_jax.distributed`)."""
        if self._multiprocess:
            distributed.send_plan((arrays, sampling))
        return self._launch(arrays, sampling)

    def follow(self, template) -> int:
        """A multi-host follower: runs the leader's steps until it stops (see `distributed.follow`)."""
        return distributed.follow(template, lambda plan: self._launch(*plan))

    def stop_followers(self) -> None:
        """The multi-host leader, shutting down: lets the followers' `follow` return."""
        if self._multiprocess and distributed.is_leader():
            distributed.send_stop()

    def _launch(
        self, arrays: dict[str, np.ndarray], sampling: dict[str, np.ndarray]
    ) -> tuple[jax.Array, ...]:
        key = _shape_key(arrays)
        try:
            executable = self._executables[key]
        except KeyError:
            raise RuntimeError(f"no compiled step for slab shape {key}; warm-up missed it") from None
        sampled, self.kv_cache = executable(self.params, self.kv_cache, *self._device_args(arrays, sampling))
        return sampled

    def _device_args(self, arrays, sampling):
        md = AttentionMetadata.from_arrays(arrays)
        s = SamplingArrays(**{f: sampling[f] for f in SamplingArrays.__dataclass_fields__})
        args = jax.device_put((arrays["token_ids"], md, s), self._replicated)
        bitmask = sampling.get("token_bitmask")
        if bitmask is None:
            return (*args, self._all_allowed_bitmask(len(sampling["temperature"])))
        return (*args, jax.device_put(bitmask, self._replicated))

    def _all_allowed_bitmask(self, rows: int) -> jax.Array:
        if rows not in self._all_allowed:
            ones = np.full((rows, self.token_bitmask_words), -1, np.int32)
            self._all_allowed[rows] = jax.device_put(ones, self._replicated)
        return self._all_allowed[rows]


def _shape_key(arrays: dict[str, np.ndarray]) -> tuple[int, int]:
    return int(arrays["token_ids"].shape[0]), int(arrays["page_indices"].shape[1])


def sampling_arrays(num_slots: int) -> dict[str, np.ndarray]:
    """Host buffers for per-slot sampling settings, defaulting to greedy."""
    return {
        "temperature": np.zeros(num_slots, np.float32),
        "top_k": np.zeros(num_slots, np.int32),
        "top_p": np.ones(num_slots, np.float32),
        "seed": np.zeros(num_slots, np.uint32),
        "step": np.zeros(num_slots, np.int32),
        "logprobs": np.zeros(num_slots, bool),
    }
