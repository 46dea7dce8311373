"""The scheduler: which tokens of which sequences go into the next forward pass.

`schedule()` composes one step; the engine runs it on the device and hands the sampled tokens to
`postprocess()`, then checks stop conditions and calls `finish()`.

Steps in flight. `schedule()` counts the step's tokens as computed at once and each token it samples
as pending (`Sequence.num_pending_tokens`), so the next step can be scheduled while this one still
runs on the device (the engine's overlap): it assumes every running sequence survives and gets its
token. A decode whose input token is still pending names the slot of the step in flight that samples
it (`ScheduledSeq.previous_slot`); the device takes the token from that step's output. At most two
steps are in flight; `postprocess()` takes them oldest first and appends the tokens; a sequence that
finished or was aborted meanwhile is skipped (its extra work is discarded), one preempted meanwhile
only keeps its token. A sequence whose next step needs its last token on the host
(`Sequence.needs_host_sync`: a grammar-constrained one) sits out any step composed while that token
is pending. `abandon()` rolls a failed step back, newest first. Without overlap the engine
simply postprocesses each step before scheduling the next.

Dynamic SplitFuse ("splitfuse", DeepSpeed-FastGen), each step at most `token_budget` tokens (or the
smaller budget the caller passes for this step, `engine.budget`) and `max_num_seqs` sequences:
  1. Decodes first. Every running sequence past its prefill gets one token. When its next token
     needs a page and none is free, the newest running sequence is preempted (pages freed, queued
     for recompute) until one is; the sequence may end up preempting itself.
  2. Then prompts: the running sequence cut last step continues at the front, then waiting sequences
     in arrival order, each taking min(remaining prompt, remaining budget) tokens.
  3. A waiting sequence is admitted only when pages for its whole prompt plus its first generated
     token are free; they are allocated at admission, so a started prefill never runs out of pages.
     Admission is first-come first-served (the head of the queue blocks the rest; with the prefix
     cache, a sequence waiting for a page another one is computing is passed over, see below) and is
     skipped in a step that preempted, so a sequence is never evicted and readmitted at once. Pages
     count as free when no sequence owns them (cached pages are evicted for them), and a prefix-cache
     hit needs pages only for what it does not cover.

"prefill_first" (vLLM of 2023): if prompt work can be scheduled the step runs prompts only and
the decodes wait. Whole prompts only, as many as fit the budget; a prompt longer than the whole
budget is the exception: it is split into budget-sized chunks, still with no decode until it is
done, so a step never exceeds the budget. Otherwise the step decodes every running sequence as
above.

"sla" (`sla_policy`): the same mixed steps, filled by SLA slack instead of by kind. Prompts go by
earliest first-token deadline among those that can still make it, hopeless ones after them with what
is left; a decode is deferred only when the prompts need its room and its token-gap EMA can take a
step more (the gap itself staying within 1 / R), at most `max_skips` steps in a row; the composer
predicts from after the step in flight (`_in_flight_seconds`), each step at the token bucket the
engine pads it to (`_bucket`) and at its real tokens; a prompt is passed over at most `max_pass_over` steps
in a row before it goes first (a waiting one then blocks later admissions, as first-come first-served
does). Admission asks for the same pages as above, so pages are never over-committed.

Speculative decoding (`engine.speculative`). After the policy has composed the step, a decode may
take draft tokens out of the budget it left over (`add_drafts`): its rows become its input token and
the drafts, contiguous, and it counts them as computed. A speculating sequence never has a token
pending when it gets drafts, and sits out any step composed while its verification is in flight.
`postprocess()` takes the tokens the step emitted for it (the accepted drafts and one more) and
trims `num_computed_tokens` back past the rejected ones (their KV slots are overwritten later).

Prefix caching (`enable_prefix_caching`, the default): a full page becomes a cached page (indexed by
its content key, see `page_allocator`) as soon as the step that wrote its KV is postprocessed, so
requests that run together share it, not only later ones. At admission a sequence takes over the
longest cached chain of full pages its tokens start with (at most up to the page before its last
token, which is always computed so there is a logit to sample) and counts those tokens as computed:
only the rest is ever scheduled, and admission asks only for the pages the hit does not cover. A
waiting sequence whose next page another running sequence is computing right now (a burst sharing
a system prompt, the `n` choices of one prompt) is passed over until that page is cached, so the
prefix is computed once; the sequences behind it are admitted meanwhile (looking at most
`max_num_seqs` passed-over sequences deep), and since the running sequence progresses every step,
nothing waits for ever. Preempted sequences hit their own cached pages when they are readmitted.

Why nothing stalls: at most min(max_num_seqs, token_budget) sequences run, so every decode fits a
step and a prompt chunk still has room; preemption takes the newest sequence, so the oldest one
makes progress every step; and the pool is checked at construction to hold one sequence of
max_model_len, so with nothing running the head of the queue always fits.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Sequence as SequenceABC

import numpy as np

from fastgen_jax.config import ConfigError, EngineConfig
from fastgen_jax.engine.limits import check_length, check_pool_holds_a_sequence
from fastgen_jax.engine.page_allocator import NULL_PAGE, PageAllocator, PageKey, PageTables
from fastgen_jax.engine.sequence import Sequence, SequenceStatus, pages_for
from fastgen_jax.engine.sla_policy import Composition, PromptCandidate, SlaComposer
from fastgen_jax.engine.timing import RequestSLA, RequestTiming

_RUNNING = SequenceStatus.RUNNING
MAX_STEPS_IN_FLIGHT = 2  # one running on the device, the next one scheduled beside it


@dataclasses.dataclass(slots=True)
class ScheduledSeq:
    """`num_new_tokens` tokens of `seq`, from position `start_position`, in one step."""

    seq: Sequence
    num_new_tokens: int
    start_position: int  # seq.num_computed_tokens when scheduled
    needs_sample: bool  # a decode, or the chunk that ends the prompt
    output_index: int = 0  # tokens the sequence had generated (pending ones included) when scheduled
    previous_slot: int = -1  # a decode whose input is pending: its slot in the step in flight
    draft_token_ids: tuple[int, ...] = ()  # speculative proposals after its input token, verified here
    num_emitted: int = 1  # tokens the step gave it (known once postprocessed; > 1 with accepted drafts)


@dataclasses.dataclass
class SchedulerOutput:
    """One step, in slab order: decodes first, then prompt chunks."""

    scheduled: list[ScheduledSeq] = dataclasses.field(default_factory=list)
    num_tokens: int = 0
    preempted: list[Sequence] = dataclasses.field(default_factory=list)
    page_tables: PageTables | None = None  # the scheduler's, for the slab builder

    @property
    def num_seqs(self) -> int:
        return len(self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


# per slot (or request id): the sampled token, or the tokens a speculating slot emitted
SampledTokens = Mapping[str, int | list[int]] | SequenceABC[int | list[int]] | np.ndarray


class Scheduler:
    """Queues of sequences, the page pool, and the per-step policy (see the module docstring).

    `num_pages` and `max_model_len` override the config's values, which may be unset (None) until
    the runner has measured memory and read the model.
    """

    def __init__(self, config: EngineConfig, num_pages: int | None = None, max_model_len: int | None = None):
        self.config = config
        self.page_size = config.page_size
        self.num_pages = _resolve("num_pages", num_pages, config.num_pages)
        self.max_model_len = _resolve("max_model_len", max_model_len, config.max_model_len)
        check_pool_holds_a_sequence(self.num_pages, self.max_model_len, self.page_size)
        self.allocator = PageAllocator(self.num_pages)
        self._max_running = min(config.max_num_seqs, config.token_budget)
        self.page_tables = PageTables(self._max_running, pages_for(self.max_model_len, self.page_size))
        self.waiting: collections.deque[Sequence] = collections.deque()  # by arrival
        self.running: list[Sequence] = []  # by arrival
        self.num_preemptions = 0
        self._requests: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self._in_flight: collections.deque[SchedulerOutput] = collections.deque()  # oldest first
        # When the steps in flight are predicted to end, set by an engine that composes a step just
        # before the one running ends (`launch_timing`); None: predicted from their sizes.
        self.in_flight_end: float | None = None
        self._step_budget = config.token_budget
        self._pending_slots: dict[int, int] = {}  # of the schedule() running now
        self.prefix_caching = config.enable_prefix_caching
        self._pending: dict[PageKey, Sequence] = {}  # prompt pages being computed -> their sequence
        self.prefix_cache_queries = 0  # tokens looked up at admission (every admission)
        self.prefix_cache_hits = 0  # of those, tokens served from the cache
        self.clock: Callable[[], float] = time.monotonic  # of every request's timing (tests simulate one)
        self.default_sla = RequestSLA(config.sla_prompt_rate, config.sla_token_rate)
        self.sla = SlaComposer(None, lambda: self.clock()) if config.policy == "sla" else None

    # -- state ------------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_free_pages(self) -> int:
        """Pages not in use: free, or cached and evictable."""
        return self.allocator.num_available

    @property
    def num_cached_pages(self) -> int:
        """Pages no sequence owns that hold a cached prefix page."""
        return self.allocator.num_cached

    @property
    def page_usage(self) -> float:
        """Fraction of the usable KV pages in use by sequences."""
        return self.allocator.usage

    def reset_prefix_cache(self) -> int:
        """Forgets every cached page (for benchmarks); returns how many were forgotten."""
        return self.allocator.reset_cache()

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def get(self, request_id: str) -> Sequence | None:
        """The unfinished sequence with this id, if any."""
        return self._requests.get(request_id)

    # -- requests ---------------------------------------------------------------------------------

    def add(self, seq: Sequence, sla: RequestSLA | None = None, arrival: float | None = None) -> None:
        """Queues a new sequence behind every earlier one and starts its timing record (`seq.timing`):
        `sla` replaces the engine's default SLA for it, and `arrival` (on `clock`, default now) is
        when its SLA's clock started. Raises `RequestError` if it cannot fit (`check_length`)."""
        if seq.request_id in self._requests:
            raise ValueError(f"request id {seq.request_id!r} is already scheduled")
        if seq.status is not SequenceStatus.WAITING or seq.num_output_tokens or seq.page_table:
            raise ValueError(f"add() takes a new sequence, got {seq}")
        check_length(self.max_model_len, seq.num_prompt_tokens, seq.max_tokens)
        arrival = self.clock() if arrival is None else arrival
        seq.timing = RequestTiming.start(sla or self.default_sla, arrival, seq.num_prompt_tokens)
        seq.arrival_index = next(self._arrivals)
        self.waiting.append(seq)
        self._requests[seq.request_id] = seq

    def finish(
        self, seq_or_id: Sequence | str, reason: SequenceStatus = SequenceStatus.FINISHED_STOPPED
    ) -> None:
        """Ends a sequence (a stop condition met) and frees its pages now. Idempotent."""
        if not reason.is_finished:
            raise ValueError(f"finish() needs a FINISHED_* status, got {reason}")
        seq = seq_or_id if isinstance(seq_or_id, Sequence) else self._requests[seq_or_id]
        if not seq.is_finished:
            self._release(seq, reason)

    def abort(self, request_id: str) -> Sequence | None:
        """Drops a waiting or running request and frees its pages; None if it is not unfinished."""
        seq = self._requests.get(request_id)
        if seq is not None:
            self._release(seq, SequenceStatus.FINISHED_ABORTED)
        return seq

    # -- the step ---------------------------------------------------------------------------------

    def schedule(self, token_budget: int | None = None) -> SchedulerOutput:
        """Composes the next step, of at most `token_budget` tokens (default and cap: the configured
        budget; never fewer than the running sequences, so every decode fits). Empty only when there
        is nothing to do."""
        if len(self._in_flight) >= MAX_STEPS_IN_FLIGHT:
            raise RuntimeError(f"schedule() called with {MAX_STEPS_IN_FLIGHT} steps in flight")
        self._pending_slots = self._slots_sampled_in_flight()
        cap = self.config.token_budget
        self._step_budget = cap if token_budget is None else max(min(token_budget, cap), len(self.running))
        out = SchedulerOutput(page_tables=self.page_tables)
        if self.config.policy == "splitfuse":
            self._schedule_decodes(out)
            self._schedule_prompts(out, allow_split=True)
        elif self.sla is not None:
            self._schedule_by_sla(out)
        else:
            self._schedule_prompts(out, allow_split=False)
            if out.is_empty:
                self._schedule_decodes(out)
        if not out.is_empty:
            self._in_flight.append(out)
        return out

    def _slots_sampled_in_flight(self) -> dict[int, int]:
        """id(seq) -> its slot in the newest step in flight, for the sequences that step samples."""
        if not self._in_flight:
            return {}
        return {id(e.seq): i for i, e in enumerate(self._in_flight[-1].scheduled) if e.needs_sample}

    def abandon(self, output: SchedulerOutput) -> None:
        """Rolls back the newest step in flight after its forward pass failed: its tokens count as not
        computed again (the next `schedule()` schedules them again), its samples as not pending, and
        the pages they got stay with their sequences. With two steps in flight, abandon both, newest
        first."""
        if not self._in_flight or output is not self._in_flight[-1]:
            return
        self._in_flight.pop()
        for entry in output.scheduled:
            seq = entry.seq
            seq.num_pending_tokens -= entry.needs_sample
            seq.num_draft_tokens = 0
            if seq.status is _RUNNING:
                seq.num_computed_tokens = entry.start_position

    def postprocess(self, output: SchedulerOutput, sampled_token_ids: SampledTokens) -> None:
        """Records a finished step: advances the computed tokens and appends sampled ones. (The
        engine notes the times of the tokens it hands out in each `seq.timing` once it has checked
        their stop conditions.)

        `sampled_token_ids` maps request id to token id, or is aligned with `output.scheduled`
        (one entry per slab slot; entries of slots that need no sample are ignored). A slot that
        verified draft tokens has a list instead: the tokens it emitted. Sequences finished or
        aborted while the step ran are skipped.
        """
        if output.is_empty:
            return
        if not self._in_flight or output is not self._in_flight[0]:
            raise RuntimeError("postprocess() got an output that is not the oldest step in flight")
        self._in_flight.popleft()
        tokens = _tokens_per_slot(output, sampled_token_ids)
        # A page of the prefix cache is filled when end % page_size < tokens written; without the cache
        # the modulus is never below 0. (Locals: this loop runs once per sequence per step.)
        page_size = self.page_size if self.prefix_caching else 1 << 62
        for entry, token in zip(output.scheduled, tokens, strict=True):
            seq = entry.seq
            if seq.is_finished:
                continue
            n = entry.num_new_tokens
            if entry.draft_token_ids:
                n -= self._take_verified(entry, token)
            elif entry.needs_sample:
                seq.num_pending_tokens -= 1
                seq.append_token(token)
            if seq.status is not _RUNNING:  # preempted while the step ran: its pages are gone
                seq.num_prefill_tokens = seq.num_tokens
                continue
            end = entry.start_position + n
            if end % page_size < n:
                self._cache_written_pages(seq, entry.start_position, end)

    def _take_verified(self, entry: ScheduledSeq, emitted: SequenceABC[int]) -> int:
        """Appends the tokens a speculating slot emitted; returns its rejected draft tokens, whose KV
        no longer counts as computed."""
        seq, drafts = entry.seq, len(entry.draft_token_ids)
        if not 1 <= len(emitted) <= drafts + 1:
            raise ValueError(f"{len(emitted)} tokens emitted for {drafts} draft tokens of {seq.request_id!r}")
        seq.num_pending_tokens -= 1
        seq.num_draft_tokens = 0
        entry.num_emitted = len(emitted)
        for token in emitted:
            seq.append_token(int(token))
        rejected = drafts + 1 - len(emitted)
        if seq.status is _RUNNING:
            seq.num_computed_tokens -= rejected
            self._drop_pages_past(seq, pages_for(seq.num_computed_tokens + 1, self.page_size))
        return rejected

    def _drop_pages_past(self, seq: Sequence, keep: int) -> None:
        """Frees the pages after the first `keep` of `seq` (taken for drafts that were rejected; never
        cached: only pages of accepted tokens are), so idle pages are never held."""
        if len(seq.page_table) <= keep:
            return
        dropped = seq.page_table[keep:]
        del seq.page_table[keep:]
        self.page_tables.truncate(seq.page_table_row, keep)
        self.allocator.free(reversed(dropped))

    # -- speculative decoding ---------------------------------------------------------------------

    def budget_left(self, out: SchedulerOutput) -> int:
        """Tokens of this step's budget the composed step leaves unused (room for draft tokens)."""
        return max(0, self._step_budget - out.num_tokens)

    def add_drafts(self, out: SchedulerOutput, index: int, draft_token_ids: SequenceABC[int]) -> int:
        """Appends draft tokens to the decode in slot `index` of the step just composed (rows after its
        input token), as many as the budget left and the free pages allow without preempting or
        evicting anything; returns how many. The slot must be a `draftable` decode."""
        entry = out.scheduled[index]
        if not draftable(entry) or out is not self._in_flight[-1]:
            raise ValueError(f"slot {index} of this step cannot take draft tokens")
        seq = entry.seq
        k = min(len(draft_token_ids), self.budget_left(out))
        end = seq.num_computed_tokens + k
        while k and pages_for(end, self.page_size) > len(seq.page_table):
            if self.allocator.num_free:
                self._add_page(seq)
            else:  # no idle page: fewer drafts, never a preemption or an eviction
                k = len(seq.page_table) * self.page_size - seq.num_computed_tokens
                end = seq.num_computed_tokens + k
        if k <= 0:
            return 0
        entry.draft_token_ids = tuple(int(t) for t in draft_token_ids[:k])
        entry.num_new_tokens += k
        out.num_tokens += k
        seq.num_computed_tokens = end
        seq.num_draft_tokens = k
        return k

    # -- policy pieces ----------------------------------------------------------------------------

    def _schedule_decodes(self, out: SchedulerOutput, deferred: frozenset = frozenset()) -> None:
        # The hot loop of a step (once per running sequence): the checks are written out, not called.
        budget, max_seqs, page_size = self._step_budget, self.config.max_num_seqs, self.page_size
        scheduled = out.scheduled
        for seq in list(self.running):  # a copy: preemption removes sequences from running
            computed = seq.num_computed_tokens
            if seq.status is not _RUNNING or computed < seq.num_prefill_tokens or seq in deferred:
                continue  # gone, or prefilling
            if out.num_tokens >= budget or len(scheduled) >= max_seqs:
                break  # only reachable if the running limit is broken
            if seq.num_pending_tokens and _waits_for_step_in_flight(seq):
                continue
            if len(seq.output_token_ids) >= seq.max_tokens:
                _raise_past_max_tokens(seq)
            if computed >= len(seq.page_table) * page_size and not self._make_room_for_decode(seq, out):
                continue  # preempted itself
            self._push(out, seq, 1)

    def _schedule_prompts(self, out: SchedulerOutput, allow_split: bool) -> None:
        for seq in self.running:
            if seq.is_prefilling and self._has_room(out):
                self._push(out, seq, min(seq.num_remaining_prefill_tokens, self._budget_left(out)))
        if not out.preempted:
            self._admit_waiting(out, allow_split)

    def _admit_waiting(self, out: SchedulerOutput, allow_split: bool) -> None:
        i, passed_over = 0, 0
        while i < len(self.waiting) and self._has_room(out) and len(self.running) < self._max_running:
            seq = self.waiting[i]
            hit = self._cached_prefix(seq)
            if hit is None:  # its next page is being computed by a running sequence: wait for it
                i, passed_over = i + 1, passed_over + 1
                if passed_over > self.config.max_num_seqs:
                    return
                continue
            num_new = seq.num_prefill_tokens - len(hit) * self.page_size
            budget = self._budget_left(out)
            if num_new > budget and not (allow_split or out.is_empty):
                return
            num_pages = self._pages_to_admit(seq, hit)
            if num_pages is None:
                return
            del self.waiting[i]
            self._start(seq, hit, num_pages)
            self._push(out, seq, min(num_new, budget))

    def _pages_to_admit(self, seq: Sequence, hit: list[int]) -> int | None:
        """New pages `seq` takes at admission (its whole prompt and first token, less the cache hit),
        or None when they are not free."""
        num_pages = pages_for(min(seq.num_prefill_tokens + 1, self.max_model_len), self.page_size) - len(hit)
        revived = sum(1 for page in hit if not self.allocator.refcount(page))  # cached, not in use
        return num_pages if self.allocator.can_allocate(num_pages + revived) else None

    # -- the "sla" policy: the composer decides, these pieces carry it out (see sla_policy) --------

    def _schedule_by_sla(self, out: SchedulerOutput) -> None:
        sla = self.sla
        decodes = [(s, s.timing) for s in self.running if not s.is_prefilling]
        prompts = self._prompt_candidates()
        pairs = sum(s.num_computed_tokens + 1 for s, _ in decodes)
        ahead = (
            self._in_flight_seconds()
            if self.in_flight_end is None
            else max(0.0, self.in_flight_end - sla.clock())
        )
        prompt_pairs = _PromptPairs(prompts)

        def step(n: int) -> float:  # padded to its bucket, its real rows, the pairs its work attends
            return sla.step_seconds(self._bucket(n), pairs + prompt_pairs(n - len(decodes)), n)

        pending = {s for s, _ in decodes if s.num_pending_tokens}  # a step in flight brings their token
        self._step_budget = self._budget_within(decodes, prompts, step, sla.clock() + ahead, pending)
        choice = sla.compose(decodes, prompts, self._step_budget, step, ahead, pending)
        self._schedule_decodes(out, frozenset(choice.deferred))
        given = self._serve_prompts(out, choice)
        self._fill_with_deferred(out, choice)
        sla.served(choice, prompts, given, sla.clock())

    def _budget_within(self, decodes, prompts, step: Callable[[int], float], start: float, pending) -> int:
        """This step's budget under the composer's `longest_step` for the decodes that can join it:
        the budget if its step is predicted to fit, else the most tokens that are (a whole bucket
        where steps cost their bucket, part of one where they cost their real rows), never less than
        those decodes and one token for each urgent prompt (the policy's guarantees hold; their
        bucket is the floor)."""
        budget = self._step_budget
        joining = [(s, r) for s, r in decodes if not _waits_for_step_in_flight(s)]
        urgent = sum(p.record.passed_over >= self.sla.max_pass_over for p in prompts)
        floor = min(budget, max(len(joining) + urgent, 1))
        longest = self.sla.longest_step(joining, start, pending, step(floor))
        if step(budget) <= longest:
            return budget
        fits = min(budget, self._bucket(floor))  # the floor's bucket costs no more where buckets cost
        if step(fits) > max(longest, step(floor)):  # where rows cost: the floor itself (always allowed)
            fits = floor
        over = budget
        while over - fits > 1:  # bisect: a step's time grows with its size
            mid = (fits + over) // 2
            fits, over = (mid, over) if step(mid) <= longest else (fits, mid)
        return fits

    def _in_flight_seconds(self) -> float:
        """Predicted seconds of the steps in flight: the step being composed starts after them (with
        overlap the engine composes step N+1 as step N starts)."""
        return sum(
            self.sla.step_seconds(self._bucket(out.num_tokens), step_pairs(out.scheduled), out.num_tokens)
            for out in self._in_flight
        )

    def _bucket(self, num_tokens: int) -> int:
        """The token bucket a step of `num_tokens` is padded to (what its time depends on)."""
        return token_bucket(num_tokens, self.config.token_buckets)

    def _fill_with_deferred(self, out: SchedulerOutput, choice: Composition) -> None:
        """Gives deferred decodes the room the prompts left after all (at the front of the slab), as
        long as no page has to be freed for them, unless the step would be empty: then as splitfuse
        does (the newest sequences are preempted), so a step with work to do is never empty."""
        for seq in list(choice.deferred):
            if not self._has_room(out) or seq.status is not _RUNNING or _waits_for_step_in_flight(seq):
                continue
            if out.is_empty:
                if not self._make_room_for_decode(seq, out):
                    continue
            elif seq.num_computed_tokens >= len(seq.page_table) * self.page_size:
                if not self.allocator.can_allocate(1):
                    continue
                self._add_page(seq)
            self._push(out, seq, 1, front=True)
            choice.deferred.remove(seq)
            choice.decodes.append(seq)

    def _prompt_candidates(self) -> list[PromptCandidate]:
        """Started prefills, then waiting prompts (the first 2 x max_num_seqs of the queue that are not
        waiting for a page another sequence computes), each with its uncached remainder."""
        out = [
            PromptCandidate(s, s.timing, s.num_remaining_prefill_tokens, True)
            for s in self.running
            if s.is_prefilling
        ]
        for seq in itertools.islice(self.waiting, 2 * self.config.max_num_seqs):
            hit = self._cached_prefix(seq)
            if hit is not None:
                remaining = seq.num_prefill_tokens - len(hit) * self.page_size
                out.append(PromptCandidate(seq, seq.timing, remaining, False))
        return out

    def _serve_prompts(self, out: SchedulerOutput, choice: Composition) -> set:
        """Gives prompts tokens in the composer's order; returns those served. One token is held back
        for each urgent running prefill still to come, so each gets one; an urgent waiting prompt that
        cannot be admitted stops later admissions."""
        reserve = sum(1 for c in choice.prompts if c.urgent and c.key.status is _RUNNING)
        admitting, given = not out.preempted, set()
        for c in choice.prompts:
            seq, running = c.key, c.key.status is _RUNNING
            reserve -= c.urgent and running
            if not self._has_room(out):
                break
            cap = self._budget_left(out) - reserve  # reserve: the urgent running prefills after this one
            if cap <= 0:
                continue
            if running:
                self._push(out, seq, min(seq.num_remaining_prefill_tokens, cap))
            elif admitting and self._admit_by_sla(seq, out, cap):
                pass
            else:
                admitting &= not c.urgent
                continue
            given.add(seq)
        return given

    def _admit_by_sla(self, seq: Sequence, out: SchedulerOutput, cap: int) -> bool:
        if len(self.running) >= self._max_running:
            return False
        hit = self._cached_prefix(seq)
        num_pages = None if hit is None else self._pages_to_admit(seq, hit)
        if num_pages is None:
            return False
        self.waiting.remove(seq)
        self._start(seq, hit, num_pages)
        step = self.sla.step_seconds(self._bucket(self._step_budget), 0, self._step_budget)
        self.sla.admitted(seq.timing, seq.num_remaining_prefill_tokens, cap, step)
        self._push(out, seq, min(seq.num_remaining_prefill_tokens, cap))
        return True

    def _cached_prefix(self, seq: Sequence) -> list[int] | None:
        """Pages of the longest cached prefix `seq` may take over (never its last token's page), or
        None while its next page is being computed by another running sequence."""
        if not self.prefix_caching:
            return []
        usable = (seq.num_prefill_tokens - 1) // self.page_size
        keys = seq.page_keys(usable, self.page_size)[:usable]
        hit = self.allocator.match(keys)
        if len(hit) < len(keys):
            holder = self._pending.get(keys[len(hit)])
            if holder is not None and holder is not seq:
                return None
        return hit

    def _start(self, seq: Sequence, hit: list[int], num_new_pages: int) -> None:
        """Makes `seq` running with the cached pages `hit` plus `num_new_pages` new ones."""
        self.allocator.touch(hit)
        seq.page_table = hit + self.allocator.allocate(num_new_pages)
        seq.page_table_row = self.page_tables.add_row(seq.page_table)
        seq.num_computed_tokens = len(hit) * self.page_size
        seq.status = _RUNNING
        bisect.insort(self.running, seq, key=_arrival)
        if not self.prefix_caching:
            return
        if seq.num_cached_tokens < 0:
            seq.num_cached_tokens = seq.num_computed_tokens
        self.prefix_cache_queries += seq.num_prefill_tokens
        self.prefix_cache_hits += seq.num_computed_tokens
        end = seq.num_prefill_tokens // self.page_size
        for key in seq.page_keys(end, self.page_size)[len(hit) : end]:
            self._pending.setdefault(key, seq)

    def _cache_written_pages(self, seq: Sequence, start: int, stop: int) -> None:
        """Indexes the pages of `seq` that a step writing positions [start, stop) filled."""
        first, end = start // self.page_size, stop // self.page_size
        if first == end:
            return
        keys, pages, allocator = seq.page_keys(end, self.page_size), seq.page_table, self.allocator
        if self._pending:
            for key in keys[first:end]:
                if self._pending.get(key) is seq:
                    del self._pending[key]
        for i in range(first, end):
            # Only a chain of this sequence's own pages is indexed: a page's parent is then always
            # freed after it, hence evicted after it, so a parent page id in the index is never stale.
            # A page after one that another sequence cached first (or after a cache reset) is not.
            if i and allocator.key(pages[i - 1]) != keys[i - 1]:
                break
            allocator.cache(pages[i], keys[i], pages[i - 1] if i else NULL_PAGE)

    def _make_room_for_decode(self, seq: Sequence, out: SchedulerOutput) -> bool:
        """Gets `seq` the page for its next token, preempting the newest sequences if need be.

        False when `seq` itself had to go. Victims are newer than `seq`, so none is in `out` yet.
        """
        if seq.num_computed_tokens < len(seq.page_table) * self.page_size:
            return True
        while not self.allocator.can_allocate(1):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        self._add_page(seq)
        return True

    def _add_page(self, seq: Sequence) -> None:
        [page] = self.allocator.allocate(1)
        seq.page_table.append(page)
        self.page_tables.append(seq.page_table_row, page)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._drop_pages(seq)
        seq.reset_for_recompute()
        self.waiting.insert(bisect.bisect(self.waiting, seq.arrival_index, key=_arrival), seq)
        self.num_preemptions += 1
        out.preempted.append(seq)

    def _release(self, seq: Sequence, status: SequenceStatus) -> None:
        if seq.status is _RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._drop_pages(seq)
        seq.status = status
        del self._requests[seq.request_id]

    def _drop_pages(self, seq: Sequence) -> None:
        if self._pending and seq.status is _RUNNING:
            self._forget_pending(seq)
        self.allocator.free(reversed(seq.page_table))  # deepest first: evicted before their parents
        if seq.page_table_row >= 0:
            self.page_tables.free_row(seq.page_table_row)
        seq.page_table = []
        seq.page_table_row = -1

    def _forget_pending(self, seq: Sequence) -> None:
        """Drops the pages `seq` was going to compute from the pending map (it stops running). From
        its first page: a step in flight may not have cached the pages counted as computed yet."""
        end = seq.num_prefill_tokens // self.page_size
        for key in seq.page_keys(end, self.page_size)[:end]:
            if self._pending.get(key) is seq:
                del self._pending[key]

    def _push(self, out: SchedulerOutput, seq: Sequence, num_new: int, front: bool = False) -> None:
        """Adds `num_new` tokens of `seq` to the step (at its end, or first: `front`) and counts them
        as computed (see the module docstring: steps in flight)."""
        start = seq.num_computed_tokens
        needs_sample = start + num_new >= seq.num_prefill_tokens
        pending = seq.num_pending_tokens
        previous_slot = self._pending_slots[id(seq)] if pending else -1
        output_index = len(seq.output_token_ids) + pending
        entry = ScheduledSeq(seq, num_new, start, needs_sample, output_index, previous_slot)
        if front:
            out.scheduled.insert(0, entry)
        else:
            out.scheduled.append(entry)
        out.num_tokens += num_new
        seq.num_computed_tokens = start + num_new
        seq.num_pending_tokens = pending + needs_sample

    def _budget_left(self, out: SchedulerOutput) -> int:
        return self._step_budget - out.num_tokens

    def _has_room(self, out: SchedulerOutput) -> bool:
        return out.num_tokens < self._step_budget and len(out.scheduled) < self.config.max_num_seqs


