"""The prefix cache on the host: page keys, the allocator's three page states and LRU eviction, and the
scheduler taking cached pages over at admission."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from fastgen_jax.config import EngineConfig
from fastgen_jax.engine import PageAllocator, Scheduler, Sequence, SequenceStatus
from fastgen_jax.engine.page_allocator import ROOT_HASH, PageKey, page_keys
from tests.engine.test_scheduler import Request, Simulation, Workload

TOKEN = 7


def make_scheduler(budget=64, page_size=4, num_pages=33, max_model_len=64, max_num_seqs=8, caching=True):
    return Scheduler(
        EngineConfig(
            token_budget=budget,
            max_num_seqs=max_num_seqs,
            page_size=page_size,
            num_pages=num_pages,
            max_model_len=max_model_len,
            enable_prefix_caching=caching,
        )
    )


def run(scheduler, seqs=()):
    """Steps until every sequence has `max_tokens` outputs; returns [(id, start, num_new)] per step."""
    steps = []
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        steps.append([(e.seq.request_id, e.start_position, e.num_new_tokens) for e in out.scheduled])
        scheduler.postprocess(out, [TOKEN] * out.num_seqs)
        for e in out.scheduled:
            if e.seq.num_output_tokens == e.seq.max_tokens:
                scheduler.finish(e.seq, SequenceStatus.FINISHED_LENGTH)
    return steps


# -- keys ---------------------------------------------------------------------------------------------


def test_keys_cover_full_pages_only_and_chain_their_parents():
    keys = page_keys(list(range(10)), page_size=4)
    assert [k.token_ids for k in keys] == [(0, 1, 2, 3), (4, 5, 6, 7)]  # tokens 8-9: a partial page
    assert keys[0].parent_hash == ROOT_HASH and keys[1].parent_hash == hash(keys[0])


def test_the_same_page_after_different_prefixes_or_salts_has_different_keys():
    a, b = page_keys([1, 2, 3, 4, 9, 9], 2), page_keys([1, 2, 3, 5, 9, 9], 2)
    assert a[2].token_ids == b[2].token_ids and a[2] != b[2]
    assert page_keys([1, 2], 2, extra="x") != page_keys([1, 2], 2, extra="y")


# -- the allocator ------------------------------------------------------------------------------------


def cached_page(pool, key, parent=0):
    [page] = pool.allocate(1)
    assert pool.cache(page, key, parent)
    return page


def test_a_freed_page_with_a_key_is_cached_and_a_hit_takes_it_back():
    pool = PageAllocator(4)
    key = PageKey(ROOT_HASH, (1, 2))
    page = cached_page(pool, key)
    pool.free([page])
    assert (pool.num_free, pool.num_cached, pool.num_used) == (2, 1, 0)
    assert pool.match([key]) == [page]
    pool.touch([page])
    assert (pool.num_cached, pool.refcount(page)) == (0, 1)


def test_allocation_takes_free_pages_before_evicting_cached_ones_least_recent_first():
    pool = PageAllocator(5)
    keys = [PageKey(ROOT_HASH, (i,)) for i in range(3)]
    pages = [cached_page(pool, k) for k in keys]  # pages 1, 2, 3; page 4 stays free
    pool.free([pages[1]])
    pool.free([pages[0]])
    pool.free([pages[2]])  # least recent first: 2, 1, 3
    assert pool.allocate(1) == [4]
    assert pool.allocate(2) == [pages[1], pages[0]]
    assert pool.match([keys[1]]) == [] and pool.match([keys[2]]) == [pages[2]]
    assert pool.num_evictions == 2


def test_a_lookup_checks_the_parent_page_so_a_hash_collision_cannot_mix_prefixes():
    pool = PageAllocator(6)
    first_a, first_b = (
        cached_page(pool, PageKey(ROOT_HASH, (1,))),
        cached_page(pool, PageKey(ROOT_HASH, (2,))),
    )
    collided = PageKey(12345, (7,))  # both chains' second pages, as if their parents' hashes collided
    second_a = cached_page(pool, collided, parent=first_a)
    assert pool.lookup(collided, parent=first_a) == second_a
    assert pool.lookup(collided, parent=first_b) is None


def test_two_copies_of_one_page_keep_the_first_and_reset_forgets_everything():
    pool = PageAllocator(4)
    key = PageKey(ROOT_HASH, (1,))
    page = cached_page(pool, key)
    [copy] = pool.allocate(1)
    assert not pool.cache(copy, key)
    pool.free([page, copy])
    assert (pool.num_cached, pool.num_free) == (1, 2)
    assert pool.reset_cache() == 1
    assert (pool.num_cached, pool.num_free, pool.match([key])) == (0, 3, [])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["alloc", "free", "cache", "touch"]), st.integers(0, 50)), max_size=60)
)
def test_the_allocator_keeps_three_disjoint_states_and_evicts_in_lru_order(ops):
    """Random operations against a plain model of the pool: which pages are free, which are cached
    (in LRU order), how many owners the others have; eviction always takes the model's LRU page."""
    pool = PageAllocator(9)
    free, lru, owners, keys = list(range(1, 9)), [], {}, {}
    for op, x in ops:
        if op == "alloc":
            n = x % 3
            if n > len(free) + len(lru):
                continue
            expected = (free + lru)[:n]  # free pages first, then cached ones, least recent first
            assert pool.allocate(n) == expected
            for page in expected:
                if page in lru:
                    lru.remove(page)
                    del keys[page]
                else:
                    free.remove(page)
                owners[page] = 1
        elif op == "free" and owners:
            page = sorted(owners)[x % len(owners)]
            pool.free([page])
            owners[page] -= 1
            if not owners[page]:
                del owners[page]
                (lru if page in keys else free).append(page)
        elif op == "cache" and owners:
            page = sorted(owners)[x % len(owners)]
            key = PageKey(ROOT_HASH, (x,))
            cached = pool.cache(page, key)
            assert cached == (page not in keys and key not in keys.values())
            if cached:
                keys[page] = key
        elif op == "touch" and keys:
            page = sorted(keys)[x % len(keys)]
            assert pool.match([keys[page]]) == [page]
            pool.touch([page])
            if page in lru:
                lru.remove(page)
            owners[page] = owners.get(page, 0) + 1
        assert list(pool._free) == free and list(pool._evictable) == lru
        assert all(pool.refcount(p) == owners.get(p, 0) for p in range(1, 9))
        assert (pool.num_free, pool.num_cached, pool.num_used) == (len(free), len(lru), len(owners))


