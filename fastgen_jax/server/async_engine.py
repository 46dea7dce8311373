"""Runs one `LLMEngine` on a background thread and lets asyncio handlers stream from it.

The engine is single-threaded by design; this module is the only bridge to it. A handler calls
`AsyncEngine.submit(requests)` and iterates the `RequestGroup` it returns: the requests go to the
engine thread through a thread-safe command queue, and their outputs come back on the handler's own
asyncio queue. The engine
thread loops:

1. take every pending command (add, abort, stop), sleeping on the queue while there is no work, so an
   idle server uses no CPU;
2. run one `step()`;
3. post the step's outputs to each event loop with a single `call_soon_threadsafe`.

A handler never waits on a step, only on its queue, and the engine never waits on a handler. A handler
that stops iterating (client gone, stream cancelled) aborts what it still has running in `finally`;
the abort frees the KV pages at the engine thread's next turn. Admission is bounded: at most
`max_num_seqs + max_queue` requests are in the engine at once, and more raise `QueueFullError` at
once instead of waiting. A handler's queue is bounded too (`max_pending`): a stream whose client stops
reading would otherwise buffer every token while its pages stay held, so past the bound the group is
aborted at once, its buffered outputs dropped, and the handler finds `ClientTooSlowError` when it
next reads.

Failures. A forward pass that raises fails only the requests that were in it (`StepError`); the
others stay queued. The replica is then not ready (`last_step_failed`) until a step works again; when
no traffic comes to make one, the thread probes the device itself (`LLMEngine.probe`) with a growing
pause. With `step_timeout`, a watchdog thread notices a step far past its time (a multi-host
collective whose peer died never returns and cannot be cancelled): it fails the replica's requests,
marks it dead and calls `on_stall`, which in `serve` exits the process so that it is restarted. A
replica whose every step and probe has failed for `step_timeout` seconds (a peer that died and made
the collectives raise) is given up the same way.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from fastgen_jax.engine.sla_policy import RequestSLA
from fastgen_jax.llm_engine import LLMEngine, StepError
from fastgen_jax.output_processor import RequestOutput
from fastgen_jax.sampling_params import SamplingParams

log = logging.getLogger("fastgen_jax.server")


class QueueFullError(RuntimeError):
    """The server holds as many requests as it may; the client should retry later."""


class EngineStoppedError(RuntimeError):
    """The engine thread is stopping or has died; no new requests are taken."""


class EngineStepError(RuntimeError):
    """A forward pass failed; the requests in it are ended with this error."""


class ClientTooSlowError(RuntimeError):
    """The client left too many outputs unread; its requests were aborted and their pages freed."""


PROBE_PAUSES = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # seconds before each probe of a failed replica


class OutputQueue(asyncio.Queue):
    """A handler's queue that holds at most `max_pending` outputs: one more and it drops what it holds,
    keeps only a ClientTooSlowError and calls `on_overflow` (which aborts the group)."""

    def __init__(self, max_pending: int | None = None):
        super().__init__()
        self.max_pending, self.overflowed = max_pending, False
        self.on_overflow: Callable[[], None] = lambda: None

    def put_nowait(self, item) -> None:
        if self.overflowed:
            return
        super().put_nowait(item)
        if self.max_pending is not None and self.qsize() > self.max_pending:
            self.overflowed = True
            while not self.empty():
                self.get_nowait()
            super().put_nowait(
                ClientTooSlowError(
                    f"the client left more than {self.max_pending} outputs unread; the request was aborted"
                )
            )
            self.on_overflow()


@dataclasses.dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None = None  # prefix-cache pages are shared only among equal salts
    sla: RequestSLA | None = None  # its own SLA (None: the server's)


@dataclasses.dataclass
class _Tracked:
    """Engine-thread record of one request: where its outputs go, and the router's estimate of the
    work it has left. Its timings are the engine's (`RequestOutput.timing`), not kept here."""

    request: GenerationRequest
    index: int
    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue
    arrival: float  # when the server received it: the engine starts the request's SLA clock there
    # tokens still to process: the prompt (less what the prefix cache is expected to serve) until its
    # first token, then what is left to generate
    work: int = 0
    expected_cached: int = 0  # prompt tokens a router expects the prefix cache to serve

    def __post_init__(self):
        self.work = len(self.request.prompt_token_ids) + self.request.params.max_new_tokens


