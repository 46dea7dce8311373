"""PageAllocator: a fixed pool of KV pages with reference counts; page 0 is never handed out."""

import pytest

from fastgen_jax.engine import NULL_PAGE, OutOfPagesError, PageAllocator, PageTables


def test_a_new_pool_has_every_page_but_the_null_page_free():
    pool = PageAllocator(8)
    assert (pool.num_usable, pool.num_free, pool.num_used, pool.usage) == (7, 7, 0, 0.0)


def test_allocate_hands_out_lowest_pages_first_and_never_page_zero():
    pool = PageAllocator(5)
    assert pool.allocate(2) == [1, 2]
    assert pool.allocate(2) == [3, 4]
    assert NULL_PAGE == 0
    assert pool.num_free == 0


def test_allocate_zero_pages_returns_nothing():
    pool = PageAllocator(3)
    assert pool.allocate(0) == []
    assert pool.num_free == 2


def test_allocating_more_than_free_raises_and_changes_nothing():
    pool = PageAllocator(4)
    pool.allocate(2)
    with pytest.raises(OutOfPagesError, match="asked for 2 pages but only 1 are free"):
        pool.allocate(2)
    assert pool.num_free == 1


def test_freed_pages_return_to_the_free_list():
    pool = PageAllocator(4)
    pages = pool.allocate(3)
    pool.free(pages[:2])
    assert pool.num_free == 2
    assert pool.allocate(2) == [1, 2]


def test_usage_counts_owned_pages():
    pool = PageAllocator(5)
    pool.allocate(3)
    assert pool.usage == 0.75
    assert pool.can_allocate(1) and not pool.can_allocate(2)


def test_a_shared_page_is_freed_only_by_its_last_owner():
    pool = PageAllocator(3)
    [page] = pool.allocate(1)
    pool.incref([page])
    assert pool.refcount(page) == 2
    pool.free([page])
    assert pool.num_free == 1
    pool.free([page])
    assert pool.num_free == 2 and pool.refcount(page) == 0


def test_double_free_raises():
    pool = PageAllocator(3)
    [page] = pool.allocate(1)
    pool.free([page])
    with pytest.raises(ValueError, match="double free"):
        pool.free([page])


def test_freeing_a_page_never_allocated_raises():
    pool = PageAllocator(4)
    with pytest.raises(ValueError, match="page 2 has 0 owner"):
        pool.free([2])


def test_freeing_the_same_page_twice_in_one_call_raises_and_frees_nothing():
    pool = PageAllocator(4)
    pages = pool.allocate(2)
    with pytest.raises(ValueError):
        pool.free([pages[0], pages[1], pages[0]])
    assert pool.num_free == 1
    assert [pool.refcount(p) for p in pages] == [1, 1]


def test_the_null_page_cannot_be_freed_or_shared():
    pool = PageAllocator(3)
    with pytest.raises(ValueError, match="null page"):
        pool.free([NULL_PAGE])
    with pytest.raises(ValueError, match="null page"):
        pool.incref([NULL_PAGE])


def test_pages_outside_the_pool_are_rejected():
    pool = PageAllocator(3)
    with pytest.raises(ValueError, match="outside the pool"):
        pool.free([3])


def test_incref_of_a_free_page_raises():
    pool = PageAllocator(3)
    with pytest.raises(ValueError, match="never allocated"):
        pool.incref([1])


def test_a_pool_needs_a_usable_page():
    with pytest.raises(ValueError, match="num_pages=1"):
        PageAllocator(1)


def test_page_tables_keep_one_row_per_sequence():
    tables = PageTables(max_seqs=2, max_pages_per_seq=4)
    first = tables.add_row([5, 3])
    second = tables.add_row([7])
    tables.append(second, 2)
    assert (first, second) == (0, 1)
    assert tables.lengths.tolist() == [2, 2]
    assert tables.array[:, :2].tolist() == [[5, 3], [7, 2]]


def test_a_freed_page_table_row_is_reused():
    tables = PageTables(max_seqs=2, max_pages_per_seq=4)
    row = tables.add_row([5])
    tables.add_row([6])
    tables.free_row(row)
    assert tables.lengths[row] == 0
    assert tables.add_row([9, 8]) == row
    tables.free_row(row)
    assert tables.add_row([4]) == row
    # past its length a row holds NULL_PAGE, never a page of the sequence that had it before
    assert tables.array[row].tolist() == [4, NULL_PAGE, NULL_PAGE, NULL_PAGE]
    with pytest.raises(RuntimeError, match="all 2 page-table rows are in use"):
        tables.add_row([1])


def test_a_page_table_row_holds_at_most_a_sequence_of_max_model_len():
    tables = PageTables(max_seqs=1, max_pages_per_seq=2)
    with pytest.raises(ValueError, match="3 pages exceed a row of 2"):
        tables.add_row([1, 2, 3])
    row = tables.add_row([1, 2])
    with pytest.raises(ValueError, match="already holds 2 pages"):
        tables.append(row, 3)