# -- the scheduler ------------------------------------------------------------------------------------


def test_a_later_request_with_the_same_prefix_computes_only_the_rest():
    s = make_scheduler()
    system = list(range(1, 11))  # 10 tokens: two full pages of 4 and a partial one
    s.add(Sequence("a", system + [50, 51], max_tokens=2))
    run(s)
    b = Sequence("b", system + [60, 61, 62], max_tokens=2)
    s.add(b)
    steps = run(s)
    assert steps[0] == [("b", 8, 5)]  # 8 tokens (two pages) from the cache, the partial page recomputed
    assert b.num_cached_tokens == 8
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (12 + 13, 8)


def test_the_last_prompt_token_is_always_computed_even_when_every_page_is_cached():
    s = make_scheduler()
    prompt = list(range(1, 9))  # exactly two pages
    s.add(Sequence("a", prompt, max_tokens=1))
    run(s)
    s.add(Sequence("b", prompt, max_tokens=1))
    assert run(s) == [[("b", 4, 4)]]  # one page from the cache; the last page holds the last token


def test_a_burst_of_one_prompt_prefills_it_once():
    s = make_scheduler(budget=8)
    prompt = list(range(1, 19))  # 18 tokens: four full pages
    for i in range(4):  # the n choices of one prompt, or a burst sharing a system prompt
        s.add(Sequence(f"c{i}", prompt, max_tokens=1))
    steps = run(s)
    assert steps[:3] == [
        [("c0", 0, 8)],
        [("c0", 8, 8)],
        [("c0", 16, 2), ("c1", 16, 2), ("c2", 16, 2), ("c3", 16, 2)],
    ]
    computed = sum(n for step in steps for _, _, n in step)
    assert computed == 18 + 3 * 2


