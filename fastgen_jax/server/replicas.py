"""Replicas behind one server: R engines, each on its own device group, and a cache-aware load balancer.

Each replica is a whole `LLMEngine` (its own scheduler, KV pool, prefix cache and compiled programs)
driven by its own `AsyncEngine` thread; JAX releases the GIL while a step runs, so the replicas compute
at the same time. `ReplicaRouter` offers the `AsyncEngine` interface the handlers use and sends each
submitted group to one replica:

- **Least outstanding work**: the tokens a replica's admitted requests still need (prompts not yet
  answered, less what the prefix cache is expected to serve, plus tokens still allowed to be
  generated), then the fewest requests, then the lowest index. Unlike round robin this keeps a replica
  that drew long prompts from being handed more while its neighbour idles.
- **Cache-aware** (SGLang's router does the same; on unless `cache_aware=False`): the router keeps a
  `PrefixIndex`, an approximate map from the content keys of the full prompt pages it has routed to the
  replica it sent them to. A request whose prompt starts with pages sent to replica r is expected to
  skip those tokens there, so r is charged that much less: the request goes to the replica where
  outstanding work minus expected savings is least. The margin by which a cached replica may be busier
  than the least-loaded one is therefore bounded by the tokens it would save; beyond it, least work
  wins. The index is never asked of the replicas (it may be stale when one evicted pages; then the
  request merely computes its prompt), and it forgets its least recently used keys beyond a bound.

A replica that is full or stopped is skipped, and one that is not ready (its last forward pass
failed) is chosen only when no ready replica has room: it has no outstanding work, so it would otherwise
win every pick and fail everything while the healthy ones idle. One replica is the common case and goes
through the same code.
"""

from __future__ import annotations

import collections
import functools
import threading
from collections.abc import Callable

from fastgen_jax.engine.page_allocator import page_keys
from fastgen_jax.llm_engine import LLMEngine
from fastgen_jax.server.async_engine import (
    AsyncEngine,
    EngineStoppedError,
    FinishHook,
    GenerationRequest,
    QueueFullError,
    RequestGroup,
)


class PrefixIndex:
    """Which replica each routed full prompt page (by content key hash) was last sent to."""

    def __init__(self, page_size: int, capacity: int = 1 << 18):
        self.page_size, self.capacity = page_size, capacity
        self._owner: collections.OrderedDict[int, int] = collections.OrderedDict()

    def keys(self, request: GenerationRequest) -> list[int]:
        """Hashes of the pages an engine could serve from its cache (all but the last token's)."""
        ids = request.prompt_token_ids
        usable = ids[: (len(ids) - 1) // self.page_size * self.page_size]
        return [hash(k) for k in page_keys(usable, self.page_size, request.cache_salt)]

    def match(self, keys: list[int]) -> tuple[int | None, int]:
        """(replica holding the longest routed prefix of `keys`, its length in pages)."""
        owner, depth = None, 0
        for key in keys:
            replica = self._owner.get(key)
            if replica is None:
                break
            owner, depth = replica, depth + 1
        return owner, depth

    def record(self, keys: list[int], replica: int) -> None:
        for key in keys:
            self._owner[key] = replica
            self._owner.move_to_end(key)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)

    def __len__(self) -> int:
        return len(self._owner)


class ReplicaRouter:
    """`AsyncEngine`'s interface over several of them."""

    def __init__(
        self,
        engines: list[LLMEngine],
        max_queue: int = 1024,
        on_finish: FinishHook | None = None,
        cache_aware: bool = True,
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
        config = engines[0].engine_config
        use_index = cache_aware and config.enable_prefix_caching and len(engines) > 1
        self.index = PrefixIndex(config.page_size) if use_index else None
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

    async def reset_prefix_cache(self) -> int:
        """Forgets every replica's cached prefix pages; returns how many pages were forgotten."""
        with self._lock:
            if self.index is not None:
                self.index = PrefixIndex(self.index.page_size, self.index.capacity)
        counts = [await r.call(LLMEngine.reset_prefix_cache) for r in self.replicas if r.accepting]
        return sum(counts)

    def submit(self, requests: list[GenerationRequest], max_pending: int | None = None) -> RequestGroup:
        """Queues the group on the replica chosen as the module docstring says; QueueFullError when
        every one is full."""
        keys = self.index.keys(requests[0]) if self.index is not None and requests else []
        with self._lock:
            # A replica whose last step failed still takes requests when no ready one has room.
            serving = [i for i, r in enumerate(self.replicas) if r.accepting]
            if not serving:
                raise EngineStoppedError("no replica is serving")
            open_ = [i for i in serving if self.replicas[i].has_room(len(requests))]
            if not open_:
                total = sum(self.replicas[i].num_outstanding for i in serving)
                raise QueueFullError(f"every replica is full ({total} requests in flight); retry later")
            owner, depth = self.index.match(keys) if keys else (None, 0)
            expected = _expected_hits(requests, depth * self.index.page_size if keys else 0)

            def cost(i: int) -> tuple[bool, int, int, int]:
                r = self.replicas[i]
                saved = sum(expected) if i == owner else 0
                return not r.ready, r.outstanding_work - saved, r.num_outstanding, i

            chosen = min(open_, key=cost)
            group = self.replicas[chosen].submit(requests, max_pending, expected if chosen == owner else None)
            if self.index is not None:
                self.index.record(keys, chosen)
            return group


def _expected_hits(requests: list[GenerationRequest], cached: int) -> list[int]:
    """Prompt tokens each request of a group is expected to skip where its first prompt's `cached`
    tokens are cached: the choices that share the first prompt (and salt) skip them, others nothing."""
    first = requests[0]
    return [
        cached if r.prompt_token_ids == first.prompt_token_ids and r.cache_salt == first.cache_salt else 0
        for r in requests
    ]
