"""The step plan: every array one compiled step reads, built on the host (numpy only).

A `StepPlan` is the one thing that crosses from the host side to the device for a step: the token
slab (`token_ids`), the attention metadata every attention layer reads (`AttentionMetadata`) and the
per-slot sampling settings (`SamplingArrays`). Each field is defined once, below, with its dtype,
shape and padding value. The runner packs the plan's arrays into one int32 array for the compiled
step, which unpacks it into the same pytree (the jax side registers the three classes; fields must
be 4-byte types or bool), the multi-host leader broadcasts it as a pytree, and warm-up compiles one
program per padding plan, so no layer looks a field up by a string.

Shapes depend only on the bucket T (the smallest of `token_buckets` that holds the step's tokens),
the sequence slots S = min(max_num_seqs, T) and the page-table width W (pages of the step's longest
context, rounded up to a power of two, capped at the pages of max_model_len). The step compiles once
per (T, W); `StepPlanner.page_table_widths` lists every W so the runner can compile them all upfront.
When the attention's cost already follows each sequence's real context (the CPU kernel reads only
the pages it needs), `one_width` keeps a single W, the cap: one program per bucket instead of one per
(bucket, width), so start-up compiles several times fewer.

Slot i holds the i-th scheduled sequence (decodes first, then prompt chunks); its new tokens are the
slab rows cu_q_lens[i]:cu_q_lens[i+1]. Padding is inert by construction: padding rows write their
K/V to slot num_pages * page_size, one past the cache (a scatter with mode="drop" discards it),
unused slots have kv_lens 0 and an empty query range, page-table padding points at page 0, and
unused slots sample greedily with no log-probabilities (their tokens are never read).

Adding a step input (e.g. a per-slot token mask for constrained sampling, or more logit rows for
speculative verification) is a change in this module: a field on the class it belongs to, with its
dtype/shape/padding comment, filled in `StepPlanner.build` and `StepPlanner.padding`. The runner,
the broadcast and warm-up carry it unchanged; only the code that reads it on the device changes.
Keep every field always present (padding that means "no effect", e.g. an all-allowed mask) rather
than optional: an optional field would change the pytree and compile a second program per shape.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np

from fastgen_jax.config import ConfigError, EngineConfig
from fastgen_jax.engine.page_allocator import NULL_PAGE
from fastgen_jax.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from fastgen_jax.engine.sequence import pages_for
from fastgen_jax.sampling_params import SamplingParams

_I32 = np.int32


@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """What a forward pass needs to know about the slab besides its token ids (see the module
    docstring). An explicit argument of every model call, never a global; on the device the fields
    are jax arrays of the same shapes."""

    positions: np.ndarray  # i32[T]: position of each slab row in its sequence; padding 0
    slot_mapping: np.ndarray  # i32[T]: KV slot page * page_size + offset; padding num_pages * page_size
    kv_lens: np.ndarray  # i32[S]: keys per slot after this step; unused slots 0
    page_indices: np.ndarray  # i32[S, W]: each slot's KV pages in order; padding NULL_PAGE
    # i32[S + 1]: slot s owns rows cu_q_lens[s]:cu_q_lens[s + 1]; unused repeat. cu_q_lens[-1] is also
    # how many leading rows the projections multiply (the CPU kernels skip the rest): a real plan's
    # rows; a timing plan (`padding(full_rows=True)`) sets it to the bucket with no sequence in it
    cu_q_lens: np.ndarray
    num_seqs: np.ndarray  # i32[1]: slots in use
    # i32[L]: the slab row of each logit row (see SamplingArrays: a slot's last new token, and before it
    # the rows whose next token it verifies); unused rows 0. Used rows lead and point at increasing slab
    # rows: the LM head counts them from that (`models.layers.logit_rows_in_use`)
    logits_indices: np.ndarray


@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    """Per-logit-row sampling settings, as arrays so a new temperature never recompiles, and what
    speculative verification compares the samples with.

    A step has L = min(T, S + verification rows) logit rows. Slot s owns rows
    cu_logit_rows[s]:cu_logit_rows[s + 1]: one for its last new token, plus one before it for each
    draft token it verifies (speculative decoding). Row j of a slot samples the slot's
    (output_index + j)-th generated token with its own key, so a token drawn in a verification row is
    the one plain decoding would have drawn at that position. Rows past cu_logit_rows[S] are padding.
    """

    temperature: np.ndarray  # f32[L]: below sampler.MIN_TEMPERATURE (0 included) = greedy; padding 0
    top_k: np.ndarray  # i32[L]: 0 = no limit; padding 0
    top_p: np.ndarray  # f32[L]: 1.0 = no limit; padding 1.0
    seed: np.ndarray  # u32[L]; padding 0
    step: np.ndarray  # i32[L]: index of the generated token this row draws (makes each draw fresh)
    logprobs: np.ndarray  # bool[L]: the request wants log-probabilities; padding False
    draft_token_ids: np.ndarray  # i32[L]: the proposal this row's sample must equal to go on; else -1
    # i32[S + 1]: slot s owns logit rows [s]:[s + 1]. Without drafts arange(S + 1) (each slot one row);
    # with drafts, unused slots own none.
    cu_logit_rows: np.ndarray

    @classmethod
    def greedy(cls, num_slots: int, num_rows: int | None = None) -> SamplingArrays:
        """Every row greedy, no log-probabilities, no drafts: the padding value of every field."""
        num_rows = num_slots if num_rows is None else num_rows
        return cls(
            temperature=np.zeros(num_rows, np.float32),
            top_k=np.zeros(num_rows, _I32),
            top_p=np.ones(num_rows, np.float32),
            seed=np.zeros(num_rows, np.uint32),
            step=np.zeros(num_rows, _I32),
            logprobs=np.zeros(num_rows, bool),
            draft_token_ids=np.full(num_rows, -1, _I32),
            cu_logit_rows=np.arange(num_slots + 1, dtype=_I32),
        )

    @classmethod
    def for_step(
        cls, entries: list[ScheduledSeq], num_slots: int, num_rows: int | None = None
    ) -> SamplingArrays:
        """Each scheduled sequence's `SamplingParams` (greedy when it has none) on its logit rows (one
        per draft token, then one), padding after them."""
        n = len(entries)
        rows = [_GREEDY_ROW if (p := e.seq.sampling_params) is None else p.sampler_row for e in entries]
        columns = [] if rows.count(_GREEDY_ROW) == n else list(zip(*rows, strict=True))  # all greedy: []
        steps = [e.output_index for e in entries]
        drafting = any(e.draft_token_ids for e in entries)
        if not columns and not drafting:  # the common step: only `step` differs from the padding
            padding = _greedy_padding(num_slots, num_slots if num_rows is None else num_rows)
            step = np.zeros_like(padding.step)
            step[:n] = steps
            return dataclasses.replace(padding, step=step)
        out = cls.greedy(num_slots, num_rows)
        if not drafting:
            out.step[:n] = steps
            for column, name in zip(columns, _ROW_FIELDS[: len(columns)], strict=True):
                getattr(out, name)[:n] = column
            return out
        drafts = [len(e.draft_token_ids) for e in entries]
        per_slot = np.ones(num_slots, _I32)
        per_slot[: len(entries)] += drafts
        out.cu_logit_rows[1:] = np.cumsum(per_slot)
        used = int(out.cu_logit_rows[len(entries)])
        if used > out.temperature.shape[0]:
            rows = out.temperature.shape[0]
            raise ValueError(f"{sum(drafts)} draft tokens exceed the step's {rows} logit rows")
        repeats = per_slot[:n]
        out.step[:used] = np.repeat(np.asarray(steps, _I32), repeats)
        for column, name in zip(columns, _ROW_FIELDS[: len(columns)], strict=True):
            field = getattr(out, name)
            field[:used] = np.repeat(np.asarray(column, field.dtype), repeats)
        offsets = np.arange(used, dtype=_I32) - np.repeat(out.cu_logit_rows[: len(entries)], repeats)
        out.step[:used] += offsets
        out.draft_token_ids[:used] = [t for e in entries for t in (*e.draft_token_ids, -1)]
        out.cu_logit_rows[len(entries) + 1 :] = used  # unused slots own no row here
        return out


@functools.lru_cache(maxsize=64)
def _greedy_padding(num_slots: int, num_rows: int) -> SamplingArrays:
    """`SamplingArrays.greedy`, made once per shape and read-only: the fields an all-greedy step
    without drafts shares with every other such step of its shape (each array made per step costs)."""
    padding = SamplingArrays.greedy(num_slots, num_rows)
    for field in dataclasses.fields(padding):
        getattr(padding, field.name).flags.writeable = False
    return padding


_ROW_FIELDS = ("temperature", "top_k", "top_p", "seed", "logprobs")  # SamplingParams.sampler_row's order
_GREEDY_ROW = SamplingParams().sampler_row  # a request without SamplingParams, and every greedy one's


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Every array one compiled step reads (see the module docstring): a frozen pytree of numpy
    arrays on the host, of jax arrays inside the step."""

    token_ids: np.ndarray  # i32[T]: the slab, each scheduled sequence's new tokens in slot order; padding 0
    # i32[T]: for a decode row whose input token the step in flight samples (overlap), that step's
    # slot; the device reads the token from that step's output instead of token_ids. Else -1.
    previous_slot: np.ndarray
    attention: AttentionMetadata
    sampling: SamplingArrays

    @property
    def bucket(self) -> int:
        """T, the slab rows."""
        return self.token_ids.shape[0]

    @property
    def page_table_width(self) -> int:
        """W, the page-table columns."""
        return self.attention.page_indices.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """(T, W): the compiled program this plan runs."""
        return self.bucket, self.page_table_width

    @property
    def num_slots(self) -> int:
        """S, the sequence slots."""
        return self.attention.kv_lens.shape[0]

    @property
    def num_logit_rows(self) -> int:
        """L, the rows that reach the LM head and the sampler."""
        return self.attention.logits_indices.shape[0]

    @property
    def has_drafts(self) -> bool:
        """Whether some slot verifies draft tokens (speculative decoding)."""
        return bool((self.sampling.draft_token_ids >= 0).any())


