"""Speculative decoding with a draft model: a smaller checkpoint with the target's tokenizer proposes
each speculating sequence's next tokens greedily (`DraftProposer`, a `engine.speculative.Proposer`).

The draft runs on the engine's own machinery: its own `ModelRunner` (parameters, KV page pool,
compiled step programs), a `StepPlanner` for its pool, and a `PageAllocator` / `PageTables` pair for
its pages. It has no scheduler of its own: `propose` decides exactly which sequences run.

Each target request has a mirror here: the draft's copy of its tokens (the target's tokens as of the
last proposal, then the draft's own proposals), how many of them have draft KV, and its pages. A
proposal for a sequence first syncs the mirror with the target's tokens: the draft KV of the longest
common prefix of the mirror's tokens and the target's is kept (target tokens only ever grow, so the
common prefix reaches at least the target's length at the last sync, plus the proposals it
accepted), the rest of the target's tokens are the mirror's catch-up. Then all asks run together,
batched in slab steps under the draft's budget: the first step holds each sequence's catch-up (a
catch-up longer than the budget, such as a new prompt, is split over several steps), whose last row
samples the first proposal; then one-token steps feed each proposal back until every sequence has
its k tokens. With a catch-up of a few tokens a proposal of k tokens costs k draft steps.

Proposals are greedy (argmax), so they are deterministic and the target's verification keeps the
output exactly what decoding without speculation gives (`sampler.verify`); a draft only decides how
far a step gets. Pages: the draft's pool holds the target's pages plus room for k tokens per
sequence slot. When it runs out, mirrors of requests not asked this time are dropped, least recently
used first (they catch up from scratch when asked again); if that is not enough the sequence gets no
proposal this step rather than an error.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence as SequenceABC
from typing import TYPE_CHECKING

import numpy as np

from fastgen_jax import distributed
from fastgen_jax.checkpoints import Checkpoint, CheckpointError, load_checkpoint
from fastgen_jax.config import ConfigError, EngineConfig
from fastgen_jax.engine import (
    PageAllocator,
    PageTables,
    ScheduledSeq,
    SchedulerOutput,
    Sequence,
    StepPlanner,
    pages_for,
)
from fastgen_jax.models import kv_bytes_per_page
from fastgen_jax.runner import ModelRunner, kv_dtype

if TYPE_CHECKING:
    from fastgen_jax.llm_engine import LLMEngine
    from fastgen_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class _Mirror:
    """The draft's copy of one request. Read by `StepPlanner.build` as a scheduled sequence would be:
    `all_token_ids`, `page_table_row`, and `sampling_params` None (greedy)."""

    __slots__ = ("request_id", "all_token_ids", "page_table", "page_table_row", "num_computed", "synced")
    sampling_params = None

    def __init__(self, request_id: str, row: int):
        self.request_id = request_id
        self.all_token_ids: list[int] = []  # target tokens as of the last sync, then proposals
        self.page_table: list[int] = []
        self.page_table_row = row
        self.num_computed = 0  # tokens with draft KV
        self.synced = 0  # target tokens at the last sync: a prefix of every later target's tokens


@dataclasses.dataclass
class DraftStats:
    """Counters since start-up. `seconds`: wall time inside `propose` (host and draft device)."""

    proposals: int = 0  # propose() calls that ran the draft
    sequences: int = 0  # sequence-proposals made
    steps: int = 0  # draft forward passes
    rows: int = 0  # draft tokens computed (catch-up and proposals fed back)
    seconds: float = 0.0
    dropped: int = 0  # mirrors dropped for their pages
    starved: int = 0  # sequences that got no proposal: no draft pages
    compiled_programs: int = 0

    @property
    def seconds_per_step(self) -> float:
        """Mean wall time of one draft forward pass inside `propose` (what a proposal of k tokens
        costs is about k of these, plus the catch-up); 0 before the first."""
        return self.seconds / self.steps if self.steps else 0.0


class DraftProposer:
    """Proposes with a draft model (see the module docstring). `config`: the draft's own engine
    config (page size and max_model_len of the target, its own pool); `vocab_limit`: token ids at or
    past it (the target's logit vocabulary) are never proposed."""

    free = False

    def __init__(
        self,
        checkpoint: Checkpoint,
        config: EngineConfig,
        dtype,
        vocab_limit: int,
        devices: list | None = None,
    ):
        self.config = config
        self.runner = ModelRunner(checkpoint.config, checkpoint.params, config, dtype, devices)
        limits = self.runner.limits
        self.max_model_len = limits.max_model_len
        one_width = self.runner.attention.cost_follows_context  # as the target's planner decides
        self.planner = StepPlanner(config, limits.num_pages, limits.max_model_len, one_width)
        self.allocator = PageAllocator(limits.num_pages)
        self.page_tables = PageTables(config.max_num_seqs, self.planner.max_pages_per_seq)
        self.vocab_limit = vocab_limit
        self.stats = DraftStats()
        self._mirrors: dict[str, _Mirror] = {}  # least recently asked first

    @classmethod
    def for_target(cls, engine: LLMEngine, checkpoint: Checkpoint) -> DraftProposer:
        """Loads `engine.engine_config.speculative_model` in the target's dtype, checks its vocabulary
        against the target's, and sizes its engine after the target's (`draft_config`)."""
        c = engine.engine_config
        path = c.speculative_model
        if distributed.is_multiprocess():
            raise ConfigError("speculative='draft' is not supported in a multi-host group")
        dtype = engine.runner.dtype
        try:
            draft = load_checkpoint(path, dtype)
        except (CheckpointError, ConfigError) as error:
            raise ConfigError(f"speculative_model={path!r} cannot be loaded: {error}") from None
        check_same_vocabulary(checkpoint.tokenizer, draft.tokenizer, path)
        page_bytes = kv_bytes_per_page(draft.config, c.page_size, kv_dtype(c, dtype))
        config = draft_config(c, engine.limits.num_pages, engine.max_model_len, page_bytes)
        devices = engine.runner.mesh.devices.flatten().tolist()
        try:
            return cls(draft, config, dtype, checkpoint.config.vocab_size, devices)
        except ConfigError as error:
            raise ConfigError(f"speculative_model={path!r}: {error}") from None

    # ------------------------------------------------------------------ start-up

    def warmup(self, progress: bool = True) -> int:
        """Compiles every step program of the draft; returns how many (part of the start-up time)."""
        start = time.perf_counter()
        plans = (self.planner.padding(bucket, width) for bucket, width in self.planner.shapes())
        self.runner.warmup(plans, progress=progress)
        self.stats.compiled_programs = self.runner.num_compiled
        log.info(
            "draft model: compiled %d step programs in %.1f s",
            self.runner.num_compiled,
            time.perf_counter() - start,
        )
        return self.runner.num_compiled

    # ------------------------------------------------------------------ the Proposer protocol

    def propose(self, asks: SequenceABC[tuple[Sequence, int]]) -> list[list[int]]:
        start = time.perf_counter()
        busy = {seq.request_id for seq, _ in asks}
        work: list[tuple[int, _Mirror, int]] = []
        for i, (seq, k) in enumerate(asks):
            k = min(k, self.max_model_len + 1 - seq.num_tokens)  # fed positions stay < max_model_len
            mirror = self._synced(seq, k, busy) if k > 0 else None
            if mirror is not None:
                work.append((i, mirror, k))
        drafts: list[list[int]] = [[] for _ in asks]
        if work:
            generated = self._generate([(m, k) for _, m, k in work])
            for (i, _, _), tokens in zip(work, generated, strict=True):
                drafts[i] = _below(tokens, self.vocab_limit)
            self.stats.proposals += 1
            self.stats.sequences += len(work)
        self.stats.seconds += time.perf_counter() - start
        return drafts

    def forget(self, request_id: str) -> None:
        mirror = self._mirrors.pop(request_id, None)
        if mirror is not None:
            self._release(mirror)

    @property
    def num_mirrors(self) -> int:
        return len(self._mirrors)

    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free

    # ------------------------------------------------------------------ mirrors

    def _synced(self, seq: Sequence, k: int, busy: set[str]) -> _Mirror | None:
        """The mirror of `seq` with the target's tokens, its KV kept up to the longest common prefix
        and pages for k proposals; None when the draft's pool or page-table rows cannot hold it."""
        mirror = self._mirrors.pop(seq.request_id, None)
        if mirror is None:
            if not self._make_room(0, busy, row=True):
                self.stats.starved += 1
                return None
            mirror = _Mirror(seq.request_id, self.page_tables.add_row([]))
        self._mirrors[seq.request_id] = mirror  # now the most recently asked
        target = seq.all_token_ids
        keep = _common_prefix(mirror.all_token_ids, target, mirror.synced)
        keep = min(keep, mirror.num_computed, len(target) - 1)  # the last token's logits: recomputed
        del mirror.all_token_ids[keep:]
        mirror.all_token_ids += target[keep:]
        mirror.num_computed = keep
        mirror.synced = len(target)
        needed = pages_for(len(target) + k - 1, self.config.page_size) - len(mirror.page_table)
        if needed > 0:
            if not self._make_room(needed, busy):
                self.stats.starved += 1
                return None
            for page in self.allocator.allocate(needed):
                mirror.page_table.append(page)
                self.page_tables.append(mirror.page_table_row, page)
        return mirror

    def _make_room(self, pages: int, busy: set[str], row: bool = False) -> bool:
        """Drops mirrors of requests not in `busy`, least recently asked first, until `pages` pages
        (and a page-table row, with `row`) are free; False if even that is not enough."""

        def enough() -> bool:
            return self.allocator.can_allocate(pages) and (not row or self._has_free_row())

        if enough():
            return True
        for request_id in [r for r in self._mirrors if r not in busy]:
            self.forget(request_id)
            self.stats.dropped += 1
            if enough():
                return True
        return False

    def _has_free_row(self) -> bool:
        return len(self._mirrors) < self.page_tables.array.shape[0]

    def _release(self, mirror: _Mirror) -> None:
        self.allocator.free(reversed(mirror.page_table))
        self.page_tables.free_row(mirror.page_table_row)
        mirror.page_table = []
        mirror.page_table_row = -1

    # ------------------------------------------------------------------ running the draft

    def _generate(self, work: list[tuple[_Mirror, int]]) -> list[list[int]]:
        """k greedy tokens for each (mirror, k), appended to the mirror as they come, in slab steps."""
        out: list[list[int]] = [[] for _ in work]
        wanting = list(range(len(work)))
        while wanting:
            entries, owners = self._compose(work, wanting)
            tokens = self._run(entries)
            for slot, (entry, i) in enumerate(zip(entries, owners, strict=True)):
                mirror = work[i][0]
                mirror.num_computed += entry.num_new_tokens
                if entry.needs_sample:
                    mirror.all_token_ids.append(int(tokens[slot]))
                    out[i].append(int(tokens[slot]))
            wanting = [i for i in wanting if len(out[i]) < work[i][1]]
        return out

    def _compose(
        self, work: list[tuple[_Mirror, int]], wanting: list[int]
    ) -> tuple[list[ScheduledSeq], list[int]]:
        """One draft step: the sequences with least to compute first, each as many of its uncomputed
        tokens as the budget leaves (it samples when that is all of them)."""
        budget, entries, owners = self.config.token_budget, [], []
        for i in sorted(wanting, key=lambda i: len(work[i][0].all_token_ids) - work[i][0].num_computed):
            if budget <= 0 or len(entries) == self.config.max_num_seqs:
                break
            mirror = work[i][0]
            remaining = len(mirror.all_token_ids) - mirror.num_computed
            take = min(remaining, budget)
            entries.append(ScheduledSeq(mirror, take, mirror.num_computed, take == remaining))  # type: ignore[arg-type]
            owners.append(i)
            budget -= take
        return entries, owners

    def _run(self, entries: list[ScheduledSeq]) -> np.ndarray:
        """Runs one draft step and reads back each slot's greedy token."""
        num_tokens = sum(e.num_new_tokens for e in entries)
        output = SchedulerOutput(entries, num_tokens, page_tables=self.page_tables)
        plan = self.planner.build(output)
        self.runner.compile(plan)  # a no-op after warm-up
        tokens = np.asarray(self.runner.execute(plan)[0])
        self.stats.steps += 1
        self.stats.rows += output.num_tokens
        return tokens[: len(entries)]


def draft_config(
    target: EngineConfig, target_pages: int, max_model_len: int, page_bytes: int
) -> EngineConfig:
    """The draft's engine: the target's page size, KV dtype, weight quantization, max_model_len,
    budget, slots and attention, its buckets and smaller ones (`draft_buckets`), speculation off, no
    prefix cache, and a pool of the target's page count plus k tokens per slot (capped by
    `kv_cache_bytes` at the draft's `page_bytes`, never below one sequence)."""
    k_pages = pages_for(target.num_speculative_tokens, target.page_size)
    one_sequence = pages_for(max_model_len, target.page_size) + 1
    num_pages = target_pages + target.max_num_seqs * k_pages
    num_pages = max(min(num_pages, target.kv_cache_bytes // page_bytes), one_sequence)
    return EngineConfig(
        token_budget=target.token_budget,
        token_buckets=draft_buckets(target.token_buckets),
        max_num_seqs=target.max_num_seqs,
        page_size=target.page_size,
        num_pages=num_pages,
        max_model_len=max_model_len,
        attention_impl=target.attention_impl,
        kv_cache_dtype=target.kv_cache_dtype,
        quantize=target.quantize,
        tensor_parallel=target.tensor_parallel,
        enable_prefix_caching=False,
        async_scheduling=False,
        speculative="off",
    )


def draft_buckets(target_buckets: tuple[int, ...]) -> tuple[int, ...]:
    """The target's buckets, and below the smallest every power of two from 1: most draft steps feed
    one token per speculating sequence back, and a step's LM head runs for every slot of its bucket
    (with SmolLM2's vocabulary and a tiny draft, a one-sequence step took 4.9 ms in bucket 1 and
    12.6 ms in bucket 16)."""
    small = [1 << i for i in range(target_buckets[0].bit_length()) if 1 << i < target_buckets[0]]
    return (*small, *target_buckets)


def check_same_vocabulary(target: Tokenizer, draft: Tokenizer, path: str) -> None:
    """Raises ConfigError unless every token id means the same token to both tokenizers."""
    if target.vocab_size != draft.vocab_size:
        raise ConfigError(
            f"speculative_model={path!r} has a vocabulary of {draft.vocab_size} tokens, the target's has "
            f"{target.vocab_size}: a draft needs the target's tokenizer"
        )
    for token_id in range(target.vocab_size):
        if target.id_to_token(token_id) != draft.id_to_token(token_id):
            raise ConfigError(
                f"speculative_model={path!r}: token id {token_id} is {draft.id_to_token(token_id)!r} to "
                f"the draft but {target.id_to_token(token_id)!r} to the target: a draft needs the "
                "target's tokenizer"
            )


def _common_prefix(a: list[int], b: list[int], start: int) -> int:
    """Length of the longest common prefix of `a` and `b`, known to be at least `start` (capped)."""
    i, end = min(start, len(a), len(b)), min(len(a), len(b))
    while i < end and a[i] == b[i]:
        i += 1
    return i


def _below(tokens: list[int], limit: int) -> list[int]:
    """`tokens` up to the first id the target cannot produce (a draft with a larger padded vocabulary)."""
    for i, token in enumerate(tokens):
        if token >= limit:
            return tokens[:i]
    return tokens
