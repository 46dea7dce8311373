"""A fixed pool of KV pages: reference counts, a free list, and the prefix cache's index of full pages.

The device holds the KV cache as `num_pages` pages of `page_size` token slots each; this module
only decides which sequence owns which page id. Every usable page is in exactly one of three states:

- **free**: no owner, no content worth keeping; in `_free`.
- **cached**: no owner, but it holds the KV of a full page of tokens whose `PageKey` is in the index,
  so a later request with the same prefix can take it over instead of recomputing it; in `_evictable`,
  least recently used first.
- **in use**: one or more owners (`refcount > 0`); it may also carry a key (a full page whose KV has been
  written), and then other sequences share it by `touch`.

`allocate` takes free pages first and only then evicts cached ones, least recently used first
(dropping their keys); a page in use is never handed out. `free` drops owners; a page whose last owner
lets go becomes cached if it has a key, else free. Callers free a sequence's pages deepest first and
index only chains of one sequence's own pages, and a hit takes a chain from its root, so a parent is
always used at least as recently as its children: the deepest page of a chain is evicted first, and a
parent page id stored in the index never refers to a page that was evicted and reused.

A key names a page's content exactly: the page's token ids, its parent's hash (the hash of the keys of
every page before it) and the extra keys that change KV for the same tokens (a tenant's cache salt).
`lookup` compares the stored token ids and the parent page, so a hash collision cannot mix two
prompts' KV.

Page 0 is never handed out. The slab builder points the page-table padding at it, so the device may
read it freely (its contents are garbage that masking ignores); usable pages are 1..num_pages-1.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Iterable, Sequence
from typing import NamedTuple

import numpy as np

NULL_PAGE = 0


class OutOfPagesError(RuntimeError):
    """More pages were asked for than are free. The scheduler checks first, so this is a bug."""


class PageKey(NamedTuple):
    """The content of one full KV page: what it holds and everything before it. A tuple, so that
    building and hashing one is cheap (a decoding sequence makes one per page it fills)."""

    parent_hash: int  # `hash` of the previous page's key; ROOT_HASH for a sequence's first page
    token_ids: tuple[int, ...]  # the page_size tokens whose KV the page holds
    extra: Hashable = None  # anything else that changes the KV for these tokens (cache salt)


ROOT_HASH = 0


def page_keys(
    token_ids: Sequence[int],
    page_size: int,
    extra: Hashable = None,
    start: int = 0,
    parent_hash: int = ROOT_HASH,
) -> list[PageKey]:
    """Keys of the full pages of `token_ids` from page `start` on (`parent_hash`: the key hash of page
    start - 1). `extra` goes into every key, so different salts never share a page."""
    keys = []
    for i in range(start, len(token_ids) // page_size):
        key = PageKey(parent_hash, tuple(token_ids[i * page_size : (i + 1) * page_size]), extra)
        keys.append(key)
        parent_hash = hash(key)
    return keys


class PageAllocator:
    """Hands out KV page ids 1..num_pages-1 and takes them back; indexes full pages by content."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"a page pool needs page 0 plus at least one usable page: {num_pages=}")
        self.num_pages = num_pages
        self._free: collections.deque[int] = collections.deque(range(1, num_pages))
        self._evictable: dict[int, None] = {}  # cached pages, least recently used first (insertion order)
        self._refcounts = [0] * num_pages
        self._keys: list[PageKey | None] = [None] * num_pages
        self._parents = [NULL_PAGE] * num_pages  # the page before a keyed page in its chain
        self._index: dict[PageKey, int] = {}
        self.num_evictions = 0

    @property
    def num_usable(self) -> int:
        """Pages that can ever be handed out (all but the null page)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        """Pages with no owner and no cached content."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Pages with no owner that hold a cached prefix page (evictable)."""
        return len(self._evictable)

    @property
    def num_available(self) -> int:
        """Pages an allocation may take: free ones, then cached ones by eviction."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Pages in use (one or more owners)."""
        return self.num_usable - self.num_available

    @property
    def usage(self) -> float:
        """Fraction of the usable pages that are in use, in [0, 1]."""
        return self.num_used / self.num_usable

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_available

    def refcount(self, page: int) -> int:
        self._check_in_range(page)
        return self._refcounts[page]

    def key(self, page: int) -> PageKey | None:
        self._check_in_range(page)
        return self._keys[page]

    def allocate(self, n: int) -> list[int]:
        """Takes `n` pages, free ones first, then the least recently used cached ones; each gets one
        owner and no key."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages: {n=}")
        if n > self.num_available:
            raise OutOfPagesError(f"asked for {n} pages but only {self.num_available} are free")
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:
                page = next(iter(self._evictable))
                del self._evictable[page]
                self._uncache(page)
                self.num_evictions += 1
            self._refcounts[page] = 1
            pages.append(page)
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        """Adds an owner to each (already allocated) page."""
        pages = list(pages)
        for page in pages:
            self._check_owned(page, 1, "shared")
        for page in pages:
            self._refcounts[page] += 1

    def touch(self, pages: Iterable[int]) -> None:
        """Adds an owner to each cached or in-use page (a prefix-cache hit): a cached page leaves the
        eviction list and is in use again."""
        pages = list(pages)
        for page in pages:
            self._check_in_range(page)
            if self._keys[page] is None:
                raise ValueError(f"page {page} holds no cached content to share")
        for page in pages:
            if self._refcounts[page] == 0:
                del self._evictable[page]
            self._refcounts[page] += 1

    def free(self, pages: Iterable[int]) -> None:
        """Drops one owner of each page, in the order given; a page with no owner left becomes cached
        (most recently used) if it has a key, else free. Pass a sequence's pages deepest first.

        All pages are checked before any is freed, so a bad call changes nothing.
        """
        pages = list(pages)
        counts = collections.Counter(pages)
        for page, n in counts.items():
            self._check_owned(page, n, "freed")
        for page in pages:
            self._refcounts[page] -= 1
            if self._refcounts[page] == 0:
                if self._keys[page] is None:
                    self._free.append(page)
                else:
                    self._evictable[page] = None

    # -- the prefix cache ---------------------------------------------------------------------------

    def cache(self, page: int, key: PageKey, parent: int = NULL_PAGE) -> bool:
        """Indexes an in-use page whose KV is now written as holding `key` (after `parent` in its
        chain). False, changing nothing, if the page already has a key or another page holds `key`
        (two sequences computed the same page at once: the first one is kept)."""
        self._check_owned(page, 1, "cached")
        if self._keys[page] is not None:
            return False
        if key in self._index:
            return False
        self._keys[page] = key
        self._parents[page] = parent
        self._index[key] = page
        return True

    def lookup(self, key: PageKey, parent: int = NULL_PAGE) -> int | None:
        """The page holding exactly `key` after `parent`, cached or in use; None on a miss."""
        page = self._index.get(key)
        if page is None or self._parents[page] != parent:
            return None
        return page

    def match(self, keys: Iterable[PageKey]) -> list[int]:
        """The pages of the longest cached chain that starts `keys` (a prefix-cache hit)."""
        pages: list[int] = []
        parent = NULL_PAGE
        for key in keys:
            page = self.lookup(key, parent)
            if page is None:
                break
            pages.append(page)
            parent = page
        return pages

    def reset_cache(self) -> int:
        """Forgets every cached page (cached ones become free; pages in use lose their keys, so
        they are never shared again). Returns how many pages were forgotten."""
        forgotten = len(self._index)
        for page in self._index.values():
            self._keys[page] = None
            self._parents[page] = NULL_PAGE
        self._index.clear()
        self._free.extend(self._evictable)
        self._evictable.clear()
        return forgotten

    def _uncache(self, page: int) -> None:
        key = self._keys[page]
        if key is not None:
            del self._index[key]
            self._keys[page] = None
            self._parents[page] = NULL_PAGE

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

    def truncate(self, row: int, length: int) -> None:
        """Keeps the first `length` pages of a row (the sequence gave the rest back)."""
        self.array[row, length : self.lengths[row]] = NULL_PAGE
        self.lengths[row] = min(int(self.lengths[row]), length)

    def free_row(self, row: int) -> None:
        """Gives a row back, its pages reset to NULL_PAGE: a row's entries past its length are always
        NULL_PAGE, so the planner copies rows without masking them."""
        self.array[row, : self.lengths[row]] = NULL_PAGE
        self.lengths[row] = 0
        self._free_rows.append(row)