class StepPlanner:
    """Builds the `StepPlan` of a `SchedulerOutput`; knows every shape the step is compiled for."""

    def __init__(self, config: EngineConfig, num_pages: int, max_model_len: int, one_width: bool = False):
        if num_pages * config.page_size >= 2**31:
            raise ConfigError(f"{num_pages=} x page_size={config.page_size} overflows int32 slots")
        self.page_size = config.page_size
        self.num_pages = num_pages
        self.max_num_seqs = config.max_num_seqs
        self.token_buckets: tuple[int, ...] = tuple(config.token_buckets)
        self.max_pages_per_seq = pages_for(max_model_len, config.page_size)
        cap = self.max_pages_per_seq
        self.page_table_widths = (cap,) if one_width else _widths_up_to(cap)
        self.verification_rows = config.verification_rows

    @classmethod
    def for_scheduler(cls, scheduler: Scheduler, one_width: bool = False) -> StepPlanner:
        """A planner for the steps of `scheduler` (same config, pool and max_model_len)."""
        return cls(scheduler.config, scheduler.num_pages, scheduler.max_model_len, one_width)

    @property
    def padding_slot(self) -> int:
        return self.num_pages * self.page_size

    def shapes(self) -> list[tuple[int, int]]:
        """Every (bucket, page-table width) a step can have: the programs to compile upfront."""
        return [(t, w) for t in self.token_buckets for w in self.page_table_widths]

    def bucket_for(self, num_tokens: int) -> int:
        """The smallest token bucket that holds `num_tokens` rows."""
        for bucket in self.token_buckets:
            if num_tokens <= bucket:
                return bucket
        raise ValueError(f"{num_tokens} tokens exceed the largest bucket {self.token_buckets[-1]}")

    def num_slots_for(self, bucket: int) -> int:
        return min(self.max_num_seqs, bucket)

    def num_logit_rows_for(self, bucket: int) -> int:
        """L: one logit row per slot, plus the verification rows (never more than the slab's rows)."""
        return min(bucket, self.num_slots_for(bucket) + self.verification_rows)

    def width_for(self, num_pages: int) -> int:
        """Page-table width for a step whose longest context spans `num_pages` pages."""
        if num_pages > self.max_pages_per_seq:
            raise ValueError(f"a context of {num_pages} pages exceeds max_model_len")
        if len(self.page_table_widths) == 1:
            return self.page_table_widths[0]
        return min(1 << max(0, num_pages - 1).bit_length(), self.max_pages_per_seq)

    def build(self, output: SchedulerOutput) -> StepPlan:
        """The plan of a scheduled step: slot i is `output.scheduled[i]`.

        Runs once per step for every running sequence (256 at a time), so per-entry values are
        gathered into Python lists and each array is made by one numpy call where it can be: on a
        host that has just run a step, each numpy call costs several microseconds of cold caches."""
        entries = output.scheduled
        if not entries:
            raise ValueError("cannot plan an empty step")
        n = len(entries)
        counts = [e.num_new_tokens for e in entries]
        one_each = counts.count(1) == n  # every slot one slab row (decodes: the steady state)
        total = n if one_each else sum(counts)
        bucket = self.bucket_for(total)
        num_slots, num_rows = self.num_slots_for(bucket), self.num_logit_rows_for(bucket)
        starts = [e.start_position for e in entries]
        kv_lens = np.array([s + c for s, c in zip(starts, counts, strict=True)] + [0] * (num_slots - n), _I32)
        page_indices = self._page_indices(output, kv_lens[:n], num_slots)
        if one_each:
            cu_q_lens = np.minimum(np.arange(num_slots + 1, dtype=_I32), n)
            positions = np.array(starts + [0] * (bucket - n), _I32)  # one row per slot: at its start
            row_slots = np.arange(n)
        else:
            cu_q_lens = np.array([0, *itertools.accumulate(counts)] + [total] * (num_slots - n), _I32)
            row_slots = np.repeat(np.arange(n), counts)  # the slot of each used row
            positions = np.zeros(bucket, _I32)
            positions[:total] = np.arange(total) - cu_q_lens[row_slots] + np.asarray(starts, _I32)[row_slots]
        page, offset = np.divmod(positions[:total], self.page_size)
        slot_mapping = np.full(bucket, self.padding_slot, _I32)
        slot_mapping[:total] = page_indices[row_slots, page] * self.page_size + offset
        token_ids = np.array(_new_token_ids(entries, one_each) + [0] * (bucket - total), _I32)
        previous_slot = np.full(bucket, -1, _I32)
        slots = [e.previous_slot for e in entries]
        if one_each:
            previous_slot[:n] = slots
        elif max(slots) >= 0:  # decodes whose input is a token of the step in flight: one row each
            waiting = [i for i, slot in enumerate(slots) if slot >= 0]
            previous_slot[cu_q_lens[waiting]] = [slots[i] for i in waiting]
        sampling = SamplingArrays.for_step(entries, num_slots, num_rows)
        attention = AttentionMetadata(
            positions=positions,
            slot_mapping=slot_mapping,
            kv_lens=kv_lens,
            page_indices=page_indices,
            cu_q_lens=cu_q_lens,
            num_seqs=np.array([n], _I32),
            logits_indices=_logit_rows(sampling.cu_logit_rows, cu_q_lens, n, num_rows),
        )
        return StepPlan(token_ids, previous_slot, attention, sampling)

    def padding(self, bucket: int, width: int, *, full_rows: bool = False) -> StepPlan:
        """A plan of shape (bucket, width) with no sequence in it: compiles and runs as a no-op. With
        `full_rows` its projections still multiply every row (`cu_q_lens[-1]` = bucket, no sequence in
        use): it costs what a full bucket's matmuls cost, to time the bucket."""
        num_slots = self.num_slots_for(bucket)
        cu_q_lens = np.zeros(num_slots + 1, _I32)
        if full_rows:
            cu_q_lens[-1] = bucket
        attention = AttentionMetadata(
            positions=np.zeros(bucket, _I32),
            slot_mapping=np.full(bucket, self.padding_slot, _I32),
            kv_lens=np.zeros(num_slots, _I32),
            page_indices=np.full((num_slots, width), NULL_PAGE, _I32),
            cu_q_lens=cu_q_lens,
            num_seqs=np.zeros(1, _I32),
            logits_indices=np.zeros(self.num_logit_rows_for(bucket), _I32),
        )
        sampling = SamplingArrays.greedy(num_slots, self.num_logit_rows_for(bucket))
        return StepPlan(np.zeros(bucket, _I32), np.full(bucket, -1, _I32), attention, sampling)

    def _page_indices(self, output: SchedulerOutput, kv_lens: np.ndarray, num_slots: int) -> np.ndarray:
        """i32[S, W]: each slot's pages up to its kv_lens[i]-th token (pages reserved beyond: left out)."""
        tables = output.page_tables
        if tables is None:
            raise ValueError("the SchedulerOutput carries no page tables")
        rows = [e.seq.page_table_row for e in output.scheduled]
        if min(rows) < 0:
            raise ValueError("a scheduled sequence holds no page-table row")
        rows += [rows[0]] * (num_slots - len(rows))  # unused slots: any row, overwritten below
        seq_pages = (kv_lens + (self.page_size - 1)) // self.page_size
        have = tables.lengths[rows[: len(kv_lens)]]
        if (have < seq_pages).any():
            raise ValueError("a scheduled sequence lacks pages for its new tokens")
        width = self.width_for(int(seq_pages.max()))
        page_indices = tables.array[rows, :width]
        page_indices[len(kv_lens) :] = NULL_PAGE
        if (have > seq_pages).any():  # pages reserved beyond this step's tokens (a prompt's): left out
            page_indices[: len(kv_lens)][np.arange(width) >= seq_pages[:, None]] = NULL_PAGE
        return page_indices


