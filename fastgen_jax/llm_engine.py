"""The engine: the only module that wires scheduler, slab builder, model runner and output processing.

One `step()`:

1. `Scheduler.schedule()` picks this pass's tokens under the token budget: one for every decoding
   sequence, then prompt chunks in arrival order (Dynamic SplitFuse), evicting when KV pages run out.
   With `adaptive_budget` the `BudgetController` first picks this step's budget among the compiled
   buckets, and afterwards learns from the step's measured time.
2. `SlabBuilder.build()` packs them into static-shaped arrays (a bucket of T rows, W page columns).
3. `ModelRunner.execute()` runs the precompiled program for (T, W): the model writes the new K/V into
   the donated page pool, computes logits only for the rows that need a token, and samples on device.
   The call returns at once; the step blocks only when it reads the sampled ids back.
4. `Scheduler.postprocess()` advances every sequence; each `RequestState` detokenizes its new token and
   checks stop conditions, and finished sequences give their pages back at once.

Everything here runs on one thread; a server drives `add_request` / `step` / `abort` from its engine
loop and hands the `RequestOutput`s to its clients.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence as SequenceABC

import numpy as np

from fastgen_jax.checkpoints import Checkpoint, load_checkpoint
from fastgen_jax.config import EngineConfig
from fastgen_jax.engine import (
    BudgetController,
    RequestSLA,
    Scheduler,
    SchedulerOutput,
    Sequence,
    SequenceStatus,
    Slab,
    SlabBuilder,
    StepTimeModel,
)
from fastgen_jax.engine.budget import attended_pairs
from fastgen_jax.output_processor import RequestOutput, RequestState
from fastgen_jax.runner import ModelRunner, default_dtype, enable_compilation_cache, sampling_arrays
from fastgen_jax.sampling_params import SamplingParams

_FINISH_STATUS = {
    "stop": SequenceStatus.FINISHED_STOPPED,
    "length": SequenceStatus.FINISHED_LENGTH,
    "abort": SequenceStatus.FINISHED_ABORTED,
}


class RequestError(ValueError):
    """A request the engine cannot take (empty or too long prompt, bad settings); says why, and
    `param` names the offending input ("prompt", "max_tokens", ...) when there is one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class StepError(RuntimeError):
    """A forward pass failed (the cause is chained). `request_ids` were in it; the engine is consistent
    and can go on: their tokens were not advanced, and the next step schedules them again unless they
    are aborted."""

    def __init__(self, request_ids: list[str]):
        super().__init__(f"a forward pass of {len(request_ids)} request(s) failed")
        self.request_ids = request_ids


@dataclasses.dataclass
class EngineStats:
    """Counters since start-up. Times are seconds; host time excludes the wait for the device."""

    steps: int = 0
    prompt_tokens: int = 0  # prompt tokens computed (recomputed ones count again)
    generation_tokens: int = 0
    host_seconds: float = 0.0
    device_seconds: float = 0.0
    compiled_programs: int = 0
    compiled_after_warmup: int = 0
    running: int = 0
    waiting: int = 0
    free_pages: int = 0  # pages not in use: free or cached (an allocation may evict cached ones)
    total_pages: int = 0
    preemptions: int = 0
    token_budget: int = 0  # of the last step: fixed, or chosen by the budget controller
    token_budget_changes: int = 0  # steps whose budget differed from the step before
    cached_pages: int = 0  # pages no sequence owns that hold a cached prefix (part of free_pages)
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache at admission
    prefix_cache_hits: int = 0  # of those, tokens served from the cache instead of computed
    deferred_decodes: int = 0  # policy "sla": decode steps deferred for prompts that needed the room
    prompts_past_deadline: int = 0  # policy "sla": requests whose prompt ran past its first-token deadline