class _PromptPairs:
    """The (query, key) pairs `tokens` prompt tokens of a step attend, taken from the prompt candidates
    in deadline order (as the "sla" composer mostly serves them), each from where its computed part
    ends: what a step's attention costs besides its decodes (a chunk late in a long prompt attends
    to all of it)."""

    def __init__(self, prompts: list[PromptCandidate]):
        order = sorted(prompts, key=lambda p: (p.record.sla.priority, p.record.due()))
        self.starts = [p.key.num_prefill_tokens - p.remaining for p in order]
        self.remaining = [p.remaining for p in order]
        self.tokens = list(itertools.accumulate(self.remaining, initial=0))
        self.pairs = list(itertools.accumulate(map(attended_pairs, self.remaining, self.starts), initial=0))

    def __call__(self, tokens: int) -> int:
        if tokens <= 0:
            return 0
        whole = bisect.bisect_right(self.tokens, tokens) - 1  # prompts taken whole
        left = tokens - self.tokens[whole]
        partial = attended_pairs(left, self.starts[whole]) if left and whole < len(self.starts) else 0
        return self.pairs[whole] + partial


def _arrival(seq: Sequence) -> int:
    return seq.arrival_index


def _resolve(name: str, given: int | None, configured: int | None) -> int:
    value = configured if given is None else given
    if value is None:
        raise ConfigError(f"{name} is unset: pass it to the Scheduler or set EngineConfig.{name}")
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")
    return value


