"""Builds and registers the C++ kernels: compiled on first use, not at install time.

Why at first use: the FFI headers must be those of the JAX that runs the kernel (`jax.ffi.include_dir()`),
and that JAX is only known for sure at run time (pip's build isolation would compile against whatever
JAX it installs into a throw-away build environment, and a later `pip install -U jax` would leave a
stale binary). So the first process that needs a kernel compiles it with the system C++ compiler
(`$CXX`, default `g++`; C++17) into `$FASTGEN_KERNEL_CACHE` (default `~/.cache/fastgen_jax/kernels`),
named by a hash of the source, the compiler flags, the JAX version and this CPU's features, and every
later process loads that file (the sources compile in parallel, one per core: about 8 s on 2 cores,
once). The build writes to a temporary name and renames it, so concurrent processes (test workers,
replicas) never load a half-written library. `python -m fastgen_jax.checkpoints fetch` builds it as
part of the README's set-up (`build`), so that a first server start does not. (Building it on a
thread while a server loads its checkpoint was tried: on 2 cores no faster, 29.1 / 54.9 s to ready
against 27.8 / 29.7 s.)
`-march=native` is safe because the hash includes the CPU.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import subprocess
import tempfile
import threading

import jax

SOURCES = tuple(
    pathlib.Path(__file__).with_name(name)
    for name in ("ragged_paged_attention.cc", "matmul.cc", "write_kv.cc")
)
HEADERS = tuple(pathlib.Path(__file__).with_name(h) for h in ("wait.h", "simd.h"))  # part of the hash
# -ffast-math lets sums vectorise and exp/tanh run through glibc's vector math (libmvec); the kernel
# keeps every value finite (its "no key yet" score is -1e30, not -inf). It is given when compiling
# only: linking with it would add crtfastmath.o, which flushes denormals for the whole process.
# $FASTGEN_KERNEL_MARCH overrides -march=native (e.g. x86-64-v3 to count instructions under valgrind,
# which has no AVX-512).
COMPILE_FLAGS = (
    "-O3",
    f"-march={os.environ.get('FASTGEN_KERNEL_MARCH', 'native')}",
    "-std=c++17",
    "-fPIC",
    "-ffast-math",
    "-fopenmp-simd",
)
LINK_FLAGS = ("-shared", "-lmvec", "-lm")
TARGETS = {
    "fastgen_ragged_paged_attention": "FastgenRaggedPagedAttention",
    "fastgen_int8_matmul": "FastgenInt8Matmul",
    "fastgen_f32_matmul": "FastgenF32Matmul",
    "fastgen_f32_packed_matmul": "FastgenF32PackedMatmul",
    "fastgen_write_kv": "FastgenWriteKv",
}


class KernelBuildError(RuntimeError):
    """The kernel library could not be compiled or loaded here."""


def cpu_features() -> str:
    """This CPU's feature flags (/proc/cpuinfo): part of the key of anything built or compiled for it."""
    try:
        with open("/proc/cpuinfo") as f:  # x86: "flags", aarch64: "Features"
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


@functools.cache
def vector_lanes() -> int:
    """float32 lanes of the vectors the library's matmul tiles are built for here: 16 (AVX-512), 8
    (AVX2 with FMA), or 0 (neither: those tiles have no registers sized for the target, and
    `fastgen_jax.attention` keeps XLA's dot). Read from the compiler's predefined macros for the
    library's -march, so `$FASTGEN_KERNEL_MARCH` (e.g. x86-64-v3) answers as it builds."""
    march = os.environ.get("FASTGEN_KERNEL_MARCH", "native")
    try:
        done = subprocess.run(
            [os.environ.get("CXX", "g++"), f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        done = None
    if done is None or done.returncode:  # no compiler here (a library built elsewhere): the CPU's flags
        if march != "native":
            return 0
        flags = set(cpu_features().split())
        return 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 0
    macros = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("#define ")}
    if "__AVX512F__" in macros:
        return 16
    return 8 if {"__AVX2__", "__FMA__"} <= macros else 0


def library_path() -> pathlib.Path:
    """Where the library for this source, JAX and CPU lives (it may not be built yet)."""
    compiler = os.environ.get("CXX", "g++")
    key = hashlib.sha256()
    flags = " ".join((compiler, *COMPILE_FLAGS, *LINK_FLAGS))
    for part in (flags, jax.__version__, platform.machine(), cpu_features()):
        key.update(part.encode())
    for source in (*SOURCES, *HEADERS):
        key.update(source.read_bytes())
    default = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "fastgen_jax"
    cache = pathlib.Path(os.environ.get("FASTGEN_KERNEL_CACHE", default / "kernels"))
    return cache / f"fastgen_kernels-{key.hexdigest()[:16]}.so"


def compile_library(path: pathlib.Path) -> None:
    """Compiles the source into `path` (atomically); raises KernelBuildError with the compiler's words
    (or the file system's: an unwritable cache directory)."""
    try:
        _compile_library(path)
    except OSError as error:
        raise KernelBuildError(f"cannot write the kernel library to {path.parent}: {error}") from error


def _compile_library(path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CXX", "g++")
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        objects = [os.path.join(scratch, f"{source.stem}.o") for source in SOURCES]
        # one compiler per core at once: the sources take 2.5-5.5 s each, a cold start waits for all
        commands = [
            [compiler, *COMPILE_FLAGS, "-I", jax.ffi.include_dir(), "-c", str(source), "-o", obj]
            for source, obj in zip(SOURCES, objects, strict=True)
        ]
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            list(pool.map(_run, commands))  # the first failure is raised
        lib = os.path.join(scratch, "kernels.so")
        _run([compiler, *objects, *LINK_FLAGS, "-o", lib])
        os.replace(lib, path)


def _run(command: list[str]) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise KernelBuildError(f"cannot run {command[0]!r}: {error}") from error
    if done.returncode:
        raise KernelBuildError(f"{command[0]} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")


_build_lock = threading.Lock()  # one build at a time in a process
_build_errors: dict[pathlib.Path, KernelBuildError] = {}  # a failed build is not tried twice


def build() -> pathlib.Path:
    """Compiles the library unless it is built already; returns its path. Raises KernelBuildError."""
    path = library_path()
    with _build_lock:
        if path in _build_errors:
            raise _build_errors[path]
        if not path.exists():
            try:
                compile_library(path)
            except KernelBuildError as error:
                _build_errors[path] = error
                raise
    return path


@functools.cache
def packed_strip() -> int:
    """The float32 columns of one strip of the packed weight layout this library reads
    (`cpu_kernels.matmul.f32_packed_matmul`): its [K, N] tiles' width, 16 with AVX2, 64 with AVX-512.
    Builds and loads the library if needed (KernelBuildError if it cannot)."""
    library = ctypes.cdll.LoadLibrary(str(load()))
    library.fastgen_packed_strip.restype = ctypes.c_int64
    return int(library.fastgen_packed_strip())


@functools.cache
def load() -> pathlib.Path:
    """Builds the library if needed, loads it and registers its FFI targets with XLA (once per process).
    Returns the library's path; raises KernelBuildError if it cannot."""
    path = build()
    try:
        library = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in TARGETS.items():
            capsule = jax.ffi.pycapsule(getattr(library, symbol))
            jax.ffi.register_ffi_target(target, capsule, platform="cpu")
    except (OSError, AttributeError) as error:
        raise KernelBuildError(f"cannot load {path}: {error}") from error
    return path
