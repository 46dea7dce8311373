"""The kernels' build: once per process and library (concurrent callers wait for one build), a failed
build reported again (not retried) to whoever needs the kernels next, and the set-up's line. The
compiler is replaced by a stand-in here (the real build runs wherever a kernel test first loads the
library)."""

import threading

import jax
import pytest

from cpu_kernels import build
from fastgen_jax.attention import build_cpu_kernels


@pytest.fixture
def fake_compiler(monkeypatch, tmp_path):
    """`compile_library` that takes until `release` is set, then writes the file (or raises `fail`)."""
    calls, started, release, fail = [], threading.Event(), threading.Event(), []
    path = tmp_path / "fastgen_kernels-test.so"

    def compile_library(target):
        calls.append(threading.current_thread().name)
        started.set()
        assert release.wait(10)
        if fail:
            raise build.KernelBuildError(fail[0])
        target.write_bytes(b"library")

    monkeypatch.setattr(build, "library_path", lambda: path)
    monkeypatch.setattr(build, "compile_library", compile_library)
    monkeypatch.setattr(build, "_build_errors", {})
    compile_library.started = started
    return path, calls, release, fail


def test_concurrent_builds_in_one_process_compile_once(fake_compiler):
    path, calls, release, _ = fake_compiler
    first = threading.Thread(target=build.build, name="first")
    first.start()
    assert build.compile_library.started.wait(10)  # the first build holds the lock
    second = threading.Thread(target=build.build, name="second")
    second.start()
    second.join(0.2)
    assert second.is_alive() and not path.exists()  # waiting for the first
    release.set()
    first.join(10)
    second.join(10)
    assert path.exists() and calls == ["first"]
    assert build.build() == path and len(calls) == 1


def test_a_failed_build_is_raised_again_not_tried_again(fake_compiler):
    _, calls, release, fail = fake_compiler
    fail.append("g++ failed (exit 1): no compiler here")
    release.set()
    for _ in range(2):
        with pytest.raises(build.KernelBuildError, match="no compiler here"):
            build.build()
    assert len(calls) == 1


def test_an_unwritable_cache_is_a_build_error(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    with pytest.raises(build.KernelBuildError, match="cannot write the kernel library"):
        build.compile_library(blocker / "kernels" / "fastgen_kernels-x.so")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the set-up builds them for the CPU backend")
def test_the_set_up_says_what_it_did(fake_compiler, monkeypatch):
    path, calls, release, fail = fake_compiler
    release.set()
    monkeypatch.setattr(build, "library_path", lambda: path)
    assert build_cpu_kernels().startswith("CPU kernels: built in ")
    assert build_cpu_kernels() == f"CPU kernels: already built ({path})"
    path.unlink()
    monkeypatch.setattr(build, "_build_errors", {})
    fail.append("g++ failed (exit 1): no compiler here\nmore")
    said = build_cpu_kernels()
    assert said == (
        "CPU kernels: the build failed, the engine will use the reference attention: "
        "g++ failed (exit 1): no compiler here"
    )
    assert len(calls) == 2
