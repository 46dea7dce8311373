"""Runs the process with glibc's malloc on transparent huge pages, so a step does not begin by
faulting in its temporaries 4 KiB at a time.

XLA:CPU allocates a step program's temporaries as one block per execution and frees it when the
step ends (SmolLM2's program: 42 MB at the 32-row bucket, 336 MB at the 256- and 512-row buckets,
mostly the sampler's [logit rows, vocabulary] arrays). glibc serves blocks that large by `mmap`
and unmaps them on `free`, so every step started on fresh pages and took a page fault for each
4 KiB it touched: about 3,000 in a 32-sequence decode step, 16,000 in a 512-token prompt step
(`resource.getrusage` around the step's executable). With the glibc tunable
`glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc asks for transparent huge pages on what it maps
(`madvise(MADV_HUGEPAGE)`; the kernel's THP mode must be `madvise` or `always`), so a step faults
once per 2 MiB: 10-12 faults a step, and the weights XLA allocated sit on huge pages too (fewer
TLB misses where the kernels stride through them). Measured on the 2-core CPU, in turns: a
32-sequence decode step 66.1 / 67.4 -> 61.9 / 61.1 ms (medians of 15); the W0 workload
(`bench_offline.py --workload=w0`'s engine run, 74 steps) 14.91 / 14.23 -> 13.44 / 12.84 s.

glibc reads tunables once, at process start, so `restart_with_huge_pages()` re-executes the
process (same interpreter, same arguments) with the tunable added to `GLIBC_TUNABLES`. The
command-line entry points call it first thing (`python -m fastgen_jax.serve`, `... generate`, the
benchmark scripts); a program that imports fastgen_jax as a library can export the variable
itself. It does nothing where it cannot help or was already done: not Linux, not glibc >= 2.35,
THP `never`, the tunable already set, or FASTGEN_HUGE_PAGES=0. Host-side: no jax import here.
"""

from __future__ import annotations

import os
import sys
import time

TUNABLE = "glibc.malloc.hugetlb=1"
# The first process's time.monotonic() (system-wide on Linux), so a restarted server still reports
# its start-up from the original launch.
STARTED_ENV = "FASTGEN_STARTED_MONOTONIC"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. "glibc 2.36"
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, OSError, ValueError):  # not glibc, or no confstr
        return None


def _thp_mode() -> str | None:
    """The kernel's THP mode (the bracketed word of THP_ENABLED), or None if it cannot be read."""
    try:
        with open(THP_ENABLED) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def wanted(environ: os._Environ | dict = os.environ) -> bool:
    """Whether restarting would change anything here (see the module docstring)."""
    if environ.get("FASTGEN_HUGE_PAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return False
    version = _glibc_version()
    return version is not None and version >= (2, 35) and _thp_mode() in ("madvise", "always")


def started() -> float:
    """time.monotonic() at the launch of this program, before any restart."""
    try:
        return float(os.environ[STARTED_ENV])
    except (KeyError, ValueError):
        return time.monotonic()


def restart_with_huge_pages() -> None:
    """Re-executes this process with `TUNABLE` in GLIBC_TUNABLES when `wanted()`; otherwise returns.
    Call it before anything is loaded that the restart would throw away (jax, a checkpoint)."""
    if not wanted():
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, (env.get("GLIBC_TUNABLES", ""), TUNABLE)))
    env.setdefault(STARTED_ENV, repr(time.monotonic()))
    argv = list(getattr(sys, "orig_argv", [])) or [sys.executable, *sys.argv]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError as error:  # e.g. the interpreter is gone: carry on without huge pages
        print(
            f"fastgen-jax: could not restart with {TUNABLE} ({error}); going on without it", file=sys.stderr
        )
