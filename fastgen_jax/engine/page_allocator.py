"""A fixed pool of KV pages: a free list plus a reference count per page.

The device holds the KV cache as `num_pages` pages of `page_size` token slots each; this module
only decides which sequence owns which page id. Reference counts let a future prefix cache share a
page between sequences: `incref` adds an owner, `free` drops one, and a page returns to the free
list when its last owner lets go.

Page 0 is never handed out. The slab builder points the page-table padding at it, so the device may
read it freely (its contents are garbage that masking ignores); usable pages are 1..num_pages-1.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

import numpy as np

NULL_PAGE = 0


class OutOfPagesError(RuntimeError):
    """More pages were asked for than are free. The scheduler checks first, so this is a bug."""


class PageAllocator:
    """Hands out KV page ids 1..num_pages-1 (lowest first) and takes them back."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"a page pool needs page 0 plus at least one usable page: {num_pages=}")
        self.num_pages = num_pages
        self._free: collections.deque[int] = collections.deque(range(1, num_pages))
        self._refcounts = [0] * num_pages

    @property
    def num_usable(self) -> int:
        """Pages that can ever be handed out (all but the null page)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    @property
    def usage(self) -> float:
        """Fraction of the usable pages that are owned, in [0, 1]."""
        return self.num_used / self.num_usable

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def refcount(self, page: int) -> int:
        self._check_in_range(page)
        return self._refcounts[page]

    def allocate(self, n: int) -> list[int]:
        """Takes `n` pages off the free list, each with one owner."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages: {n=}")
        if n > len(self._free):
            raise OutOfPagesError(f"asked for {n} pages but only {len(self._free)} are free")
        pages = [self._free.popleft() for _ in range(n)]
        for page in pages:
            self._refcounts[page] = 1
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        """Adds an owner to each (already allocated) page."""
        pages = list(pages)
        for page in pages:
            self._check_owned(page, 1, "shared")
        for page in pages:
            self._refcounts[page] += 1

    def free(self, pages: Iterable[int]) -> None:
        """Drops one owner of each page; a page with no owner left goes back to the free list.

        All pages are checked before any is freed, so a bad call changes nothing.
        """
        counts = collections.Counter(pages)
        for page, n in counts.items():
            self._check_owned(page, n, "freed")
        for page, n in counts.items():
            self._refcounts[page] -= n
            if self._refcounts[page] == 0:
                self._free.append(page)

    def _check_in_range(self, page: int) -> None:
        if not 0 <= page < self.num_pages:
            raise ValueError(f"page {page} is outside the pool of {self.num_pages} pages")

    def _check_owned(self, page: int, n: int, action: str) -> None:
        self._check_in_range(page)
        if page == NULL_PAGE:
            raise ValueError("page 0 is the reserved null page; it is never allocated or freed")
        if self._refcounts[page] < n:
            raise ValueError(
                f"page {page} has {self._refcounts[page]} owner(s) but is {action} {n} time(s): "
                "a double free, or a page that was never allocated"
            )


class PageTables:
    """The page tables of the running sequences as one matrix, so a step gathers rows, not lists.

    Each running sequence owns a row: `array[row, :lengths[row]]` are its page ids in order, the
    same ids as its `Sequence.page_table` list (the scheduler writes both). The slab builder copies
    rows with one fancy index instead of converting thousands of Python ints every step.
    """

    def __init__(self, max_seqs: int, max_pages_per_seq: int):
        self.array = np.full((max_seqs, max_pages_per_seq), NULL_PAGE, np.int32)  # i32[R, P]
        self.lengths = np.zeros(max_seqs, np.int32)  # i32[R]: pages in each row
        self._free_rows = list(range(max_seqs - 1, -1, -1))  # popped from the end: row 0 first

    @property
    def max_pages_per_seq(self) -> int:
        return self.array.shape[1]

    def add_row(self, pages: list[int]) -> int:
        """Takes a free row for a newly running sequence and writes its pages; returns the row."""
        if not self._free_rows:
            raise RuntimeError(f"all {len(self.lengths)} page-table rows are in use")
        if len(pages) > self.max_pages_per_seq:
            raise ValueError(f"{len(pages)} pages exceed a row of {self.max_pages_per_seq}")
        row = self._free_rows.pop()
        self.array[row, : len(pages)] = pages
        self.lengths[row] = len(pages)
        return row

    def append(self, row: int, page: int) -> None:
        length = int(self.lengths[row])
        if length == self.max_pages_per_seq:
            raise ValueError(f"row {row} already holds {length} pages, a sequence's maximum")
        self.array[row, length] = page
        self.lengths[row] = length + 1

    def free_row(self, row: int) -> None:
        self.lengths[row] = 0
        self._free_rows.append(row)
