"""The engine: the only module that wires scheduler, step planner, model runner and output processing.

One `step()`:

1. `Scheduler.schedule()` picks this pass's tokens under the token budget: one for every decoding
   sequence, then prompt chunks in arrival order (Dynamic SplitFuse), evicting when KV pages run out.
   With `adaptive_budget` the `BudgetController` first picks this step's budget among the compiled
   buckets, and afterwards learns from the step's measured time.
2. `StepPlanner.build()` packs them into a `StepPlan`: every array the step reads (token slab,
   attention metadata, sampling settings), static-shaped (a bucket of T rows, W page columns).
3. `ModelRunner.execute()` runs the precompiled program for (T, W): the model writes the new K/V into
   the donated page pool, computes logits only for the rows that need a token, and samples on device.
   The call returns at once; the step blocks only when it reads the sampled ids back.
   Rows of requests with structured outputs get a token bitmask from `GuidedDecoder` (built at
   launch, `_token_bitmask`, only when such a row samples); the sampler applies it on device.
4. `Scheduler.postprocess()` advances every sequence (`GuidedDecoder` each constrained one's
   matcher); each request's `RequestState` detokenizes its new token and checks stop conditions, and
   finished sequences give their pages back at once.

Each request is one `Request` record here: its `Sequence` (tokens, pages: what the scheduler runs)
and its `RequestState` (detokenizer, stop conditions), created and dropped together; the sequence
carries the request's `RequestTiming` (`engine.timing`: its SLA, arrival and token times). Times
come from one clock, `time.monotonic`: a step's outputs carry the time the step handed them out
(`RequestOutput.time`, after detokenizing and stop checks), and that same instant goes into each
request's timing record once per token handed out, which the budget controller, the "sla" policy
and the server's SLA judge (through `RequestOutput.timing`) all read.

Overlap (`EngineConfig.async_scheduling`, the default; `--noasync_scheduling` turns it off). While
step N runs on the device the host schedules, plans and launches step N+1, assuming every running
sequence survives step N and gets one token (the scheduler counts N's tokens as computed and its
samples as pending). A decode of step N+1 whose input is N's sampled token names N's slot
(`StepPlan.previous_slot`) and the compiled step gathers the token from N's output on the device, so
the launch never waits for the host. Then N's tokens are read back and processed (detokenize, stop
checks) while N+1 computes. A sequence that finished in N (a stop, EOS, its length) or was aborted
wasted its N+1 row: the row is discarded and the pages were freed when it finished (the device runs
steps in order, so a page freed after N+1 launched is reused only by a later step). A sequence
preempted while N ran keeps N's token and recomputes it. Prefix-cache pages are indexed only once the
step that wrote them has been read back. If reading step N fails, step N+1 (which took N's donated
KV cache and tokens) fails with it: both are rolled back and one StepError names both steps' requests.
The budget controller decides from one-step-old timings. When N+1 is launched (`launch_timing`;
"auto": late under policy "sla", early otherwise): late and given an `intake` (the server's), just
before N is predicted to end, after taking the requests that arrived while N ran, so they are in N+1
rather than N+2 (`engine.launch`); otherwise as N starts.

Work whose next step needs step N's result on the host must sit out one overlapped step: a grammar
mask (the allowed tokens of N+1 depend on N's token), speculative proposals (the proposal continues
from N's tokens), a composer that may skip a decode on what N produced. The rule for such features:
the sequence is flagged `Sequence.needs_host_sync` and the scheduler leaves it out of the step
composed while its token of step N is in flight (it is scheduled in N+2, after N's results are
processed, at the cost of one step of its latency), or overlap is turned off while it matters.
Requests with structured outputs are flagged so, and while any is in the engine, steps do not
overlap (`_overlaps`): otherwise a constrained sequence would decode only every other step, halving
its speed, where running steps one at a time costs the others only the host's share of a step.

Speculative decoding (`EngineConfig.speculative`, `engine.speculative`): after the scheduler composes
a step, the `Speculator` gives decodes draft tokens out of the budget left idle; the plan gives their
rows logit rows, the device verifies them (`sampler.verify`) and returns how many tokens each slot
emits, and postprocessing appends them all and trims the rejected drafts' KV. A sequence verifying
drafts sits out a step composed beside it, and steps do not overlap while a draft is being verified
or a sequence worth speculating for has a proposal ready (`Speculator.hold_next_step`); otherwise
they do.

Everything here runs on one thread; a server drives `add_request` / `step` / `abort` from its engine
loop and hands the `RequestOutput`s to its clients.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC

import numpy as np

from fastgen_jax import distributed
from fastgen_jax.checkpoints import Checkpoint, load_checkpoint
from fastgen_jax.config import EngineConfig
from fastgen_jax.engine import (
    BudgetController,
    RequestError,
    RequestSLA,
    Scheduler,
    SchedulerOutput,
    Sequence,
    SequenceStatus,
    StepPlan,
    StepPlanner,
    StepTimeModel,
    check_request,
)
from fastgen_jax.engine.budget import observe_step
from fastgen_jax.engine.launch import LateLaunch
from fastgen_jax.engine.speculative import NgramProposer, Speculator
from fastgen_jax.output_processor import RequestOutput, RequestState
from fastgen_jax.runner import ModelRunner, default_dtype, enable_compilation_cache
from fastgen_jax.sampling_params import SamplingParams
from fastgen_jax.structured import GuidedDecoder, StructuredOutputsError

_FINISH_STATUS = {
    "stop": SequenceStatus.FINISHED_STOPPED,
    "length": SequenceStatus.FINISHED_LENGTH,
    "abort": SequenceStatus.FINISHED_ABORTED,
}


class StepError(RuntimeError):
    """A forward pass failed (the cause is chained). `request_ids` were in it; the engine is consistent
    and can go on: their tokens were not advanced, and the next step schedules them again unless they
    are aborted."""

    def __init__(self, request_ids: list[str]):
        super().__init__(f"a forward pass of {len(request_ids)} request(s) failed")
        self.request_ids = request_ids


@dataclasses.dataclass
class Request:
    """One request in the engine: the sequence the scheduler runs and the state that turns its tokens
    into output (the tokens themselves live in `seq` only)."""

    seq: Sequence
    output: RequestState


@dataclasses.dataclass
class _Launched:
    """A step on the device: what was scheduled, its plan, and its results (device arrays, unread)."""

    output: SchedulerOutput
    plan: StepPlan
    sampled: tuple
    budget: int | None
    has_drafts: bool = False  # some slot verifies draft tokens (speculative decoding)
    launched_at: float = 0.0  # time.monotonic() when the launch returned


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
    spec_proposed_tokens: int = 0  # speculative decoding: draft tokens the target verified
    spec_accepted_tokens: int = 0  # of those, accepted
    spec_verifications: int = 0  # sequence-steps that verified at least one draft token


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
        self.limits = self.runner.limits
        self.max_model_len = self.limits.max_model_len
        self.scheduler = Scheduler(
            self.engine_config, num_pages=self.limits.num_pages, max_model_len=self.limits.max_model_len
        )
        one_width = self.runner.attention.cost_follows_context  # then W costs nothing: compile one
        self.planner = StepPlanner.for_scheduler(self.scheduler, one_width)
        self.budget_controller = (
            BudgetController(_budget_choices(self.engine_config.token_buckets))
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
        self.speculator = self._speculator(checkpoint)
        self._requests: dict[str, Request] = {}
        self._in_flight: _Launched | None = None  # launched, tokens not yet read (overlap only)
        late = self.engine_config.launches_late  # then, given an intake, `_late` says when to launch
        self._late = LateLaunch(self.engine_config.token_budget) if late else None
        self._last_done = -math.inf  # when the last step's tokens were handed out
        self.guided = GuidedDecoder(
            self.tokenizer.to_json(), checkpoint.config.vocab_size, self.eos_token_ids
        )
        self._ids = itertools.count()
        self.stats = EngineStats(
            total_pages=self.limits.num_pages - 1, token_budget=self.engine_config.token_budget
        )
        self.refresh_stats()
        self._warm_programs = 0
        # bucket -> seconds of an empty step, every row real and none (`_empty_step_seconds`)
        self._empty_steps: tuple[dict[int, float], dict[int, float]] | None = None
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

    def _speculator(self, checkpoint: Checkpoint) -> Speculator | None:
        """The proposer `engine_config.speculative` names, wrapped in the host-side `Speculator`."""
        c = self.engine_config
        if c.speculative == "off":
            return None
        if c.speculative == "ngram":
            proposer = NgramProposer(c.ngram_min, c.ngram_max)
        else:
            from fastgen_jax.speculative_draft import DraftProposer

            proposer = DraftProposer.for_target(self, checkpoint)
        return Speculator(
            proposer, c.num_speculative_tokens, c.verification_rows, c.token_buckets, c.async_scheduling
        )

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
        pages only when their `cache_salt` is equal (None is a salt like any other). `sla` is the
        request's own SLA (default: the engine's; the budget controller, the "sla" policy and the
        server's judge all go by it), `arrival_time` (time.monotonic) when its SLA's clock started
        (default: now)."""
        params = (sampling_params or SamplingParams()).with_seed()
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise RequestError(f"prompt must be a string, got {type(prompt).__name__}")
            prompt_token_ids = self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt_token_ids]
        self.check_prompt(ids)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        max_tokens = min(params.max_new_tokens, self.max_model_len - len(ids))
        if params.structured_outputs is not None:
            self._add_guided(request_id, params)
        seq = Sequence(request_id, ids, max_tokens, params, cache_salt=cache_salt)
        seq.needs_host_sync = params.structured_outputs is not None  # its mask needs its last token
        self.scheduler.add(seq, sla, arrival_time)
        state = RequestState(
            request_id, len(ids), params, self.tokenizer, self.max_model_len, self.eos_token_ids
        )
        self._requests[request_id] = Request(seq, state)
        return request_id

    def _add_guided(self, request_id: str, params: SamplingParams) -> None:
        spec = params.structured_outputs
        if distributed.is_multiprocess():
            raise RequestError("structured outputs are not supported in a multi-host group", spec.param)
        try:
            self.guided.add(request_id, spec)
        except StructuredOutputsError as error:
            raise RequestError(str(error), error.param) from None

    def check_prompt(self, ids: list[int], max_new_tokens: int = 1) -> None:
        """Raises RequestError unless `ids` plus `max_new_tokens` generated tokens fit the engine
        (`engine.check_request` against `self.limits`, the check the server runs too)."""
        check_request(self.limits, ids, max_new_tokens)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stops a request now and frees its KV pages; None if it is unknown or already done."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        self.scheduler.abort(request_id)
        self.guided.remove(request_id)
        if self.speculator is not None:
            self.speculator.forget(request_id)
        out = request.output.abort()
        out.time, out.timing = time.monotonic(), request.seq.timing
        return out

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def reset_prefix_cache(self) -> int:
        """Forgets every cached prefix page (benchmarks start cold with it); returns how many."""
        forgotten = self.scheduler.reset_prefix_cache()
        self.refresh_stats()
        return forgotten

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    # ------------------------------------------------------------------ stepping

    def wait_until_ready(self) -> None:
        """Returns once the KV pools (the draft model's too) are zeroed (`ModelRunner.wait_until_ready`)."""
        self.runner.wait_until_ready()
        draft_runner = getattr(self.speculator and self.speculator.proposer, "runner", None)
        if draft_runner is not None:
            draft_runner.wait_until_ready()

    def warmup(self, progress: bool = True) -> None:
        """Compiles one program per (token bucket, page-table width): none is compiled later."""
        plans = (self.planner.padding(bucket, width) for bucket, width in self.planner.shapes())
        self.runner.warmup(plans, progress=progress)
        self._warm_programs = self.runner.num_compiled
        draft_warmup = getattr(self.speculator and self.speculator.proposer, "warmup", None)
        if draft_warmup is not None:  # a draft model's programs count against start-up too
            draft_warmup(progress)
        if self.budget_controller is not None or self.scheduler.sla is not None:
            self._profile_buckets()
        if self.speculator is not None:
            self._profile_for_speculation()

    def _profile_buckets(self) -> None:
        """Seeds the step-time model with each bucket's time for a step with every row real and with
        none (no context either way), so it knows from the start what padding costs on this device."""
        model = self._step_model()
        full, none = self._empty_step_seconds()
        for bucket in full:
            model.seed(bucket, full[bucket], none[bucket])

    def _step_model(self) -> StepTimeModel:
        """The step-time model the budget controller and the SLA composer share."""
        return self.budget_controller.model if self.budget_controller else self.scheduler.sla.model

    def _profile_for_speculation(self) -> None:
        """Seeds the speculator's device time per bucket, and what a real row costs (nothing where a
        step costs its bucket; on the CPU kernels, which multiply only real rows, a draft row costs
        even inside the bucket the step pads to anyway): from the largest bucket, where a timing's
        noise weighs least per row."""
        full, none = self._empty_step_seconds()
        self.speculator.step_seconds.update(full)
        top = max(full)
        self.speculator.row_seconds = max(0.0, full[top] - none[top]) / top

    def _empty_step_seconds(self) -> tuple[dict[int, float], dict[int, float]]:
        """Each bucket's time for a step with no context (best of two), with every row real and with
        none, measured once and shared: a plan with no sequence whose projections still multiply
        every row, and a plain padding plan (whose rows the CPU kernels skip)."""
        if self._empty_steps is None:
            width = self.planner.page_table_widths[0]
            self._empty_steps = {}, {}
            for bucket in self.planner.token_buckets:
                for timed, full_rows in zip(self._empty_steps, (True, False), strict=True):
                    plan = self.planner.padding(bucket, width, full_rows=full_rows)
                    times = []
                    for _ in range(2):
                        start = time.monotonic()
                        np.asarray(self.runner.execute(plan)[0])
                        times.append(time.monotonic() - start)
                    timed[bucket] = min(times)
        return self._empty_steps

    def probe(self) -> None:
        """Runs one all-padding step of the smallest shape and waits for it: raises if the device
        cannot run a step (after a failure, this tells a broken device from a bad batch)."""
        bucket, width = min(self.planner.shapes())
        np.asarray(self.runner.execute(self.planner.padding(bucket, width))[0])

    def follow(self) -> int:
        """Multi-host, on every process but the leader: runs the leader's steps until it shuts down
        (see `fastgen_jax.distributed`); returns the number of steps run."""
        return self.runner.follow(self.planner.padding)

    def close(self) -> None:
        """Multi-host, on the leader: releases the followers. A no-op in a single process."""
        self.runner.stop_followers()

    def step(self, intake: Callable[[], object] | None = None) -> list[RequestOutput]:
        """Returns what one forward pass produced for each request it sampled. With
        `async_scheduling` (overlap) it first launches the next step, then reads this one back (see
        the module docstring); otherwise it launches a step and reads it back. `intake` (the
        server's) adds the requests that arrived since the last call, and aborts, before a step is
        composed while another runs: with `launch_timing="late"` the next step is launched just
        before the one in flight is predicted to end (`engine.launch`), with them."""
        start = time.monotonic()
        if self._in_flight is None:
            self._in_flight = self._launch()
            if self._in_flight is None:
                return []
        current = self._in_flight
        # Overlap: step N+1 is scheduled, planned and launched before step N's tokens are read. If
        # this raises (StepError for N+1's requests), N stays in flight for the next call.
        waited = 0.0  # seconds a late launch waited for the step in flight (device time, not host)
        if self._overlaps():
            waited = self._launch_next(current, intake)
        else:
            self._in_flight = None
        launched = time.monotonic()
        tokens, logprobs, top, emitted = self._read(current)
        returned = time.monotonic()
        if self._late is not None:
            self._late.read(current.plan.bucket, current.output, current.launched_at, returned)
        slot_tokens = _slot_tokens(current, tokens, emitted)
        self.scheduler.postprocess(current.output, slot_tokens)
        if self.speculator is not None:
            self.speculator.observe(current.output, slot_tokens)
        results = self._process_samples(current, slot_tokens, logprobs, top)
        done = time.monotonic()  # the time of these tokens, for the budget controller and the SLA judge
        for result in results:  # the tokens handed out (a stop drops the rest of a step's drafts)
            result.time = done
            result.timing.tokens(len(result.new_token_ids), done)
        self.stats.generation_tokens += sum(len(r.new_token_ids) for r in results)
        self._count_step(start, launched, returned, current.budget, waited)
        if self.speculator is not None:
            self.speculator.observe_host((launched - start - waited) + (done - returned))
        if self.budget_controller is not None or self.scheduler.sla is not None:
            # With overlap the model learns token gaps: a step launched before the last one's tokens
            # were handed out gave its decodes a gap from then, the caller's time between calls
            # included (one step at a time, it learns the call)
            begun = self._last_done if current.launched_at < self._last_done else start
            observe_step(self._step_model(), current.plan.bucket, current.output, done - begun)
        self._last_done = done
        if not self._requests and self._in_flight is not None:
            self._discard_in_flight()
        return results

    def _launch_next(self, current: _Launched, intake: Callable[[], object] | None) -> float:
        """Launches the step after `current` while it runs: at once, or (late, with an intake) just
        before it is predicted to end, with what arrived meanwhile. Returns the seconds it waited."""
        late = self._late if intake is not None else None
        if late is None:
            self._in_flight = self._launch()
            return 0.0
        end = late.predicted_end(current.plan.bucket, current.output, current.launched_at)
        began = time.monotonic()
        late.wait(end, getattr(current.sampled[0], "is_ready", None), current.launched_at)
        waited = time.monotonic() - began
        intake()
        late.poll()
        # the "sla" composer predicts from the real remainder, once there is a prediction
        self.scheduler.in_flight_end = late.expected_end(end) if late.model.observed else None
        try:
            self._in_flight = self._launch()
        finally:
            self.scheduler.in_flight_end = None
        late.poll()
        late.launched(time.monotonic() - began - waited)
        return waited

    def _overlaps(self) -> bool:
        """Whether to launch the next step before reading this one: overlap is on, no request
        has structured outputs and none is worth speculating for (see the module docstring)."""
        if not self.engine_config.async_scheduling or len(self.guided):
            return False
        return self.speculator is None or not self.speculator.hold_next_step()

    def _launch(self) -> _Launched | None:
        """Schedules, plans and launches a step (not waiting for it); None when there is nothing to do."""
        budget = self._choose_budget()
        output = self.scheduler.schedule(budget)
        if output.is_empty:
            return None
        try:
            if self.speculator is not None:
                self.speculator.extend(self.scheduler, output)
            plan = self.planner.build(output)
            self.runner.compile(plan)  # a no-op unless warm-up was skipped
            sampled = self.runner.execute(plan, self._token_bitmask(output, plan))
        except Exception as error:
            self.scheduler.abandon(output)  # so the engine can go on once the caller has dealt with it
            raise StepError([e.seq.request_id for e in output.scheduled]) from error
        except BaseException:
            self.scheduler.abandon(output)
            raise
        self._count_tokens(output)
        return _Launched(output, plan, sampled, budget, plan.has_drafts, time.monotonic())

    def _read(self, launched: _Launched) -> tuple[np.ndarray, np.ndarray, tuple | None, np.ndarray | None]:
        """Waits for a step's tokens and log-probabilities (top ones only when some request asks;
        the tokens each slot emitted only when some slot verified drafts). If it failed, the step
        after it (which took its KV cache and tokens) failed too: both are rolled back and one
        StepError names the requests of both."""
        tokens, logprobs, top_ids, top_logprobs, num_emitted = launched.sampled
        try:
            tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)  # the one wait for the device
            emitted = np.asarray(num_emitted) if launched.has_drafts else None
            top = None
            if launched.plan.sampling.logprobs.any() and any(
                e.seq.sampling_params.top_logprobs for e in launched.output.scheduled
            ):
                top = np.asarray(top_ids), np.asarray(top_logprobs)  # copied only when asked for
        except BaseException as error:
            failed = [launched] if self._in_flight is None else [launched, self._in_flight]
            self._in_flight = None
            for step in reversed(failed):  # newest first
                self.scheduler.abandon(step.output)
            if not isinstance(error, Exception):
                raise
            raise StepError([e.seq.request_id for step in failed for e in step.output.scheduled]) from error
        return tokens, logprobs, top, emitted

    def _discard_in_flight(self) -> None:
        """Waits for the step in flight when no request is left: it holds only discarded work."""
        launched, self._in_flight = self._in_flight, None
        tokens, _, _, emitted = self._read(launched)
        self.scheduler.postprocess(launched.output, _slot_tokens(launched, tokens, emitted))

    def _choose_budget(self) -> int | None:
        if self.budget_controller is None:
            return None
        return self.budget_controller.choose_for(self.scheduler.running)

    def _token_bitmask(self, output: SchedulerOutput, plan: StepPlan) -> np.ndarray | None:
        """The token bitmask of a step in which a constrained sequence samples, else None. Its
        matcher has seen every token it sampled: such a sequence sits out the step composed while its
        last token was in flight (`Sequence.needs_host_sync`)."""
        if not len(self.guided):
            return None
        first_rows = plan.sampling.cu_logit_rows  # a constrained slot never has drafts: one row
        rows = [
            (int(first_rows[i]), e.seq.request_id)
            for i, e in enumerate(output.scheduled)
            if e.needs_sample and e.seq.request_id in self.guided
        ]
        return self.guided.bitmask(rows, plan.num_logit_rows) if rows else None

    def _process_samples(
        self,
        launched: _Launched,
        slot_tokens: list,
        logprobs: np.ndarray,
        top: tuple[np.ndarray, np.ndarray] | None,
    ) -> list[RequestOutput]:
        """Hands each slot's sampled token (or the tokens it emitted after verifying drafts) to its
        request's output state."""
        results = []
        first_rows = launched.plan.sampling.cu_logit_rows
        for i, entry in enumerate(launched.output.scheduled):
            if not entry.needs_sample or entry.seq.is_finished:  # finished: extra work of an overlap
                continue
            state = self._requests[entry.seq.request_id].output
            state.num_cached_tokens = max(0, entry.seq.num_cached_tokens)
            tokens = slot_tokens[i] if entry.draft_token_ids else [slot_tokens[i]]
            rows = range(int(first_rows[i]), int(first_rows[i]) + len(tokens))
            k = entry.seq.sampling_params.top_logprobs
            tops = None
            if k and top is not None:
                tops = [_top_pairs(top, r, k) for r in rows]
            self.guided.advance(entry.seq.request_id, int(tokens[0]))  # constrained: one token, no drafts
            result = state.add_tokens([int(t) for t in tokens], [float(logprobs[r]) for r in rows], tops)
            result.timing = entry.seq.timing
            if state.finished:
                self.scheduler.finish(entry.seq, _FINISH_STATUS[state.finish_reason])
                del self._requests[entry.seq.request_id]
                self.guided.remove(entry.seq.request_id)
                if self.speculator is not None:
                    self.speculator.forget(entry.seq.request_id)
            results.append(result)
        return results

    def _count_tokens(self, output: SchedulerOutput) -> None:
        """Call at launch: prefill tokens (recomputation included). Generated tokens are counted as
        they are handed out (an overlapped step's discarded samples are not)."""
        for entry in output.scheduled:
            if entry.start_position < entry.seq.num_prefill_tokens:
                self.stats.prompt_tokens += entry.num_new_tokens

    def _count_step(
        self, start: float, launched: float, returned: float, budget: int | None, waited: float = 0.0
    ) -> None:
        s = self.stats
        budget = self.engine_config.token_budget if budget is None else budget
        s.token_budget_changes += s.steps > 0 and budget != s.token_budget
        s.token_budget = budget
        s.steps += 1
        s.host_seconds += (launched - start - waited) + (time.monotonic() - returned)
        s.device_seconds += returned - launched + waited
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
        if self.speculator is not None:
            spec = self.speculator.stats
            s.spec_proposed_tokens, s.spec_accepted_tokens = spec.proposed_tokens, spec.accepted_tokens
            s.spec_verifications = spec.verifications


def _slot_tokens(launched: _Launched, tokens: np.ndarray, emitted: np.ndarray | None) -> list:
    """Each scheduled slot's sampled token, or (a slot that verified drafts) the tokens it emitted."""
    n = launched.output.num_seqs
    if emitted is None:
        return tokens[:n].tolist()
    first = launched.plan.sampling.cu_logit_rows
    out = tokens[first[:n]].tolist()
    for i, entry in enumerate(launched.output.scheduled):
        if entry.draft_token_ids:
            out[i] = tokens[first[i] : first[i] + emitted[i]].tolist()
    return out


def _top_pairs(top: tuple[np.ndarray, np.ndarray], row: int, k: int) -> list[tuple[int, float]]:
    """The k likeliest (token, log-probability) pairs of one logit row."""
    return [(int(t), float(v)) for t, v in zip(top[0][row, :k], top[1][row, :k], strict=True)]


def _budget_choices(buckets: tuple[int, ...]) -> list[int]:
    """The budgets `--token_budget=auto` chooses among: the buckets from 16 up (the small ones are
    slabs for a few decoding sequences, not budgets that should cut prompts into pieces of 1-4)."""
    return [b for b in buckets if b >= 16] or list(buckets)
