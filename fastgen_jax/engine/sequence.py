"""One request as the scheduler sees it: its tokens, how many have KV in the cache, and its pages.

A sequence computes tokens [num_computed_tokens, num_tokens) in order. While a step runs on the
device (and the next one is scheduled beside it) the token it samples is pending: counted in
`num_pending_tokens`, not yet in the token list. While
`num_computed_tokens < num_prefill_tokens` it is prefilling: it runs its prompt in chunks and only
the chunk that ends the prompt samples a token. After that it decodes: each step computes the KV of
its last token and samples the next one.

Preemption frees the pages and recomputes: `num_computed_tokens` drops to 0 and the "prompt" to
prefill becomes every token so far (prompt plus generated), so no generated token is lost.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

from fastgen_jax.engine.page_allocator import ROOT_HASH, PageKey, page_keys
from fastgen_jax.engine.timing import RequestTiming


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # EOS, a stop token or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or max_model_len
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self not in (SequenceStatus.WAITING, SequenceStatus.RUNNING)


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages that hold the KV of `num_tokens` tokens."""
    return -(-num_tokens // page_size)


class Sequence:
    """A request's token ids and KV bookkeeping. `sampling_params` is stored, never read, here.

    Slotted: the scheduler and the planner read several fields of every running sequence each step,
    right after the device step has left the caches cold; slots keep them in one small block."""

    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "output_token_ids",
        "_token_ids",
        "max_tokens",
        "sampling_params",
        "status",
        "arrival_index",
        "timing",
        "num_computed_tokens",
        "num_pending_tokens",
        "needs_host_sync",
        "num_draft_tokens",
        "num_prefill_tokens",
        "page_table",
        "page_table_row",
        "cache_salt",
        "num_cached_tokens",
        "_page_keys",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Iterable[int],
        max_tokens: int,
        sampling_params: Any = None,
        cache_salt: str | None = None,
    ):
        prompt = [int(t) for t in prompt_token_ids]
        if max_tokens < 1:
            raise ValueError(f"request {request_id!r} needs max_tokens >= 1, got {max_tokens}")
        self.request_id = request_id
        self.prompt_token_ids = prompt
        self.output_token_ids: list[int] = []
        self._token_ids = list(prompt)  # prompt + output, kept whole so slicing is cheap
        self.max_tokens = max_tokens
        self.sampling_params = sampling_params
        self.status = SequenceStatus.WAITING
        self.arrival_index = -1  # set by Scheduler.add; orders the queues
        self.timing: RequestTiming | None = None  # its SLA and token times; set by Scheduler.add
        # tokens whose KV is in the cache once the steps scheduled so far have run (the scheduler counts
        # a step's tokens as computed when it schedules them; a failed step rolls them back)
        self.num_computed_tokens = 0
        self.num_pending_tokens = 0  # sampled by a step in flight, not yet read back (0 or 1)
        # Its next step needs its last token on the host (a grammar mask): never scheduled while a
        # token of it is pending (the scheduler's "steps in flight").
        self.needs_host_sync = False
        self.num_draft_tokens = 0  # speculative proposals it verifies in the step in flight
        self.num_prefill_tokens = len(prompt)  # grows to num_tokens on preemption
        self.page_table: list[int] = []  # page ids; page i holds positions [i*P, (i+1)*P)
        self.page_table_row = -1  # its row in the scheduler's PageTables while running
        self.cache_salt = cache_salt  # prefix-cache pages are shared only among equal salts
        self.num_cached_tokens = -1  # prompt tokens served from the prefix cache at first admission
        self._page_keys: list[PageKey] = []  # keys of the first full pages of all_token_ids

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, pages={len(self.page_table)})"
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then generated tokens. The list is the sequence's own: do not mutate it."""
        return self._token_ids

    @property
    def last_token_id(self) -> int:
        return self._token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prefill_tokens

    @property
    def num_remaining_prefill_tokens(self) -> int:
        return max(0, self.num_prefill_tokens - self.num_computed_tokens)

    def num_new_pages_needed(self, num_new_tokens: int, page_size: int) -> int:
        """Pages to add so that the KV of `num_new_tokens` more tokens fits."""
        needed = pages_for(self.num_computed_tokens + num_new_tokens, page_size)
        return max(0, needed - len(self.page_table))

    def page_keys(self, num_pages: int, page_size: int) -> list[PageKey]:
        """Prefix-cache keys of the first `num_pages` full pages of the tokens (each computed once).
        The list is the sequence's own and may hold more keys than asked for: do not mutate it."""
        have = len(self._page_keys)
        if have < num_pages:
            parent = hash(self._page_keys[-1]) if have else ROOT_HASH
            tokens = self._token_ids[have * page_size : num_pages * page_size]
            self._page_keys += page_keys(tokens, page_size, self.cache_salt, 0, parent)
        return self._page_keys

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._token_ids.append(token_id)

    def reset_for_recompute(self) -> None:
        """Forgets the cached KV (the caller frees the pages) and queues every token for prefill."""
        self.page_table = []
        self.page_table_row = -1
        self.num_computed_tokens = 0
        self.num_prefill_tokens = self.num_tokens
        self.status = SequenceStatus.WAITING