def _waits_for_step_in_flight(seq: Sequence) -> bool:
    """A decode that cannot join the step being composed: the step in flight samples its last token,
    or one that its next step depends on on the host (`Sequence.needs_host_sync`), or it verifies
    draft tokens there (how many tokens it will have is unknown)."""
    return bool(seq.num_pending_tokens) and (
        seq.needs_host_sync
        or seq.num_draft_tokens > 0
        or seq.num_output_tokens + seq.num_pending_tokens >= seq.max_tokens
    )


def draftable(entry: ScheduledSeq) -> bool:
    """Whether a scheduled slot may take draft tokens: a decode of a running sequence whose input is
    its last token, with no other token pending and no host-side constraint on its next one."""
    seq = entry.seq
    return (
        entry.needs_sample
        and entry.num_new_tokens == 1
        and not entry.draft_token_ids
        and entry.previous_slot < 0
        and seq.status is _RUNNING
        and seq.num_pending_tokens == 1
        and not seq.needs_host_sync
        and entry.start_position == seq.num_tokens - 1
    )


def _raise_past_max_tokens(seq: Sequence) -> None:
    raise RuntimeError(
        f"request {seq.request_id!r} has {seq.num_output_tokens} output tokens, "
        f"max_tokens={seq.max_tokens}: the engine must finish() it before the next step"
    )


