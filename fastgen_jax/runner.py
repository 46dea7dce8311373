"""The device side of a step: parameters and KV pages on device, one compiled program per plan shape.

A `StepPlan`'s shapes depend only on its token bucket T and page-table width W, so the runner
compiles one executable per (T, W) pair (`warmup` does all of them ahead of time, `compile` one) and
`execute` only ever calls those executables: it never compiles, and a shape not compiled is an error.
(The engine compiles a step's shape itself before executing it, which is a no-op unless warm-up was
skipped; `stats.compiled_after_warmup` counts such late compilations.) The plan enters the program as
one int32 array, its 17 arrays packed end to end on the host (`pack_plan`) and unpacked inside the
program (`unpack_plan`, static slices), so a step pays one host-to-device transfer: sending the
arrays one by one was most of the host's own time in a step (a profile of one stream), which on a
2-core CPU comes out of the step's own threads. The KV cache is donated to every step, so XLA
updates it in place.

Steps chain on the device: each step also returns its sampled tokens padded to i32[max_num_seqs]
(`sampled_tokens`, kept here like the KV cache) and the next step takes them as an input, so a
decode row whose input token the previous step sampled (`StepPlan.previous_slot`) reads it there:
the engine can launch step N+1 before step N's tokens reach the host (overlap). A plan with no
sequence (warm-up, a probe) passes the previous tokens through unchanged. Sampling happens inside
the same program; the step returns device arrays and does not wait for them, so the caller decides
when to block.

Speculative decoding: a slot may verify draft tokens in the same step (`sampler.verify`); the step
also returns how many tokens each slot emits, and the token it chains to the next step is the last
of them.

Structured outputs enter as the step's last argument, a token bitmask i32[L, ceil(V/32)] (see
`sampler.apply_token_bitmask`), kept out of the plan so that a step without constrained rows sends
none: it gets an all-ones mask that stays on the device, so every step runs the same program.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fastgen_jax import distributed, executable_cache, parallel, quantize, weight_layout
from fastgen_jax.attention import get_attention
from fastgen_jax.config import ConfigError, EngineConfig, ModelConfig
from fastgen_jax.engine import EngineLimits, pages_for
from fastgen_jax.models import StepPlan, build_model, init_kv_cache, kv_bytes_per_page
from fastgen_jax.models.layers import logit_rows_in_use
from fastgen_jax.sampler import sample_used, verify

log = logging.getLogger(__name__)

_CACHE_ENV = "FASTGEN_JAX_COMPILATION_CACHE"


@dataclasses.dataclass(frozen=True)
class PlanLayout:
    """Where each of a plan's arrays lies in its packed words: the plan's tree and, per array in
    tree order, its shape and dtype. Hashable: it is a static argument of the step."""

    treedef: Any
    arrays: tuple[tuple[tuple[int, ...], np.dtype], ...]


def pack_plan(plan: StepPlan) -> tuple[np.ndarray, PlanLayout]:
    """The plan's arrays as one int32 array (float32 and uint32 by their bits, bool as 0 / 1)."""
    leaves, treedef = jax.tree.flatten(plan)
    words = []
    for leaf in leaves:
        if leaf.dtype == np.bool_:
            leaf = leaf.astype(np.int32)
        elif leaf.dtype.itemsize != 4:
            raise TypeError(f"a plan array of {leaf.dtype}: only 4-byte types and bool pack")
        words.append(leaf.reshape(-1).view(np.int32))
    layout = PlanLayout(treedef, tuple((leaf.shape, leaf.dtype) for leaf in leaves))
    return np.concatenate(words), layout


def unpack_plan(words: jax.Array, layout: PlanLayout) -> StepPlan:
    """Inside the step: the plan `pack_plan` packed, each array a static slice of `words`."""
    leaves, offset = [], 0
    for shape, dtype in layout.arrays:
        size = math.prod(shape)
        part = words[offset : offset + size].reshape(shape)
        offset += size
        if dtype == np.bool_:
            part = part != 0
        elif dtype != np.int32:
            part = jax.lax.bitcast_convert_type(part, dtype)
        leaves.append(part)
    return jax.tree.unflatten(layout.treedef, leaves)


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


def kv_dtype(engine: EngineConfig, dtype) -> jnp.dtype:
    """The KV pages' element type: `engine.kv_cache_dtype`, or the compute `dtype` for "auto"."""
    return jnp.dtype(dtype if engine.kv_cache_dtype == "auto" else engine.kv_cache_dtype)


