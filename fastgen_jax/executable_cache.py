"""Compiled step programs kept on disk, so that a warm start neither traces nor lowers them.

JAX's persistent compilation cache (`runner.enable_compilation_cache`) skips XLA's compilation, but
only after the program has been traced and lowered to find its key: on a 2-core CPU that was 2.4-2.6 s
of a warm server start for SmolLM2's 8 step programs, against 0.5 s for loading them from the cache.
This cache is keyed before tracing, by everything the program is made from: the engine's description
(model and engine configs, dtypes, the arguments' shapes, dtypes and shardings, the plan's layout,
the devices) and the environment (the source of this package and its kernels, JAX and jaxlib, the
backend, the CPU's features, JAX's settings, `XLA_FLAGS`). Its entries are `jax.stages.Compiled`
executables serialized by `jax.experimental.serialize_executable`, with their argument and result
trees, in `<compilation cache dir>/executables`; it is off when the compilation cache is (and in a
multi-host group). The step programs it keeps are not in JAX's cache (see `compiled`). Anything that
fails here (an executable that cannot be serialized, a file that cannot be read) is logged once and
the caller compiles as before. Like JAX's own cache, its files are trusted: they hold pickles.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import pathlib
import pickle
import platform
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import jax
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache

import cpu_kernels

log = logging.getLogger(__name__)

_PACKAGES = ("fastgen_jax", "cpu_kernels", "pallas_kernels")
_SUFFIXES = (".py", ".cc", ".h")
_FORMAT = 1  # of the files this module writes


def directory() -> pathlib.Path | None:
    """Where executables are kept: beside JAX's compilation cache, None when that is off."""
    cache = jax.config.jax_compilation_cache_dir
    return pathlib.Path(cache) / "executables" if cache else None


@functools.cache
def _environment() -> bytes:
    """What the programs depend on beyond the engine's description, hashed once per process."""
    import jaxlib

    digest = hashlib.sha256()
    root = pathlib.Path(__file__).resolve().parent.parent
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*")):
            if path.suffix in _SUFFIXES and path.is_file():
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    backend = jax.devices()[0].client
    settings = sorted((k, repr(v)) for k, v in jax.config.values.items() if "cache" not in k)
    named = ("XLA_", "JAX_", "FASTGEN_KERNEL_MARCH")
    flags = sorted((k, v) for k, v in os.environ.items() if k.startswith(named))
    parts = (
        _FORMAT,
        digest.hexdigest(),
        jax.__version__,
        jaxlib.__version__,
        backend.platform,
        backend.platform_version,
        sys.version,
        platform.machine(),
        cpu_kernels.build.cpu_features(),
        settings,
        flags,
    )
    return repr(parts).encode()


def key(description: Any) -> str:
    """The entry's name: `description` (a value whose repr names the program exactly) and the
    environment, hashed."""
    digest = hashlib.sha256(_environment())
    digest.update(repr(description).encode())
    return digest.hexdigest()


_warned: set[str] = set()


def _warn_once(what: str, detail: str, error: BaseException) -> None:
    """One log line per process for each kind of failure (`what`), naming the first case."""
    if what not in _warned:
        _warned.add(what)
        log.warning(
            "executable cache: %s%s (%s: %s); compiling instead", what, detail, type(error).__name__, error
        )


def compiled(name: str | None, in_tree: Any, devices: list, lower: Callable[[], Any]) -> Any:
    """The executable stored under `name` if there is one, else `lower().compile()`, stored under
    `name`. `name` None: no cache, just the compilation. A program compiled for this cache bypasses
    JAX's persistent cache: an XLA:CPU executable loaded from its serialized form (as JAX's cache
    returns them) cannot be serialized again (jaxlib 0.10: its copy fails with "Function wrapped_slice
    not found"), so only a fresh compilation is stored."""
    if name is None:
        return lower().compile()
    executable = load(name, in_tree, devices)
    if executable is None:
        with _without_persistent_cache():
            executable = lower().compile()
        save(name, executable)
    return executable


@contextlib.contextmanager
def _without_persistent_cache():
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # it remembers whether it is used: ask again
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


def load(name: str, in_tree: Any, devices: list) -> Any | None:
    """The executable stored under `name`, loaded onto `devices`; None if there is none (or it cannot
    be read, or its argument tree is not `in_tree`)."""
    where = directory()
    path = where / f"{name}.bin" if where else None
    if path is None or not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            payload, stored_in, out_tree = pickle.load(f)
        if stored_in != in_tree:
            return None
        return serialize_executable.deserialize_and_load(
            payload, stored_in, out_tree, backend=devices[0].client, execution_devices=devices
        )
    except Exception as error:  # noqa: BLE001 - any failure here only means compiling
        _warn_once("cannot load an executable", f" ({path}; later ones are not logged)", error)
        return None


def save(name: str, compiled: Any) -> None:
    """Stores `compiled` under `name` (atomically: concurrent processes never read half a file)."""
    where = directory()
    if where is None:
        return
    try:
        payload, in_tree, out_tree = serialize_executable.serialize(compiled)
        data = pickle.dumps((payload, in_tree, out_tree), protocol=pickle.HIGHEST_PROTOCOL)
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=where, delete=False, suffix=".tmp") as f:
            f.write(data)
        os.replace(f.name, where / f"{name}.bin")
    except Exception as error:  # noqa: BLE001 - an executable we cannot keep is compiled next time
        _warn_once("cannot store an executable", "", error)