def _logit_rows(cu_logit_rows: np.ndarray, cu_q_lens: np.ndarray, n: int, num_rows: int) -> np.ndarray:
    """i32[L]: each used slot's logit rows point at its last 1 + (draft tokens) slab rows, in order;
    padding 0."""
    logits_indices = np.zeros(num_rows, _I32)
    if cu_logit_rows[n] == n:  # one logit row per slot: its last slab row
        logits_indices[:n] = cu_q_lens[1 : n + 1] - 1
        return logits_indices
    per_slot = np.diff(cu_logit_rows[: n + 1])
    slots = np.repeat(np.arange(n), per_slot)
    rows = np.arange(int(cu_logit_rows[n])) - cu_logit_rows[slots]  # 0..k within each slot
    logits_indices[: len(slots)] = cu_q_lens[slots + 1] - per_slot[slots] + rows
    return logits_indices


def _new_token_ids(entries: list[ScheduledSeq], one_each: bool) -> list[int]:
    """The tokens of every entry, in slab order: a decode's input token, then its draft tokens.
    `one_each`: every entry has one new token (decodes: 256 a step), taken in one pass."""
    if one_each:
        return [0 if e.previous_slot >= 0 else e.seq.all_token_ids[e.start_position] for e in entries]
    tokens: list[int] = []
    for e in entries:
        if e.num_new_tokens == 1:  # a decode: index, do not slice
            tokens.append(0 if e.previous_slot >= 0 else e.seq.all_token_ids[e.start_position])
        elif e.draft_token_ids:
            tokens.append(e.seq.all_token_ids[e.start_position])
            tokens.extend(e.draft_token_ids)
        else:
            tokens.extend(e.seq.all_token_ids[e.start_position : e.start_position + e.num_new_tokens])
    return tokens


def _widths_up_to(cap: int) -> tuple[int, ...]:
    """Powers of two below `cap`, then `cap`."""
    widths = [1 << i for i in range(cap.bit_length()) if 1 << i < cap]
    return (*widths, cap)
