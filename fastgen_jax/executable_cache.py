"""Compiled step programs kept on disk, so that a warm start neither traces nor lowers them.

JAX's persistent compilation cache (`runner.enable_compilation_cache`) skips XLA's compilation, but
only after the program has been traced and lowered to find its key: on a 2-core CPU that was 2.4-2.6 s
of a warm server start for SmolLM2's 8 step programs, against 0.5 s for loading them from the cache.
This cache is keyed before tracing, by everything the program is made from: the engine's description
(model and engine configs, dtypes, the arguments' shapes, dtypes and shardings, the plan's layout,
the devices' number and kinds, the resolved kernels: `runner.ModelRunner._description`), the
installation (the sources of this package and its kernels, JAX, jaxlib, flax, numpy, the backend,
the CPU's features) and what may change within a process, read at every key (JAX's settings,
`XLA_`/`JAX_` variables, the module constants of this package and its kernels). Its entries are
`jax.stages.Compiled` executables serialized by `jax.experimental.serialize_executable`, with their
argument and result trees, in `<compilation cache dir>/executables`; it is off when the compilation
cache is, in a multi-host group, and where `ENABLED` is false. An entry is not tied to the devices it
was compiled for: loaded for others of the same number and kinds (another replica's), it runs there,
each device in the place of the one at its position in the mesh (`load`), so replicas compile each
program once between them. The step programs it keeps are not in JAX's cache (see `compiled`). A
file that cannot be read is logged once and compiled again; a store that fails is logged once and
turns the cache off for the process. After a store, the least recently used entries beyond
`MAX_BYTES` are deleted. Like JAX's own cache, its files are trusted: they hold pickles.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import pathlib
import pickle
import platform
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache

import cpu_kernels

log = logging.getLogger(__name__)

_PACKAGES = ("fastgen_jax", "cpu_kernels", "pallas_kernels")
_SUFFIXES = (".py", ".cc", ".h")
_LIBRARIES = ("flax", "numpy", "ml_dtypes")  # beyond jax and jaxlib, what tracing goes through
_FORMAT = 2  # of the files this module writes
ENABLED = True  # the test suite turns it off in its own process (tests/conftest.py)
MAX_BYTES = 4 << 30  # entries kept, the most recently used first (SmolLM2's 8 programs: 2.5 MB)


def directory() -> pathlib.Path | None:
    """Where executables are kept: beside JAX's compilation cache, None when that is off."""
    cache = jax.config.jax_compilation_cache_dir
    if not (ENABLED and cache and jax.config.jax_enable_compilation_cache) or _broken:
        return None
    return pathlib.Path(cache) / "executables"


@functools.cache
def _installation() -> tuple:
    """What cannot change within a process: the sources, the libraries, the machine."""
    import importlib.metadata

    import jaxlib

    digest = hashlib.sha256()
    root = pathlib.Path(__file__).resolve().parent.parent
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*")):
            if path.suffix in _SUFFIXES and path.is_file():
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    backend = jax.devices()[0].client
    libraries = []
    for name in _LIBRARIES:
        try:
            libraries.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            libraries.append((name, None))
    return (
        _FORMAT,
        digest.hexdigest(),
        jax.__version__,
        jaxlib.__version__,
        libraries,
        backend.platform,
        backend.platform_version,
        sys.version,
        platform.machine(),
        platform.processor(),
        cpu_kernels.build.cpu_features(),
    )


def _settings() -> tuple:
    """What may change within a process, read at every key: JAX's settings (the thread's own
    included, e.g. `jax.default_matmul_precision`), the environment's XLA/JAX variables, and the
    module-level constants of this package and its kernels (benchmarks set e.g.
    `attention.F32_KERNEL_ROWS` or `cpu_kernels.matmul.STREAM_ROWS` to compare programs)."""
    settings = sorted((k, repr(v)) for k, v in jax.config.values.items() if "cache" not in k)
    named = ("XLA_", "JAX_", "FASTGEN_KERNEL_MARCH")
    flags = sorted((k, v) for k, v in os.environ.items() if k.startswith(named))
    constants = []
    for module_name, module in sorted(sys.modules.items()):
        if module is None or module_name.split(".")[0] not in _PACKAGES:
            continue
        for name, value in sorted(vars(module).items()):
            if name.isupper() and isinstance(value, int | float | str | bool | tuple):
                constants.append((module_name, name, repr(value)))
    return settings, flags, constants


def name_for(describe: Callable[[], Any]) -> str | None:
    """The entry's name for the program `describe()` names (see `key`); None, and `describe` not
    called, when this cache is off."""
    return key(describe()) if directory() is not None else None


def key(description: Any) -> str:
    """The entry's name: `description` (a value whose repr names the program exactly) and the
    environment, hashed."""
    digest = hashlib.sha256(repr((_installation(), _settings())).encode())
    digest.update(repr(description).encode())
    return digest.hexdigest()


_warned: set[str] = set()
_broken = False  # a store failed: this process compiles as if there were no cache


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
    returns them) serializes and loads again without complaint, then fails when run (jaxlib 0.10:
    "Function wrapped_slice not found"), so only a fresh compilation may be stored. One compilation
    at a time does so (the bypass is process-wide), and if JAX's cache answered anyway (another
    thread's compilation in between) nothing is stored."""
    if name is None:
        return lower().compile()
    executable = load(name, in_tree, devices)
    if executable is not None:
        return executable
    with _bypass_lock:
        hits = _jax_cache_hits[0]
        with _without_persistent_cache():
            executable = lower().compile()
        if _jax_cache_hits[0] == hits:
            save(name, executable, devices)
    return executable


