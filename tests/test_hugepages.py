"""`fastgen_jax.hugepages`: the entry points restart themselves once with glibc's malloc on
transparent huge pages, and then a jitted program's large buffers fault in per 2 MiB, not per 4 KiB
(XLA:CPU's step temporaries; see the module)."""

import os
import subprocess
import sys

import pytest

from fastgen_jax import hugepages

# Restarts (or not), then times five calls of a program with 64 MiB in and out: minor page faults
# per call (fresh 4 KiB pages: 16,384 per 64 MiB written).
PROGRAM = """
import os, resource, sys
print("pid", os.getpid(), flush=True)
from fastgen_jax import hugepages
hugepages.restart_with_huge_pages()
import jax, jax.numpy as jnp
x = jnp.ones((64 << 20) // 4, jnp.float32)
f = jax.jit(lambda x: jnp.cumsum(x) * 2.0)
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5
print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES", "-"), faults, sys.argv[1:], flush=True)
"""


def run(**env) -> list[str]:
    env = {"FASTGEN_HUGE_PAGES": None, hugepages.RESTARTED_ENV: None, **env}
    env = {k: v for k, v in {**os.environ, "JAX_PLATFORMS": "cpu", **env}.items() if v is not None}
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, "--an=argument"], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.split("\n")


@pytest.mark.skipif(
    not hugepages.wanted({}), reason="glibc < 2.35 or THP mode not madvise: no huge pages to ask for"
)
def test_the_restarted_process_keeps_its_pid_and_arguments_and_faults_per_huge_page():
    lines = run(GLIBC_TUNABLES=None)
    assert lines[0].startswith("pid ") and lines[1] == lines[0]  # the restart ran the program again
    after, pid, tunables, faults, argv = lines[2].split(" ", 4)
    assert (after, pid) == ("after", lines[0].split()[1])  # execve: the same process
    assert tunables == hugepages.TUNABLE and argv == "['--an=argument']"
    assert int(faults) < 4000, faults  # a quarter of 64 MiB in 4 KiB pages
    lines = run(GLIBC_TUNABLES=None, FASTGEN_HUGE_PAGES="0")  # asked not to: no restart
    assert lines[0].startswith("pid ") and lines[1].startswith("after ")
    _, _, tunables, faults, _ = lines[1].split(" ", 4)
    assert tunables == "-" and int(faults) > 8000, faults  # what huge pages remove


def test_no_restart_where_it_cannot_help(monkeypatch):
    monkeypatch.setattr(hugepages, "_glibc_version", lambda: (2, 36))
    monkeypatch.setattr(hugepages, "_thp_mode", lambda: "madvise")
    assert hugepages.wanted({})
    assert not hugepages.wanted({"FASTGEN_HUGE_PAGES": "0"})
    assert not hugepages.wanted({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"})
    monkeypatch.setattr(hugepages, "_thp_mode", lambda: "never")
    assert not hugepages.wanted({})
    monkeypatch.setattr(hugepages, "_thp_mode", lambda: "always")  # glibc's madvise does nothing there
    assert not hugepages.wanted({})
    monkeypatch.setattr(hugepages, "_thp_mode", lambda: "madvise")
    monkeypatch.setattr(hugepages, "_glibc_version", lambda: (2, 31))  # no hugetlb tunable yet
    assert not hugepages.wanted({})
    monkeypatch.setattr(hugepages, "_glibc_version", lambda: None)  # musl, or not Linux's libc
    assert not hugepages.wanted({})


def test_a_restart_keeps_other_tunables_and_happens_once(monkeypatch):
    calls = []
    monkeypatch.setattr(hugepages, "wanted", lambda: True)
    monkeypatch.setattr(hugepages, "_runs_as_program", lambda: True)
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    hugepages.restart_with_huge_pages()
    ((path, argv, env),) = calls
    assert path == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + hugepages.TUNABLE
    # a secure-exec interpreter's glibc drops GLIBC_TUNABLES: the marker still stops a second restart
    monkeypatch.undo()
    monkeypatch.setattr(hugepages, "_glibc_version", lambda: (2, 36))
    monkeypatch.setattr(hugepages, "_thp_mode", lambda: "madvise")
    assert not hugepages.wanted({hugepages.RESTARTED_ENV: env[hugepages.RESTARTED_ENV]})


def test_only_the_program_itself_restarts(monkeypatch):
    """Re-executing the command line must run the caller again: not pdb, IPython or stdin's script."""
    main = sys.modules["__main__"]
    monkeypatch.setattr(main, "__spec__", type("Spec", (), {"name": "fastgen_jax.serve"})(), raising=False)
    monkeypatch.setattr(sys, "argv", ["/x/fastgen_jax/serve.py", "--port=1"])
    for orig, runs in (
        (["python", "-m", "fastgen_jax.serve", "--port=1"], True),
        (["python", "-X", "dev", "-m", "fastgen_jax.serve"], True),
        (["python", "-m", "pdb", "-m", "fastgen_jax.serve"], False),
        (["python", "-c", "..."], True),
        (["python", "-"], False),
        (["/usr/bin/ipython", "--", "x.py"], False),
    ):
        monkeypatch.setattr(sys, "orig_argv", orig)
        assert hugepages._runs_as_program() is runs, orig
    monkeypatch.setattr(sys, "orig_argv", ["python", "scripts/bench.py"])
    monkeypatch.setattr(sys, "argv", ["scripts/bench.py"])
    assert hugepages._runs_as_program()


def test_started_is_the_launch_of_this_process():
    import time

    assert 0 <= time.monotonic() - hugepages.started() < 3600  # this test process began before now