def resolve_limits(model: ModelConfig, engine: EngineConfig, dtype, vocab_size: int) -> EngineLimits:
    """The KV pool and sequence limits for `model` on this device (`vocab_size`: the checkpoint's,
    which tensor-parallel padding of `model` does not change; `dtype`: the compute dtype)."""
    max_model_len = engine.max_model_len or model.max_position_embeddings
    if max_model_len > model.max_position_embeddings:
        raise ConfigError(
            f"max_model_len={max_model_len} exceeds the model's "
            f"max_position_embeddings={model.max_position_embeddings}"
        )
    page_bytes = kv_bytes_per_page(model, engine.page_size, kv_dtype(engine, dtype))
    if engine.num_pages is not None:
        num_pages = engine.num_pages
    else:
        # Never more than every sequence slot at full length could use (+1 for the scratch page).
        pages_per_seq = pages_for(max_model_len, engine.page_size)
        num_pages = min(engine.kv_cache_bytes // page_bytes, engine.max_num_seqs * pages_per_seq + 1)
    return EngineLimits(num_pages, engine.page_size, max_model_len, vocab_size, num_pages * page_bytes)


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
        self.limits = resolve_limits(self.model_config, engine_config, self.dtype, model_config.vocab_size)
        self.params = parallel.shard_params(params, model_config, self.mesh, self.dtype)
        if engine_config.quantize == "int8":  # split like the float weights it replaces
            self.params = quantize.quantize_over(self.params, model_config, self.mesh)
        self.attention = get_attention(engine_config.attention_impl).over(self.mesh)
        if self.attention.packs_weights and engine_config.quantize == "none" and self.dtype == jnp.float32:
            self.params = weight_layout.pack_params(self.params)  # replaces the unpacked leaves
        kv_sharding = parallel.kv_sharding(self.mesh)
        r, pages_dtype = self.limits, kv_dtype(engine_config, self.dtype)
        self.kv_cache = jax.jit(  # zeroed where it lives: no device ever holds the whole pool
            lambda: init_kv_cache(self.model_config, r.num_pages, r.page_size, pages_dtype),
            out_shardings=kv_sharding,
        )()
        self._model = build_model(self.model_config, self.dtype, self.attention, r.max_model_len)
        self._replicated = parallel.replicated(self.mesh)
        self.sampled_tokens = jax.device_put(np.zeros(engine_config.max_num_seqs, np.int32), self._replicated)
        self._jitted = jax.jit(
            self._step,
            donate_argnums=(1,),
            static_argnums=(5,),
            in_shardings=(
                jax.tree.map(lambda x: x.sharding, self.params),
                kv_sharding,
                self._replicated,
                self._replicated,
                self._replicated,
            ),
            out_shardings=(self._replicated, kv_sharding, self._replicated),
        )
        self._executables: dict[tuple[int, int], Any] = {}
        self._layouts: dict[tuple[int, int], PlanLayout] = {}  # the packed plan each executable reads
        self._all_allowed: dict[int, jax.Array] = {}  # rows -> an all-ones token bitmask on device
        self.compile_seconds = 0.0

    @property
    def token_bitmask_words(self) -> int:
        """int32 words in one row of the token bitmask: ceil(vocab / 32) of the logits' vocabulary."""
        return -(-self.model_config.vocab_size // 32)

    def _step(self, params, kv_cache, previous_tokens, words, token_bitmask, layout: PlanLayout):
        """previous_tokens i32[max_num_seqs]: the last step's sampled tokens (see the module docstring);
        words: the plan, packed (`pack_plan`)."""
        plan = unpack_plan(words, layout)
        from_previous = previous_tokens[jnp.maximum(plan.previous_slot, 0)]  # [T]
        token_ids = jnp.where(plan.previous_slot >= 0, from_previous, plan.token_ids)
        logits, kv_cache = self._model.apply(params, token_ids, kv_cache, plan.attention)
        used = logit_rows_in_use(plan.attention, logits.shape[0])
        sampled = sample_used(logits, plan.sampling, token_bitmask, used)
        num_emitted, last = verify(sampled[0], plan.sampling)
        tokens = previous_tokens.at[: last.shape[0]].set(last)
        tokens = jnp.where(plan.attention.num_seqs[0] > 0, tokens, previous_tokens)
        return (*sampled, num_emitted), kv_cache, tokens

    @property
    def num_compiled(self) -> int:
        return len(self._executables)

    def compile(self, plan: StepPlan) -> None:
        """Compiles the executable for the shape of `plan` (a padding plan is enough)."""
        if plan.shape in self._executables:
            return
        start = time.perf_counter()
        words, layout = pack_plan(plan)
        args = (
            self.params,
            self.kv_cache,
            self.sampled_tokens,
            jax.device_put(words, self._replicated),
            self._bitmask(plan, None),
        )
        describe = lambda: self._description(args, layout)  # called only when the cache is on
        name = None if self._multiprocess else executable_cache.name_for(describe)
        self._executables[plan.shape] = executable_cache.compiled(
            name,
            jax.tree.structure((args, {})),
            list(self.mesh.devices.flat),
            lambda: self._jitted.lower(*args, layout),
        )
        self._layouts[plan.shape] = layout
        self.compile_seconds += time.perf_counter() - start

    def _description(self, args: tuple, layout: PlanLayout) -> tuple:
        """What the step program for these arguments is made of, beyond the environment
        (`executable_cache`): it names the program exactly."""
        return (
            "step",
            self.model_config,
            self.engine_config,
            str(self.dtype),
            self.limits,
            self.attention,
            [d.device_kind for d in self.mesh.devices.flat],  # not which: replicas share programs
            jax.tree.structure(args),
            [(x.shape, str(x.dtype), repr(getattr(x, "sharding", None))) for x in jax.tree.leaves(args)],
            layout,
        )

    def warmup(self, plans: Iterable[StepPlan], progress: bool = True) -> None:
        """Compiles the program of every plan's shape, e.g. one padding plan per (bucket, width)."""
        from tqdm.auto import tqdm

        plans = list(plans)
        for plan in tqdm(
            plans, desc="compiling step programs", unit="program", disable=not progress, leave=False
        ):
            self.compile(plan)
        if self._multiprocess:
            distributed.warm_broadcasts(plans)

    def wait_until_ready(self) -> None:
        """Waits for the KV pool's zeroing, which was dispatched asynchronously and runs beside the
        compiling. A server calls this before it says it is ready: otherwise its first step waits
        for what is left of it, and the first request pays for start-up (seconds for a few GiB on a
        VM whose memory is touched for the first time)."""
        jax.block_until_ready(self.kv_cache)

    def execute(self, plan: StepPlan, token_bitmask: np.ndarray | None = None) -> tuple[jax.Array, ...]:
        """Runs one step; returns (tokens i32[L], logprobs f32[L], top_ids i32[L, K], top_logprobs
        f32[L, K], num_emitted i32[S]) as device arrays, not yet waited on (see `sampler.sample` and
        `sampler.verify`; without draft tokens L = S and every slot emits its one row's token). In a
        multi-host group the leader first sends the plan to the other processes
        (`fastgen_jax.distributed`; the engine refuses constrained requests there, so followers
        always run with the all-ones mask)."""
        if self._multiprocess:
            distributed.send_plan(plan)
        return self._launch(plan, token_bitmask)

    def follow(self, padding: Callable[[int, int], StepPlan]) -> int:
        """A multi-host follower: runs the leader's steps until it stops (see `distributed.follow`)."""
        return distributed.follow(padding, self._launch)

    def stop_followers(self) -> None:
        """The multi-host leader, shutting down: lets the followers' `follow` return."""
        if self._multiprocess and distributed.is_leader():
            distributed.send_stop()

    def _launch(self, plan: StepPlan, token_bitmask: np.ndarray | None = None) -> tuple[jax.Array, ...]:
        try:
            executable = self._executables[plan.shape]
        except KeyError:
            raise RuntimeError(f"no compiled step for plan shape {plan.shape}; warm-up missed it") from None
        words, bitmask = self.step_args(plan, token_bitmask)
        sampled, self.kv_cache, self.sampled_tokens = executable(
            self.params, self.kv_cache, self.sampled_tokens, words, bitmask
        )
        return sampled

    def step_args(
        self, plan: StepPlan, token_bitmask: np.ndarray | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """The step's plan (packed, on the device; checked against the compiled step's layout) and
        token bitmask arguments: a compiled step is `executable(params, kv_cache, sampled_tokens,
        *step_args(plan))`."""
        words, layout = pack_plan(plan)
        if layout != self._layouts.get(plan.shape):
            raise ValueError(f"a plan of shape {plan.shape} whose arrays differ from the compiled step's")
        return jax.device_put(words, self._replicated), self._bitmask(plan, token_bitmask)

    def _all_allowed_bitmask(self, rows: int) -> jax.Array:
        if rows not in self._all_allowed:
            ones = np.full((rows, self.token_bitmask_words), -1, np.int32)
            self._all_allowed[rows] = jax.device_put(ones, self._replicated)
        return self._all_allowed[rows]

    def _bitmask(self, plan: StepPlan, token_bitmask: np.ndarray | None) -> jax.Array:
        if token_bitmask is None:
            return self._all_allowed_bitmask(plan.num_logit_rows)
        return jax.device_put(token_bitmask, self._replicated)