_bypass_lock = threading.Lock()
_jax_cache_hits = [0]  # JAX's persistent cache hits in this process (a listener counts them)


def _count_jax_cache_hits(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _jax_cache_hits[0] += 1


jax.monitoring.register_event_listener(_count_jax_cache_hits)


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
    """The executable stored under `name`, loaded onto `devices` (a mesh's devices in its order); None
    if there is none (or it cannot be read, or its argument tree is not `in_tree`). An entry compiled
    for other devices of the same number and kinds runs on these: each takes the place of the one at
    its position (`_onto`)."""
    where = directory()
    path = where / f"{name}.bin" if where else None
    if path is None or not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            payload, stored_in, out_tree, compiled_for = pickle.load(f)
        if stored_in != in_tree:
            return None
        executable = _onto(payload, stored_in, out_tree, compiled_for, devices)
    except Exception as error:  # noqa: BLE001 - any failure here only means compiling
        _warn_once("cannot load an executable", f" ({path}; later ones are not logged)", error)
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # used now: the last to be evicted
    return executable


def _onto(payload, in_tree, out_tree, compiled_for: list[int], devices: list) -> Any:
    """`serialize_executable.deserialize_and_load` onto `devices`, where the entry was compiled for a
    mesh of the devices `compiled_for` (ids, in the mesh's order, which is XLA's device assignment:
    `save` keeps only such entries). For other devices, the executable is given the assignment of
    `devices` (XLA keeps the one it was compiled with unless given another: its arguments would then be
    refused as being on the wrong devices, and the process could crash), and the devices named in its
    argument and result shardings are mapped by position the same way. What loaded is checked to run
    on `devices` in that order before it is used."""
    client = devices[0].client
    ids = [d.id for d in devices]
    if ids == compiled_for:
        return serialize_executable.deserialize_and_load(
            payload, in_tree, out_tree, backend=client, execution_devices=devices
        )
    from jax._src import compiler  # the options JAX itself compiles with (and loads with, on GPU)

    instead = dict(zip(compiled_for, devices, strict=True))  # another count of devices: ValueError
    options = compiler.get_compile_options(
        num_replicas=1, num_partitions=len(ids), device_assignment=np.array([ids])
    )

    class Unpickler(serialize_executable._JaxPjrtUnpickler):
        def persistent_load(self, pid):
            if pid[0] == "exec":
                return client.deserialize_executable(pid[1], self.execution_devices, options)
            if pid[0] == "device":
                return instead[pid[1]]
            return super().persistent_load(pid)

    unloaded, args_info, no_kwargs = Unpickler(io.BytesIO(payload), client, devices).load()
    args = in_tree.unflatten(args_info)
    executable = jax.stages.Compiled(unloaded.load(), [], args, out_tree, no_kwargs=no_kwargs)
    placed = [[d.id for d in executable.runtime_executable().local_devices()]]
    for sharding in jax.tree.leaves(executable.input_shardings):  # the engine's are NamedShardings
        mesh = getattr(sharding, "mesh", None)
        placed.append([d.id for d in mesh.devices.flat] if mesh is not None else sorted(sharding.device_set))
    if any(p != ids for p in placed):
        raise ValueError(f"loaded onto devices {placed[0]}, its arguments onto {placed[1:]}, not {ids}")
    return executable


def save(name: str, compiled: Any, devices: list) -> None:
    """Stores `compiled`, compiled for the mesh of `devices`, under `name` (atomically: concurrent
    processes never read half a file)."""
    where = directory()
    if where is None:
        return
    written = None
    try:
        compiled_for = [d.id for d in devices]
        if [d.id for d in compiled.runtime_executable().local_devices()] != compiled_for:
            return  # XLA's assignment is not the mesh's order (never so for the engine's meshes)
        payload, in_tree, out_tree = serialize_executable.serialize(compiled)
        entry = (payload, in_tree, out_tree, compiled_for)
        data = pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL)
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=where, delete=False, suffix=".tmp") as f:
            written = f.name
            f.write(data)
        os.replace(written, where / f"{name}.bin")
        written = None
        _evict(where)
    except Exception as error:  # noqa: BLE001 - an executable we cannot keep is compiled next time
        global _broken
        _broken = True  # off for the rest of the process: compile with JAX's cache as before
        _warn_once("cannot store an executable", "; off for this process", error)
        if written is not None:
            with contextlib.suppress(OSError):
                os.unlink(written)


def _evict(where: pathlib.Path) -> None:
    """Deletes the least recently used entries beyond MAX_BYTES (each source change, for one, makes
    a new set)."""
    entries = []
    for path in where.glob("*.bin"):
        with contextlib.suppress(OSError):  # another process may have deleted it meanwhile
            stat = path.stat()
            entries.append((stat.st_mtime, stat.st_size, path))
    kept = 0
    for _, size, path in sorted(entries, key=lambda e: e[0], reverse=True):
        kept += size
        if kept > MAX_BYTES:
            with contextlib.suppress(OSError):
                path.unlink()