def _tokens_per_slot(output: SchedulerOutput, sampled: SampledTokens) -> list[int]:
    """The sampled token of each scheduled slot (-1 where the slot samples nothing)."""
    if isinstance(sampled, Mapping):
        values = [sampled[e.seq.request_id] if e.needs_sample else -1 for e in output.scheduled]
        return [v if isinstance(v, list) else int(v) for v in values]
    tokens = list(sampled) if isinstance(sampled, list) else np.asarray(sampled).reshape(-1).tolist()
    if len(tokens) < output.num_seqs:
        raise ValueError(f"{len(tokens)} sampled tokens for {output.num_seqs} scheduled sequences")
    return tokens[: output.num_seqs]


def step_pairs(scheduled: Iterable[ScheduledSeq]) -> int:
    """(query, key) pairs a step's scheduled work attends (what its time depends on besides tokens)."""
    return sum(attended_pairs(e.num_new_tokens, e.start_position) for e in scheduled)


def token_bucket(num_tokens: int, buckets: SequenceABC[int]) -> int:
    """The smallest of the sorted `buckets` that holds `num_tokens` (the largest when none does)."""
    return buckets[min(bisect.bisect_left(buckets, num_tokens), len(buckets) - 1)]


def attended_pairs(num_new_tokens: int, start_position: int) -> int:
    """(query, key) pairs that causal attention visits for new tokens at start_position onwards."""
    q = num_new_tokens
    return q * start_position + q * (q + 1) // 2
