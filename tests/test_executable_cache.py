"""Step programs kept on disk (`fastgen_jax.executable_cache`): a second engine of the same
description loads every program without tracing and generates exactly what the first did; a damaged
entry is compiled again; an engine that differs in what its programs are made of compiles its own."""

from __future__ import annotations

import logging
import os
import pickle

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from fastgen_jax import executable_cache
from fastgen_jax.checkpoints import Checkpoint
from fastgen_jax.config import EngineConfig
from fastgen_jax.llm_engine import LLMEngine
from tests.test_attention_dispatch import random_params, tiny_config, word_tokenizer
from tests.test_llm_engine import run_with_logprobs


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """The compilation cache (and so this one) in a directory of the test's own; calls counted."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = [getattr(jax.config, n) for n in names]
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # JAX's cache keeps all
    compilation_cache.reset_cache()  # JAX's cache object binds its directory once: here, this one
    monkeypatch.setattr(executable_cache, "ENABLED", True)  # off elsewhere in the suite (conftest)
    calls = {"hits": 0, "saves": 0}
    load, save = executable_cache.load, executable_cache.save

    def counted_load(*args):
        found = load(*args)
        calls["hits"] += found is not None
        return found

    def counted_save(*args):
        calls["saves"] += 1
        save(*args)

    monkeypatch.setattr(executable_cache, "load", counted_load)
    monkeypatch.setattr(executable_cache, "save", counted_save)
    monkeypatch.setattr(executable_cache, "_warned", set())
    yield tmp_path / "executables", calls
    for name, value in zip(names, before, strict=True):
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    assert jax.config.jax_enable_compilation_cache  # the bypass always puts it back


CONFIG = tiny_config(max_position_embeddings=128)


def _engine(seed=0, devices=None, **overrides):
    checkpoint = Checkpoint(CONFIG, random_params(CONFIG, seed), word_tokenizer(CONFIG.vocab_size), "")
    config = dict(max_num_seqs=4, page_size=8, max_model_len=96, token_budget=32, token_buckets=(32,))
    config.update(overrides)
    return LLMEngine(checkpoint, EngineConfig(**config), dtype="float32", progress=False, devices=devices)


def _workload():
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, CONFIG.vocab_size, n).tolist() for n in (45, 3, 21, 9)]
    return prompts, [12, 20, 7, 15]


def test_a_second_engine_loads_every_program_and_generates_the_same(cache_dir, caplog):
    where, calls = cache_dir
    with pytest.MonkeyPatch.context() as m:  # this cache off: the programs go into JAX's cache
        m.setattr(executable_cache, "directory", lambda: None)
        other_weights = run_with_logprobs(_engine(seed=1), *_workload())[0]
    assert calls == {"hits": 0, "saves": 0}
    # Compiled afresh, not taken from JAX's cache (XLA:CPU cannot serialize those again: the second
    # engine's steps would fail with "Function ... not found"), and stored.
    first = _engine()
    programs = first.runner.num_compiled
    assert programs >= 1 and calls == {"hits": 0, "saves": programs}
    assert len(list(where.glob("*.bin"))) == programs
    want = run_with_logprobs(first, *_workload(), logprobs=True)
    assert want[0] != other_weights
    del first
    for path in where.glob("*.bin"):
        os.utime(path, (0, 0))
    second = _engine()
    assert calls == {"hits": programs, "saves": programs}  # nothing traced, nothing stored again
    assert all(path.stat().st_mtime > 0 for path in where.glob("*.bin"))  # used: kept longest
    got = run_with_logprobs(second, *_workload(), logprobs=True)
    assert got[0] == want[0]
    for a, b in zip(got[1], want[1], strict=True):
        np.testing.assert_array_equal(a, b)
    del second
    # The programs take the weights as arguments: other weights of the same shapes load them too and
    # generate what the engine compiled without this cache did.
    assert run_with_logprobs(_engine(seed=1), *_workload())[0] == other_weights
    assert calls == {"hits": 2 * programs, "saves": programs}
    # A damaged entry: one log line, compiled and stored again, the same outputs.
    for path in where.glob("*.bin"):
        path.write_bytes(b"not a pickle")
    with caplog.at_level(logging.WARNING, logger="fastgen_jax.executable_cache"):
        third = _engine()
    assert calls == {"hits": 2 * programs, "saves": 2 * programs}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith("executable cache: cannot load"), warnings
    assert run_with_logprobs(third, *_workload())[0] == want[0]


def test_what_the_programs_are_made_of_names_them(cache_dir):
    where, calls = cache_dir
    small = dict(
        token_buckets=(16,), token_budget=16, max_model_len=16
    )  # few programs, even for the reference
    programs = _engine(**small).runner.num_compiled
    # the same shapes, another attention (as when `auto` falls back to the reference): its own
    reference = _engine(**small, attention_impl="reference").runner.num_compiled
    assert calls == {"hits": 0, "saves": programs + reference}
    assert len(list(where.glob("*.bin"))) == programs + reference
    assert _engine(**small, attention_impl="reference").runner.num_compiled == calls["hits"] == reference


def test_settings_changed_at_run_time_change_the_key(cache_dir, monkeypatch):
    """JAX's settings (a thread's own context too), XLA's environment and this package's module
    constants (benchmarks compare programs by setting them) are read at every key."""
    from fastgen_jax import attention

    description = ("step", "a description")
    plain = executable_cache.key(description)
    assert executable_cache.key(description) == plain
    with jax.default_matmul_precision("highest"):
        assert executable_cache.key(description) != plain
    monkeypatch.setattr(attention, "F32_KERNEL_ROWS", 0)
    changed = executable_cache.key(description)
    assert changed != plain
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert executable_cache.key(description) not in (plain, changed)
    assert executable_cache.key(("step", "another")) not in (plain, changed)


@pytest.mark.parametrize("answered_by_jax", [True, False])
def test_a_compilation_that_jax_s_cache_answered_is_not_stored(cache_dir, answered_by_jax):
    """Another thread's compilation may turn JAX's cache back on mid-way; what it returns then (a
    deserialized executable, which XLA:CPU cannot serialize again) is used but never stored."""
    _, calls = cache_dir

    class Lowered:
        def compile(self):
            assert not jax.config.jax_enable_compilation_cache  # bypassed during the compilation
            if answered_by_jax:
                jax.monitoring.record_event("/jax/compilation_cache/cache_hits")
            return "an executable"

    stored = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(executable_cache, "save", lambda *args: stored.append(args))
        assert executable_cache.compiled("name", None, jax.devices()[:1], Lowered) == "an executable"
    assert stored == ([] if answered_by_jax else [("name", "an executable", jax.devices()[:1])])
    assert jax.config.jax_enable_compilation_cache and calls["hits"] == 0


@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_replicas_on_other_devices_load_the_programs_and_generate_the_same(cache_dir, tensor_parallel):
    """A replica on other devices (of the same number and kinds) loads what the first compiled, each
    of its devices in the place of the one at its position, and generates exactly what the first
    does; so do a mesh of those devices in the other order and one of the first replica's own devices
    in the other order. (The suite runs on 4 CPU devices.)"""
    where, calls = cache_dir
    devices = jax.devices()
    assert len(devices) >= 2 * tensor_parallel
    first = _engine(devices=devices[:tensor_parallel], tensor_parallel=tensor_parallel)
    programs = first.runner.num_compiled
    assert calls == {"hits": 0, "saves": programs}
    want = run_with_logprobs(first, *_workload(), logprobs=True)
    others = devices[tensor_parallel : 2 * tensor_parallel]
    for group in (others, others[::-1], devices[:tensor_parallel][::-1]):
        replica = _engine(devices=group, tensor_parallel=tensor_parallel)
        assert calls == {"hits": programs, "saves": programs}, group  # nothing compiled
        calls["hits"] = 0
        assert {d for x in jax.tree.leaves(replica.runner.kv_cache) for d in x.devices()} == set(group)
        got = run_with_logprobs(replica, *_workload(), logprobs=True)
        assert got[0] == want[0]
        for a, b in zip(got[1], want[1], strict=True):
            np.testing.assert_array_equal(a, b)
        if tensor_parallel == 1:
            break  # one device has one order (and [::-1] of the first is the first)
    assert len(list(where.glob("*.bin"))) == programs
    if tensor_parallel == 2:  # an entry that names its devices in the wrong order: refused, compiled
        for path in where.glob("*.bin"):
            payload, in_tree, out_tree, compiled_for = pickle.loads(path.read_bytes())
            path.write_bytes(pickle.dumps((payload, in_tree, out_tree, compiled_for[::-1])))
        replica = _engine(devices=others, tensor_parallel=tensor_parallel)
        assert calls == {"hits": 0, "saves": 2 * programs}
        assert run_with_logprobs(replica, *_workload())[0] == want[0]


def test_the_least_recently_used_entries_beyond_the_limit_are_deleted(tmp_path, monkeypatch):
    for age, name in enumerate(("newest", "newer", "older", "oldest")):
        path = tmp_path / f"{name}.bin"
        path.write_bytes(b"x" * 100)
        os.utime(path, (1000 - age, 1000 - age))
    monkeypatch.setattr(executable_cache, "MAX_BYTES", 250)
    executable_cache._evict(tmp_path)
    assert sorted(p.stem for p in tmp_path.glob("*.bin")) == ["newer", "newest"]