def test_requests_behind_one_waiting_for_a_prefix_are_admitted_meanwhile():
    s = make_scheduler(budget=32)
    s.add(Sequence("a", list(range(1, 25)), max_tokens=1))
    s.add(Sequence("b", list(range(1, 25)) + [99], max_tokens=1))  # waits for a's pages
    s.add(Sequence("c", [200, 201, 202], max_tokens=1))  # unrelated: runs beside a
    out = s.schedule()
    assert [(e.seq.request_id, e.num_new_tokens) for e in out.scheduled] == [("a", 24), ("c", 3)]


def test_different_cache_salts_never_share_pages():
    s = make_scheduler()
    prompt = list(range(1, 14))
    s.add(Sequence("a", prompt, max_tokens=1, cache_salt="tenant-1"))
    run(s)
    b = Sequence("b", prompt, max_tokens=1, cache_salt="tenant-2")
    c = Sequence("c", prompt, max_tokens=1, cache_salt="tenant-1")
    s.add(b)
    s.add(c)
    run(s)
    assert (b.num_cached_tokens, c.num_cached_tokens) == (0, 12)


def test_without_prefix_caching_every_prompt_is_computed_whole():
    s = make_scheduler(caching=False)
    for rid in "ab":
        s.add(Sequence(rid, list(range(1, 14)), max_tokens=1))
    steps = run(s)
    assert steps == [[("a", 0, 13), ("b", 0, 13)]]
    assert s.num_cached_pages == 0 and s.prefix_cache_hits == 0


def test_an_answer_is_cached_with_its_prompt_for_the_next_turn():
    s = make_scheduler()
    first = Sequence("turn1", list(range(1, 7)), max_tokens=6)  # 6 prompt + 6 answer tokens
    s.add(first)
    run(s)
    history = first.all_token_ids  # 12 tokens; the last sampled one has no KV yet
    second = Sequence("turn2", history + [80, 81, 82], max_tokens=1)
    s.add(second)
    assert run(s)[0] == [("turn2", 8, 7)]  # pages [0, 8) were written while turn 1 ran


def test_eviction_under_pressure_keeps_outputs_consistent_and_ends_with_no_page_in_use():
    requests = [
        Request(
            str(i),
            arrival_step=i % 4,
            prompt_len=10 + i % 7,
            max_tokens=8,
            abort_step=None,
            abort_in_flight=False,
            family=i % 2,
            shared=8 + i % 3,
            cache_salt=None,
        )
        for i in range(24)
    ]
    config = EngineConfig(token_budget=16, max_num_seqs=6, page_size=2, num_pages=21, max_model_len=32)
    simulation = Simulation(Workload(config, requests, seed=3))
    simulation.rng = random.Random(3)
    simulation.run()  # checks KV contents, page states and salts at every step
    assert simulation.cached_tokens > 50 and simulation.scheduler.allocator.num_evictions > 0
    assert simulation.scheduler.num_preemptions > 0


def test_a_reset_while_a_request_runs_leaves_no_unreachable_page_in_the_index():
    s = make_scheduler(budget=8)
    prompt = list(range(1, 18))  # 17 tokens: four full pages, computed over three steps
    x = Sequence("x", prompt, max_tokens=1)
    s.add(x)
    out = s.schedule()
    s.postprocess(out, [TOKEN])
    assert s.reset_prefix_cache() == 2  # x's first two pages
    run(s)  # x's later pages follow pages without keys: not indexed
    y = Sequence("y", prompt, max_tokens=1)
    s.add(y)
    run(s)
    z = Sequence("z", prompt, max_tokens=1)
    s.add(z)
    run(s)
    assert (y.num_cached_tokens, z.num_cached_tokens) == (0, 16)
