"""The kernels' build: once per process and library, on a thread while a server loads its checkpoint,
with a failed build reported (not retried) by whoever needs the kernels next. The compiler is replaced
by a stand-in here (the real build runs wherever a kernel test first loads the library)."""

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


def test_a_background_build_is_waited_for_not_repeated(fake_compiler):
    path, calls, release, _ = fake_compiler
    thread = build.build_in_background()
    assert thread is not None and thread.name == "fastgen-kernel-build"
    assert build.compile_library.started.wait(10)  # the background build holds the lock
    waiter = threading.Thread(target=build.build)
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not path.exists()  # blocked on the background build
    release.set()
    thread.join(10)
    waiter.join(10)
    assert path.exists() and calls == ["fastgen-kernel-build"]
    assert build.build_in_background() is None  # built: nothing to start
    assert build.build() == path and len(calls) == 1


def test_a_failed_background_build_is_raised_once_and_not_tried_again(fake_compiler):
    _, calls, release, fail = fake_compiler
    fail.append("g++ failed (exit 1): no compiler here")
    release.set()
    build.build_in_background().join(10)
    for _ in range(2):
        with pytest.raises(build.KernelBuildError, match="no compiler here"):
            build.build()
    assert len(calls) == 1


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
