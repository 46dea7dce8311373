"""Runs the process with glibc's malloc on transparent huge pages, so a step does not begin by
faulting in its temporaries 4 KiB at a time.

XLA:CPU allocates a step program's temporaries as one block per execution and frees it when the
step ends (SmolLM2's program: 42 MB at the 32-row bucket, 336 MB at the 256- and 512-row buckets,
mostly the sampler's [logit rows, vocabulary] arrays). glibc serves blocks that large by `mmap`
and unmaps them on `free`, so every step started on fresh pages and took a page fault for each
4 KiB it touched: about 3,000 in a 32-sequence decode step, 16,000 in a 512-token prompt step
(`resource.getrusage` around the step's executable). With the glibc tunable
`glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc asks for transparent huge pages on what it maps
(`madvise(MADV_HUGEPAGE)`, which glibc does only where the kernel's THP mode is `madvise`; under
`always` the kernel gives huge pages anyway), so a step faults
once per 2 MiB: 10-12 faults a step, and the weights XLA allocated sit on huge pages too (fewer
TLB misses where the kernels stride through them). Measured on the 2-core CPU, in turns: a
32-sequence decode step 66.1 / 67.4 -> 61.9 / 61.1 ms (medians of 15); the W0 workload
(`bench_offline.py --workload=w0`'s engine run, 74 steps) 14.91 / 14.23 -> 13.44 / 12.84 s.

glibc reads tunables once, at process start, so `restart_with_huge_pages()` re-executes the
process (same pid, interpreter, flags and arguments) with the tunable added to `GLIBC_TUNABLES`.
The command-line entry points call it first thing (`python -m fastgen_jax.serve`, `... generate`, the
benchmark scripts); a program that imports fastgen_jax as a library can export the variable
itself. It does nothing where it cannot help or was already done: not Linux, not glibc >= 2.35,
THP mode other than `madvise`, the tunable already set, a restart already made (a marker in the
environment: a secure-exec interpreter's glibc drops GLIBC_TUNABLES, which would otherwise restart
it forever), FASTGEN_HUGE_PAGES=0, or a process whose program is not the caller (`pdb -m ...`,
IPython's `%run`, a script read from stdin). Host-side: no jax import here.
"""

from __future__ import annotations

import logging
import os
import sys
import time

TUNABLE = "glibc.malloc.hugetlb=1"
RESTARTED_ENV = "FASTGEN_HUGE_PAGES_RESTARTED"  # set on the restart: never restart twice
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
    if RESTARTED_ENV in environ or "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return False
    version = _glibc_version()
    # glibc's madvise_thp acts only in the kernel's `madvise` mode
    return version is not None and version >= (2, 35) and _thp_mode() == "madvise"


def started() -> float:
    """time.monotonic() when this process was launched: its start time in /proc (which an
    `execve`, the restart, keeps), else now."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)"
        launched = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # starttime: clock ticks since boot
        return time.monotonic() - (time.clock_gettime(time.CLOCK_BOOTTIME) - launched)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.monotonic()


def _runs_as_program() -> bool:
    """Whether the interpreter was launched to run the caller (`python -m <this __main__>`, `python
    <this script>`, `python -c`), so re-executing its command line runs the caller again."""
    argv, i = sys.orig_argv, 1  # Python >= 3.10
    while i < len(argv):
        arg = argv[i]
        if arg == "-m":
            spec = getattr(sys.modules.get("__main__"), "__spec__", None)
            return i + 1 < len(argv) and spec is not None and argv[i + 1] == spec.name
        if arg in ("-c", "-") or not arg.startswith("-"):  # the program: code, stdin or a script
            return arg == "-c" or (arg != "-" and os.path.abspath(arg) == os.path.abspath(sys.argv[0]))
        i += 2 if arg in ("-X", "-W") else 1  # those two interpreter options take a separate value
    return False


def restart_with_huge_pages() -> None:
    """Re-executes this process with `TUNABLE` in GLIBC_TUNABLES when `wanted()` and the process
    runs the caller as its program; otherwise returns. Call it before anything is loaded that the
    restart would throw away (jax, a checkpoint)."""
    if not wanted() or not _runs_as_program():
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, (env.get("GLIBC_TUNABLES", ""), TUNABLE)))
    env[RESTARTED_ENV] = "1"
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as error:  # e.g. the interpreter is gone: carry on without huge pages
        logging.getLogger(__name__).warning(
            "could not restart with %s (%s); going on without it", TUNABLE, error
        )
