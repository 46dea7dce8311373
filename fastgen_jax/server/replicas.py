"""Replicas behind one server: R engines, each on its own device group, and a least-work load balancer.

Each replica is a whole `LLMEngine` (its own scheduler, KV pool and compiled programs) driven by its
own `AsyncEngine` thread; JAX releases the GIL while a step runs, so the replicas compute at the same
time. `ReplicaRouter` offers the `AsyncEngine` interface the handlers use and sends each submitted group
to the replica with the least outstanding work: the tokens its admitted requests still need (prompts
not yet answered plus tokens still allowed to be generated), then the fewest requests, then the lowest
index. A replica that is full or stopped is skipped, and one whose last forward pass failed is chosen
only when no ready replica has room (it has no outstanding work, so it would otherwise win every pick
and fail everything while the healthy ones idle). Unlike round robin this keeps a replica that drew
long prompts from being handed more while its neighbour idles.

One replica is the common case and goes through the same code.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

from fastgen_jax.llm_engine import LLMEngine
from fastgen_jax.server.async_engine import (
    AsyncEngine,
    EngineStoppedError,
    FinishHook,
    GenerationRequest,
    QueueFullError,
    RequestGroup,
)


class ReplicaRouter:
    """`AsyncEngine`'s interface over several of them."""

    def __init__(
        self,
        engines: list[LLMEngine],
        max_queue: int = 1024,
        on_finish: FinishHook | None = None,
        step_timeout: float | None = None,
        on_stall: Callable[[int], None] | None = None,
    ):
        if not engines:
            raise ValueError("a router needs at least one engine")
        self.replicas = [
            AsyncEngine(e, max_queue, on_finish, step_timeout, on_stall and functools.partial(on_stall, i))
            for i, e in enumerate(engines)
        ]
        self.capacity = min(r.capacity for r in self.replicas)  # what one group may ask for
        self._lock = threading.Lock()  # one choice at a time, so two submits cannot pick on stale work

    def start(self) -> None:
        for r in self.replicas:
            r.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        threads = [threading.Thread(target=r.stop, args=(timeout,)) for r in self.replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    @property
    def alive(self) -> bool:
        """Liveness: every replica's engine thread runs (a failed step does not count; a stuck one does)."""
        return all(r.accepting for r in self.replicas)

    def readiness(self) -> list[dict]:
        """Each replica's state, for /ready."""
        return [
            {"replica": i, "ready": r.ready, "failed_steps": r.failed_steps}
            for i, r in enumerate(self.replicas)
        ]

    @property
    def num_outstanding(self) -> int:
        return sum(r.num_outstanding for r in self.replicas)

    def submit(self, requests: list[GenerationRequest], max_pending: int | None = None) -> RequestGroup:
        """Queues the group on the least-loaded ready replica; QueueFullError when every one is full."""
        with self._lock:
            # A replica whose last step failed still takes requests when no ready one has room.
            serving = [r for r in self.replicas if r.accepting]
            if not serving:
                raise EngineStoppedError("no replica is serving")
            open_ = [r for r in serving if r.has_room(len(requests))]
            if not open_:
                total = sum(r.num_outstanding for r in serving)
                raise QueueFullError(f"every replica is full ({total} requests in flight); retry later")
            chosen = min(open_, key=lambda r: (not r.ready, r.outstanding_work, r.num_outstanding))
            return chosen.submit(requests, max_pending)