class RequestGroup:
    """Async iterator of (index in the submitted list, RequestOutput) until every request finishes.

    `close()` aborts whatever is still running; handlers call it in `finally`, and it also runs when
    the group is garbage-collected, so a response that never started cannot leak KV pages.
    """

    def __init__(self, commands: queue.SimpleQueue, requests: list[GenerationRequest], sink: OutputQueue):
        self._commands, self._requests, self._sink = commands, requests, sink
        self._remaining = set(range(len(requests)))
        sink.on_overflow = self.close

    def __aiter__(self) -> RequestGroup:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self._remaining and not self._sink.overflowed:  # an overflow left its error to read
            raise StopAsyncIteration
        item = await self._sink.get()
        if isinstance(item, BaseException):
            self.close()  # the rest of the group ends with it
            raise item
        index, out = item
        if out.finished:
            self._remaining.discard(index)
        return index, out

    def close(self) -> None:
        if self._remaining:
            self._commands.put(("abort", [self._requests[i].request_id for i in self._remaining]))
            self._remaining.clear()

    __del__ = close


FinishHook = Callable[[_Tracked, RequestOutput, float], None]


class AsyncEngine:
    """Owns the engine thread; every `LLMEngine` call happens on it."""

    def __init__(
        self,
        engine: LLMEngine,
        max_queue: int = 1024,
        on_finish: FinishHook | None = None,
        step_timeout: float | None = None,
        on_stall: Callable[[], None] | None = None,
    ):
        self.engine = engine
        self.capacity = engine.engine_config.max_num_seqs + max_queue
        self.on_finish = on_finish
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}  # engine thread only (and the watchdog, once it stalled)
        self._lock = threading.Lock()
        self._outstanding = 0  # admitted and not yet finished; guarded by _lock
        self._work = 0  # their `_Tracked.work`, summed; guarded by _lock
        self.routed = 0  # requests ever submitted (a router's tally)
        self._accepting = True
        self._held: collections.deque = collections.deque()  # commands `_intake` left for the loop
        self._intake_error: BaseException | None = None  # what taking commands in a step raised
        self.last_step_failed = False
        self.failed_steps = 0  # forward passes (and probes) that raised, ever
        self._probes = 0  # probes since the last failure
        self._probe_at: float | None = None  # when to probe the device next (after a failure)
        self.step_timeout, self.on_stall = step_timeout, on_stall
        self.stalled = False
        self._step_started: float | None = None  # monotonic start of the step running now
        self._failing_since: float | None = None  # first failure of the current streak
        self._thread = threading.Thread(target=self._run, name="fastgen-engine", daemon=True)

    # ------------------------------------------------------------------ lifecycle (any thread)

    def start(self) -> None:
        self._thread.start()
        if self.step_timeout is not None:
            threading.Thread(target=self._watch, name="fastgen-watchdog", daemon=True).start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stops taking requests, aborts those still running (their streams end) and joins."""
        with self._lock:
            self._accepting = False
        if self._thread.is_alive():
            self._commands.put(("stop", None))
            self._thread.join(timeout)

    @property
    def accepting(self) -> bool:
        """The thread runs and takes requests (a failed step does not stop it)."""
        return self._thread.is_alive() and self._accepting and not self.stalled

    @property
    def ready(self) -> bool:
        """Serving: accepting, and its last forward pass (or probe), if any, worked."""
        return self.accepting and not self.last_step_failed

    @property
    def num_outstanding(self) -> int:
        return self._outstanding

    @property
    def outstanding_work(self) -> int:
        """Tokens the admitted requests still need: prompts not yet answered (less the tokens a router
        expects the prefix cache to serve) plus tokens still allowed to be generated. What a load
        balancer compares."""
        return self._work

    def has_room(self, n: int) -> bool:
        return self._outstanding + n <= self.capacity

    # ------------------------------------------------------------------ handler side (event loop)

    def submit(
        self,
        requests: list[GenerationRequest],
        max_pending: int | None = None,
        expected_cached: list[int] | None = None,
    ) -> RequestGroup:
        """Queues `requests` to run together; raises QueueFullError or EngineStoppedError at once.
        More than `max_pending` outputs left unread abort the group (see `OutputQueue`).
        `expected_cached`: prompt tokens of each request the prefix cache is expected to serve (a
        router's estimate), left out of the outstanding work."""
        loop, sink = asyncio.get_running_loop(), OutputQueue(max_pending)
        arrival = time.monotonic()
        tracked = [_Tracked(r, i, loop, sink, arrival) for i, r in enumerate(requests)]
        for t, cached in zip(tracked, expected_cached or (), strict=False):
            t.expected_cached = min(cached, len(t.request.prompt_token_ids) - 1)
            t.work -= t.expected_cached
        with self._lock:  # the engine thread stops accepting under this lock, so no add is orphaned
            if not self.accepting:
                raise EngineStoppedError("the server is shutting down")
            if self._outstanding + len(requests) > self.capacity:
                raise QueueFullError(
                    f"the server is full ({self._outstanding} requests in flight, at most "
                    f"{self.capacity}); retry later"
                )
            self._outstanding += len(requests)
            self._work += sum(t.work for t in tracked)
            self.routed += len(requests)
            self._commands.put(("add", tracked))
        return RequestGroup(self._commands, requests, sink)

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Runs `fn(engine)` on the engine thread between two calls of `engine.step` (not during
        one) and returns its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if not self._accepting or not self._thread.is_alive():
                raise EngineStoppedError("the server is shutting down")
            self._commands.put(("call", (fn, future)))
        return await asyncio.wrap_future(future)

    def _release(self, t: _Tracked) -> None:
        with self._lock:
            self._outstanding -= 1
            self._work -= t.work
            t.work = 0

    @staticmethod
    def _progress(t: _Tracked, out: RequestOutput) -> int:
        """Takes what `out` did off `t.work` (engine thread only); returns that many tokens."""
        # the prompt is done with its first token
        answered = out.new_token_ids and out.generated_length == len(out.new_token_ids)
        prompt = out.prompt_length - t.expected_cached if answered else 0
        done = min(len(out.new_token_ids) + prompt, t.work)
        t.work -= done
        return done

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            while self._take_commands(block=not self.engine.has_unfinished(), timeout=self._until_probe()):
                if self.engine.has_unfinished():
                    self._step()
                    if (error := self._intake_error) is not None:  # as if the loop had taken them
                        self._intake_error = None
                        raise error
                elif self._probe_at is not None and time.monotonic() >= self._probe_at:
                    self._probe()
        except BaseException:  # noqa: BLE001 - the thread must hand every request an answer
            log.exception("engine thread died")
        finally:
            with self._lock:
                self._accepting = False
            self._end_all()

    def _intake(self) -> None:
        """Adds the requests and applies the aborts that came while a step ran, before the engine
        composes the next one (`LLMEngine.step`'s intake). From the first engine call or stop on,
        commands wait for the loop, between steps."""
        try:
            self._take_commands(block=False, during_step=True)
        except BaseException as error:  # noqa: BLE001 - raised by the loop after the step, as before
            self._intake_error = error

    def _take_commands(self, block: bool, timeout: float | None = None, during_step: bool = False) -> bool:
        """Applies pending commands (waiting up to `timeout` for one if `block`); False once told to stop."""
        took = False
        while True:
            if self._held and not during_step:
                kind, payload = self._held.popleft()
            else:
                if self._held:  # during a step, behind a held command: keep the order
                    break
                try:
                    kind, payload = self._commands.get(block=block and not took, timeout=timeout)
                except queue.Empty:
                    break
            took = True
            if during_step and kind in ("stop", "call"):
                self._held.append((kind, payload))
                break
            if kind == "stop":
                return False
            if kind == "add":
                self._add(payload)
            elif kind == "call":
                _call(self.engine, *payload)
            else:
                self._abort(payload)
        if took:
            self.engine.refresh_stats()
        return True

    def _add(self, tracked: list[_Tracked]) -> None:
        for t in tracked:
            r = t.request
            try:
                self.engine.add_request(
                    sampling_params=r.params,
                    request_id=r.request_id,
                    prompt_token_ids=r.prompt_token_ids,
                    cache_salt=r.cache_salt,
                    sla=r.sla,
                    arrival_time=t.arrival,
                )
            except Exception as error:  # noqa: BLE001 - answer the handler whatever went wrong
                self._release(t)
                self._post({t.loop: [(t.sink, error)]})
                continue
            self._tracked[r.request_id] = t

    def _abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            t = self._tracked.pop(rid, None)
            out = self.engine.abort(rid)
            if t is not None:
                self._release(t)
                if out is not None:
                    self._finished(t, out, time.monotonic())

    def _step(self) -> None:
        self._step_started = time.monotonic()
        try:
            outputs = self.engine.step(intake=self._intake)
        except Exception as error:  # noqa: BLE001 - fail the requests, keep serving
            self._step_failed(error)
            return
        finally:
            self._step_started = None
        self._recovered()
        now = time.monotonic()
        batches: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        done = sum(self._progress(t, out) for out in outputs if (t := self._tracked.get(out.request_id)))
        with self._lock:  # once a step, not once a token
            self._work -= done
        for out in outputs:
            t = self._tracked.get(out.request_id)
            if t is None:
                continue
            if out.finished:
                del self._tracked[out.request_id]
                self._release(t)
                self._finished(t, out, now)
            batches[t.loop].append((t.sink, (t.index, out)))
        self._post(batches)

    def _finished(self, t: _Tracked, out: RequestOutput, now: float) -> None:
        if self.on_finish is None:
            return
        try:
            self.on_finish(t, out, now)
        except Exception:  # noqa: BLE001 - bookkeeping must never stop the engine
            log.exception("finish hook failed for %s", out.request_id)

    # ------------------------------------------------------------------ failures (engine thread)

    def _step_failed(self, error: Exception) -> None:
        """Fails the requests that were in the failed step (all of them if the step failed before it
        knew which), logs the details against their ids, and schedules a probe."""
        ids = error.request_ids if isinstance(error, StepError) else list(self._tracked)
        cause = error.__cause__ if isinstance(error, StepError) and error.__cause__ else error
        log.error(
            "forward pass failed; failing its %d request(s) %s (%d others stay queued)",
            len(ids),
            ids[:8],
            max(len(self._tracked) - len(ids), 0),
            exc_info=cause,
        )
        self._mark_failed()
        self._fail(ids, EngineStepError("generation failed"))
        self.engine.refresh_stats()

    def _mark_failed(self) -> None:
        now = time.monotonic()
        self.last_step_failed = True  # /ready says 503 until a step or a probe works again
        self.failed_steps += 1
        self._failing_since = self._failing_since or now
        self._probe_at = now + PROBE_PAUSES[min(self._probes, len(PROBE_PAUSES) - 1)]
        if self.step_timeout is not None and now - self._failing_since > self.step_timeout:
            log.critical(
                "every step and probe has failed for over %g s; the replica is dead", self.step_timeout
            )
            self._give_up()

    def _recovered(self) -> None:
        self.last_step_failed, self._probe_at, self._probes, self._failing_since = False, None, 0, None

    def _until_probe(self) -> float | None:
        return None if self._probe_at is None else max(self._probe_at - time.monotonic(), 0.0)

    def _probe(self) -> None:
        self._probes += 1
        self._step_started = time.monotonic()  # the watchdog guards a probe like any step
        try:
            self.engine.probe()
        except Exception:  # noqa: BLE001 - still broken: try again later
            log.exception("probe step %d after a failure failed", self._probes)
            self._mark_failed()
            return
        finally:
            self._step_started = None
        log.warning("probe step worked; the replica serves again")
        self._recovered()

    def _fail(self, request_ids: list[str], error: BaseException) -> None:
        batches: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for rid in request_ids:
            t = self._tracked.pop(rid, None)
            self.engine.abort(rid)
            if t is not None:
                self._release(t)
                batches[t.loop].append((t.sink, error))
        self._post(batches)

    def _watch(self) -> None:
        """Watchdog thread: a step running past `step_timeout` is stuck for good (see the module
        docstring); fail every request (the engine thread is blocked, so nothing else touches them),
        stop accepting and call `on_stall`."""
        while self._thread.is_alive() and not self.stalled:
            started = self._step_started
            if started is not None and time.monotonic() - started > self.step_timeout:
                log.critical("a forward pass has run for over %g s; the replica is stuck", self.step_timeout)
                self._give_up()
                return
            time.sleep(min(self.step_timeout / 10, 1.0))

    def _give_up(self) -> None:
        """The replica is dead (stuck, or failing for step_timeout): fail every request, stop taking
        new ones (/health says 503) and call `on_stall`."""
        self.stalled = True
        batches: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        tracked = list(self._tracked.values())
        self._tracked.clear()  # should a stuck step ever return, its outputs go nowhere
        for t in tracked:
            self._release(t)
            batches[t.loop].append((t.sink, EngineStepError("the engine is stuck")))
        self._post(batches)
        if self.on_stall is not None:
            self.on_stall()

    def _end_all(self) -> None:
        """On stop: every request still running finishes with reason "abort"."""
        batches: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        now = time.monotonic()
        for rid, t in list(self._tracked.items()):
            self._release(t)
            try:
                out = self.engine.abort(rid)
            except Exception as error:  # noqa: BLE001 - still answer the handler
                batches[t.loop].append((t.sink, EngineStoppedError(f"the engine stopped: {error}")))
                continue
            if out is not None:
                self._finished(t, out, now)
                batches[t.loop].append((t.sink, (t.index, out)))
        self._tracked.clear()
        self._post(batches)
        self._drain_after_stop()

    def _drain_after_stop(self) -> None:
        """Answers adds that arrived after the stop command so that no handler waits forever."""
        while True:
            try:
                kind, payload = self._held.popleft() if self._held else self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "call" and payload[1].set_running_or_notify_cancel():
                payload[1].set_exception(EngineStoppedError("the server is shutting down"))
            if kind == "add":
                for t in payload:
                    self._release(t)
                    self._post({t.loop: [(t.sink, EngineStoppedError("the server is shutting down"))]})

    @staticmethod
    def _post(batches: dict[asyncio.AbstractEventLoop, list]) -> None:
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop has closed; nobody is listening
                pass


def _call(engine: LLMEngine, fn: Callable[[LLMEngine], Any], future: concurrent.futures.Future) -> None:
    if not future.set_running_or_notify_cancel():  # the caller gave up waiting: skip it
        return
    try:
        future.set_result(fn(engine))
    except Exception as error:  # noqa: BLE001 - the caller gets it
        future.set_exception(error)


def _deliver(items: list) -> None:
    for sink, item in items:
        sink.put_nowait(item)