class LLMEngine:
    """Continuous batching with Dynamic SplitFuse over a paged KV cache."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        engine_config: EngineConfig | None = None,
        dtype: str | None = None,
        warmup: bool = True,
        progress: bool = True,
        devices: list | None = None,
    ):
        self.engine_config = engine_config or EngineConfig()
        self.model_config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.runner = ModelRunner(
            checkpoint.config, checkpoint.params, self.engine_config, dtype or default_dtype(), devices
        )
        resolved = self.runner.resolved
        self.max_model_len = resolved.max_model_len
        self.scheduler = Scheduler(
            self.engine_config, num_pages=resolved.num_pages, max_model_len=resolved.max_model_len
        )
        self.slab_builder = SlabBuilder.for_scheduler(self.scheduler)
        self.budget_controller = (
            BudgetController(
                self.engine_config.token_buckets,
                self.engine_config.sla_token_rate,
                prompt_rate=self.engine_config.sla_prompt_rate,
            )
            if self.engine_config.adaptive_budget
            else None
        )
        if self.scheduler.sla is not None:  # the composer predicts steps with the controller's model
            controller = self.budget_controller
            self.scheduler.sla.model = (
                controller.model if controller else StepTimeModel(self.engine_config.token_budget)
            )
        self.eos_token_ids = tuple(
            sorted(set(self.tokenizer.eos_token_ids) | set(checkpoint.config.eos_token_ids))
        )
        self._states: dict[str, RequestState] = {}
        self._ids = itertools.count()
        self.stats = EngineStats(
            total_pages=resolved.num_pages - 1, token_budget=self.engine_config.token_budget
        )
        self.refresh_stats()
        self._warm_programs = 0
        if warmup:
            self.warmup(progress)

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        engine_config: EngineConfig | None = None,
        dtype: str | None = None,
        **kwargs,
    ) -> LLMEngine:
        """Loads a checkpoint (converted dir, Hugging Face dir or .gguf) and warms up."""
        enable_compilation_cache()
        dtype = dtype or default_dtype()
        return cls(load_checkpoint(model, dtype), engine_config, dtype, **kwargs)

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        prompt: str | None = None,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        prompt_token_ids: SequenceABC[int] | None = None,
        cache_salt: str | None = None,
        sla: RequestSLA | None = None,
        arrival_time: float | None = None,
    ) -> str:
        """Queues a request (text, or token ids) and returns its id. Requests share cached prompt
        pages only when their `cache_salt` is equal (None is a salt like any other). Policy "sla":
        `sla` is the request's own SLA (default: the engine's), `arrival_time` (time.monotonic) when
        its SLA's clock started (default: now)."""
        params = (sampling_params or SamplingParams()).with_seed()
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise RequestError(f"prompt must be a string, got {type(prompt).__name__}")
            prompt_token_ids = self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt_token_ids]
        self.check_prompt(ids)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._states:
            raise RequestError(f"request id {request_id!r} is already in use")
        max_tokens = min(params.max_new_tokens, self.max_model_len - len(ids))
        self.scheduler.add(
            Sequence(request_id, ids, max_tokens, params, cache_salt=cache_salt), sla, arrival_time
        )
        if self.budget_controller is not None:
            self.budget_controller.arrived(request_id, time.perf_counter(), len(ids))
        self._states[request_id] = RequestState(
            request_id, len(ids), params, self.tokenizer, self.max_model_len, self.eos_token_ids
        )
        return request_id

    def check_prompt(self, ids: list[int], max_new_tokens: int = 1) -> None:
        """Raises RequestError unless `ids` plus `max_new_tokens` generated tokens fit the engine."""
        if not ids:
            raise RequestError("prompt is empty", "prompt")
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"prompt has {len(ids)} tokens; the context holds "
                f"{self.max_model_len} (max_model_len) including at least one "
                "generated token",
                "prompt",
            )
        if len(ids) + max_new_tokens > self.max_model_len:
            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_new_tokens}) exceeds the context of "
                f"{self.max_model_len} tokens (max_model_len)",
                "max_tokens",
            )
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise RequestError(f"prompt token ids must lie in [0, {vocab})", "prompt")

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stops a request now and frees its KV pages; None if it is unknown or already done."""
        state = self._states.pop(request_id, None)
        if state is None:
            return None
        self.scheduler.abort(request_id)
        self._forget(request_id)
        return state.abort()

    def has_unfinished(self) -> bool:
        return bool(self._states)

    def reset_prefix_cache(self) -> int:
        """Forgets every cached prefix page (benchmarks start cold with it); returns how many."""
        forgotten = self.scheduler.reset_prefix_cache()
        self.refresh_stats()
        return forgotten

    @property
    def num_unfinished(self) -> int:
        return len(self._states)

    # ------------------------------------------------------------------ stepping

    def warmup(self, progress: bool = True) -> None:
        """Compiles one program per (token bucket, page-table width): none is compiled later."""
        plans = (self._padding_plan(bucket, width) for bucket, width in self.slab_builder.shapes())
        self.runner.warmup(plans, progress=progress)
        self._warm_programs = self.runner.num_compiled
        if self.budget_controller is not None or self.scheduler.sla is not None:
            self._profile_buckets()

    def _profile_buckets(self) -> None:
        """Seeds the step-time model (the budget controller's, or the SLA composer's) with each
        bucket's time for an empty step (best of two)."""
        model = self.budget_controller.model if self.budget_controller else self.scheduler.sla.model
        width = self.slab_builder.page_table_widths[0]
        for bucket in self.slab_builder.token_buckets:
            arrays, sampling = self._padding_plan(bucket, width)
            times = []
            for _ in range(2):
                start = time.perf_counter()
                np.asarray(self.runner.execute(arrays, sampling)[0])
                times.append(time.perf_counter() - start)
            model.observe(bucket, 0, min(times))

    def _padding_plan(self, bucket: int, width: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(slab arrays, sampling arrays) of an all-padding step of this shape."""
        slab = self.slab_builder.padding_slab(bucket, width)
        return slab.arrays(), sampling_arrays(slab.kv_lens.shape[0])

    def probe(self) -> None:
        """Runs one all-padding step of the smallest shape and waits for it: raises if the device
        cannot run a step (after a failure, this tells a broken device from a bad batch)."""
        bucket, width = min(self.slab_builder.shapes())
        np.asarray(self.runner.execute(*self._padding_plan(bucket, width))[0])

    def follow(self) -> int:
        """Multi-host, on every process but the leader: runs the leader's steps until it shuts down
        (see `fastgen_jax.distributed`); returns the number of steps run."""
        return self.runner.follow(self._padding_plan)

    def close(self) -> None:
        """Multi-host, on the leader: releases the followers. A no-op in a single process."""
        self.runner.stop_followers()

    def step(self) -> list[RequestOutput]:
        """Runs one forward pass and returns what it produced for each request it sampled."""
        start = time.perf_counter()
        budget = self._choose_budget()
        output = self.scheduler.schedule(budget)
        if output.is_empty:
            return []
        try:
            slab = self.slab_builder.build(output)
            arrays, sampling = slab.arrays(), self._sampling_arrays(output, slab)
            self.runner.compile(arrays, sampling)  # a no-op unless warm-up was skipped
            launched = time.perf_counter()
            tokens, logprobs, top_ids, top_logprobs = self.runner.execute(arrays, sampling)
            tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)  # the one wait for the device
            top = None
            if sampling["logprobs"].any() and any(
                e.seq.sampling_params.top_logprobs for e in output.scheduled
            ):
                top = np.asarray(top_ids), np.asarray(top_logprobs)  # copied only when asked for
        except Exception as error:
            self.scheduler.abandon(output)  # so the engine can go on once the caller has dealt with it
            raise StepError([e.seq.request_id for e in output.scheduled]) from error
        except BaseException:
            self.scheduler.abandon(output)
            raise
        returned = time.perf_counter()
        self._count_tokens(output)
        self.scheduler.postprocess(output, tokens)
        results = self._process_samples(output, tokens, logprobs, top)
        self._count_step(start, launched, returned, budget)
        if self.budget_controller is not None:
            end = time.perf_counter()
            self.budget_controller.step_done(slab.bucket, output.scheduled, end - start, end)
            for result in results:  # after step_done, which would note their last tokens again
                if result.finished:
                    self._forget(result.request_id)
        elif self.scheduler.sla is not None:
            pairs = sum(attended_pairs(e.num_new_tokens, e.start_position) for e in output.scheduled)
            self.scheduler.sla.model.observe(slab.bucket, pairs, time.perf_counter() - start)
        return results

    def _choose_budget(self) -> int | None:
        if self.budget_controller is None:
            return None
        return self.budget_controller.choose_for(self.scheduler.running)

    def _forget(self, request_id: str) -> None:
        if self.budget_controller is not None:
            self.budget_controller.forget(request_id)

    def _sampling_arrays(self, output: SchedulerOutput, slab: Slab) -> dict[str, np.ndarray]:
        arrays = sampling_arrays(slab.kv_lens.shape[0])
        for i, entry in enumerate(output.scheduled):
            params: SamplingParams = entry.seq.sampling_params
            arrays["temperature"][i] = params.temperature
            arrays["top_k"][i] = params.top_k
            arrays["top_p"][i] = params.top_p
            arrays["seed"][i] = params.seed
            arrays["step"][i] = entry.seq.num_output_tokens
            arrays["logprobs"][i] = params.logprobs
        return arrays

    def _process_samples(
        self,
        output: SchedulerOutput,
        tokens: np.ndarray,
        logprobs: np.ndarray,
        top: tuple[np.ndarray, np.ndarray] | None,
    ) -> list[RequestOutput]:
        results = []
        for i, entry in enumerate(output.scheduled):
            if not entry.needs_sample:
                continue
            state = self._states[entry.seq.request_id]
            state.num_cached_tokens = max(0, entry.seq.num_cached_tokens)
            slack = self._admission_slack(entry.seq)
            k = entry.seq.sampling_params.top_logprobs
            alternatives = None
            if k and top is not None:
                alternatives = [(int(t), float(v)) for t, v in zip(top[0][i, :k], top[1][i, :k], strict=True)]
            result = state.add_token(int(tokens[i]), float(logprobs[i]), alternatives)
            result.admission_slack = slack
            if state.finished:
                self.scheduler.finish(entry.seq, _FINISH_STATUS[state.finish_reason])
                del self._states[entry.seq.request_id]
            results.append(result)
        return results

    def _admission_slack(self, seq: Sequence) -> float | None:
        """Policy "sla": the request's first-token deadline less now and its predicted prefill time,
        when it was admitted (read before a finished request's record goes)."""
        return None if self.scheduler.sla is None else self.scheduler.sla.admission_slack(seq.request_id)

    def _count_tokens(self, output: SchedulerOutput) -> None:
        """Call before postprocess: prefill tokens (recomputation included) and sampled tokens."""
        for entry in output.scheduled:
            if entry.seq.is_prefilling:
                self.stats.prompt_tokens += entry.num_new_tokens
            self.stats.generation_tokens += entry.needs_sample

    def _count_step(self, start: float, launched: float, returned: float, budget: int | None) -> None:
        s = self.stats
        budget = self.engine_config.token_budget if budget is None else budget
        s.token_budget_changes += s.steps > 0 and budget != s.token_budget
        s.token_budget = budget
        s.steps += 1
        s.host_seconds += (launched - start) + (time.perf_counter() - returned)
        s.device_seconds += returned - launched
        s.compiled_programs = self.runner.num_compiled
        s.compiled_after_warmup = self.runner.num_compiled - self._warm_programs
        self.refresh_stats()

    def refresh_stats(self) -> None:
        """Brings the queue and page counts in `stats` up to date (steps do it; aborts do not)."""
        s = self.stats
        s.running, s.waiting = self.scheduler.num_running, self.scheduler.num_waiting
        s.free_pages = self.scheduler.num_free_pages
        s.cached_pages = self.scheduler.num_cached_pages
        s.preemptions = self.scheduler.num_preemptions
        s.prefix_cache_queries = self.scheduler.prefix_cache_queries
        s.prefix_cache_hits = self.scheduler.prefix_cache_hits
        if self.scheduler.sla is not None:
            s.deferred_decodes = self.scheduler.sla.deferred_decodes
            s.prompts_past_deadline = self.scheduler.sla.prompts_past_deadline
