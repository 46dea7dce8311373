"""The token slab: one step's scheduled tokens as static-shaped numpy arrays for the compiled model.

Shapes depend only on the bucket T (the smallest of `token_buckets` that holds the step's
tokens), the sequence slots S = min(max_num_seqs, T) and the page-table width W (pages of the step's
longest context, rounded up to a power of two, capped at the pages of max_model_len). The model
compiles once per (T, W); `SlabBuilder.page_table_widths` lists every W so the runner can compile
them all upfront. When the attention's cost already follows each sequence's real context (the CPU
kernel reads only the pages it needs), `one_width` keeps a single W, the cap: one program per
bucket instead of one per (bucket, width), so start-up compiles several times fewer.

Slot i holds the i-th scheduled sequence (decodes first, then prompt chunks); its new tokens are the
slab rows cu_q_lens[i]:cu_q_lens[i+1]. Padding is inert by construction: padding rows write their
K/V to slot num_pages * page_size, one past the cache (a scatter with mode="drop" discards it),
unused slots have kv_lens 0 and an empty query range, and page-table padding points at page 0.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fastgen_jax.config import ConfigError, EngineConfig
from fastgen_jax.engine.page_allocator import NULL_PAGE
from fastgen_jax.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from fastgen_jax.engine.sequence import pages_for

_I32 = np.int32


@dataclasses.dataclass(frozen=True)
class Slab:
    """One step's device inputs (see the module docstring) plus the host's map back to requests."""

    token_ids: np.ndarray  # i32[T]; padding 0
    positions: np.ndarray  # i32[T]; padding 0
    slot_mapping: np.ndarray  # i32[T]; page_id * page_size + offset; padding num_pages * page_size
    cu_q_lens: np.ndarray  # i32[S + 1]; unused slots repeat the last value
    kv_lens: np.ndarray  # i32[S]; context length after this step; unused slots 0
    page_indices: np.ndarray  # i32[S, W]; padding NULL_PAGE
    num_seqs: np.ndarray  # i32[1]; used slots
    logits_indices: np.ndarray  # i32[S]; slab row of each slot's last new token; unused slots 0
    sample_mask: np.ndarray  # bool[S]; the slot's token is sampled (decode, or prompt's last chunk)
    request_ids: list[str]  # [num_seqs]; request of each used slot
    num_tokens: int  # real (unpadded) rows

    ARRAY_NAMES = (
        "token_ids",
        "positions",
        "slot_mapping",
        "cu_q_lens",
        "kv_lens",
        "page_indices",
        "num_seqs",
        "logits_indices",
        "sample_mask",
    )

    def arrays(self) -> dict[str, np.ndarray]:
        """The device inputs by name."""
        return {name: getattr(self, name) for name in self.ARRAY_NAMES}

    @property
    def bucket(self) -> int:
        return self.token_ids.shape[0]

    @property
    def page_table_width(self) -> int:
        return self.page_indices.shape[1]


class SlabBuilder:
    """Builds a `Slab` from a `SchedulerOutput`; knows every shape the model is compiled for."""

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

    @classmethod
    def for_scheduler(cls, scheduler: Scheduler, one_width: bool = False) -> SlabBuilder:
        """A builder for the steps of `scheduler` (same config, pool and max_model_len)."""
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

    def width_for(self, num_pages: int) -> int:
        """Page-table width for a step whose longest context spans `num_pages` pages."""
        if num_pages > self.max_pages_per_seq:
            raise ValueError(f"a context of {num_pages} pages exceeds max_model_len")
        if len(self.page_table_widths) == 1:
            return self.page_table_widths[0]
        return min(1 << max(0, num_pages - 1).bit_length(), self.max_pages_per_seq)

    def build(self, output: SchedulerOutput) -> Slab:
        entries = output.scheduled
        if not entries:
            raise ValueError("cannot build a slab for an empty step")
        n = len(entries)
        q_lens = np.fromiter((e.num_new_tokens for e in entries), _I32, n)
        starts = np.fromiter((e.start_position for e in entries), _I32, n)
        kv_lens = starts + q_lens
        seq_pages = (kv_lens + (self.page_size - 1)) // self.page_size
        bucket = self.bucket_for(int(q_lens.sum()))
        num_slots = self.num_slots_for(bucket)
        page_indices = self._page_indices(output, seq_pages, num_slots)
        cu_q_lens = _cumulative(q_lens, num_slots)
        token_ids, positions, slot_mapping = self._token_rows(
            entries, q_lens, starts, cu_q_lens, page_indices, bucket
        )
        return Slab(
            token_ids=token_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            cu_q_lens=cu_q_lens,
            kv_lens=_padded(kv_lens, num_slots),
            page_indices=page_indices,
            num_seqs=np.array([n], _I32),
            logits_indices=_padded(cu_q_lens[1 : n + 1] - 1, num_slots),
            sample_mask=_padded(np.fromiter((e.needs_sample for e in entries), bool, n), num_slots),
            request_ids=[e.seq.request_id for e in entries],
            num_tokens=int(cu_q_lens[n]),
        )

    def padding_slab(self, bucket: int, width: int) -> Slab:
        """A slab of shape (bucket, width) with no sequence in it: compiles and runs as a no-op."""
        num_slots = self.num_slots_for(bucket)
        return Slab(
            token_ids=np.zeros(bucket, _I32),
            positions=np.zeros(bucket, _I32),
            slot_mapping=np.full(bucket, self.padding_slot, _I32),
            cu_q_lens=np.zeros(num_slots + 1, _I32),
            kv_lens=np.zeros(num_slots, _I32),
            page_indices=np.full((num_slots, width), NULL_PAGE, _I32),
            num_seqs=np.zeros(1, _I32),
            logits_indices=np.zeros(num_slots, _I32),
            sample_mask=np.zeros(num_slots, bool),
            request_ids=[],
            num_tokens=0,
        )

    def _page_indices(self, output: SchedulerOutput, seq_pages: np.ndarray, num_slots: int) -> np.ndarray:
        """i32[S, W]: each slot's first seq_pages[i] page ids (pages reserved beyond: left out)."""
        tables, n = output.page_tables, output.num_seqs
        if tables is None:
            raise ValueError("the SchedulerOutput carries no page tables")
        rows = np.fromiter((e.seq.page_table_row for e in output.scheduled), np.intp, n)
        if (rows < 0).any() or (tables.lengths[rows] < seq_pages).any():
            raise ValueError("a scheduled sequence lacks pages for its new tokens")
        width = self.width_for(int(seq_pages.max()))
        in_context = np.arange(width) < seq_pages[:, None]  # bool[n, W]
        page_indices = np.full((num_slots, width), NULL_PAGE, _I32)
        page_indices[:n] = np.where(in_context, tables.array[rows, :width], NULL_PAGE)
        return page_indices

    def _token_rows(
        self,
        entries: list[ScheduledSeq],
        q_lens: np.ndarray,
        starts: np.ndarray,
        cu_q_lens: np.ndarray,
        page_indices: np.ndarray,
        bucket: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """token_ids, positions and slot_mapping, each i32[T]."""
        total = int(cu_q_lens[len(entries)])
        rows = np.repeat(np.arange(len(entries)), q_lens)  # i32[total]: slot of each row
        pos = np.arange(total, dtype=_I32) - cu_q_lens[rows] + starts[rows]
        pages = page_indices[rows, pos // self.page_size]
        token_ids = np.zeros(bucket, _I32)
        token_ids[:total] = _new_token_ids(entries)
        positions = np.zeros(bucket, _I32)
        positions[:total] = pos
        slot_mapping = np.full(bucket, self.padding_slot, _I32)
        slot_mapping[:total] = pages * self.page_size + pos % self.page_size
        return token_ids, positions, slot_mapping


def _new_token_ids(entries: list[ScheduledSeq]) -> list[int]:
    """The tokens of every entry, in slab order."""
    tokens: list[int] = []
    for e in entries:
        if e.num_new_tokens == 1:  # a decode: index, do not slice (the common case, 256 a step)
            tokens.append(e.seq.all_token_ids[e.start_position])
        else:
            tokens.extend(e.seq.all_token_ids[e.start_position : e.start_position + e.num_new_tokens])
    return tokens


def _widths_up_to(cap: int) -> tuple[int, ...]:
    """Powers of two below `cap`, then `cap`."""
    widths = [1 << i for i in range(cap.bit_length()) if 1 << i < cap]
    return (*widths, cap)


def _cumulative(q_lens: np.ndarray, num_slots: int) -> np.ndarray:
    """i32[S + 1]: 0, then running totals, then the last total repeated for unused slots."""
    cu = np.zeros(num_slots + 1, _I32)
    cu[1 : len(q_lens) + 1] = np.cumsum(q_lens)
    cu[len(q_lens) + 1 :] = cu[len(q_lens)]
    return cu


def _padded(values: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size, values.dtype)
    out[: len(values)] = values
    return out
