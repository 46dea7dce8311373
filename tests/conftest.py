"""Shared pytest set-up: 4 host devices for the tensor-parallel tests; tests marked `gpu` are skipped
when JAX sees no GPU; `--overlap=off` runs every engine one step at a time (tests marked `overlap`,
whose subject is overlap itself, are left out then)."""

import os
import shutil
import tempfile

import pytest

# Each test process (an xdist worker, and the servers it starts) compiles into a fresh persistent
# compilation cache of its own: never into another worker's or another run's cache (a write into a
# cache shared by both workers and earlier runs crashed a worker once).
# (Set in every process that imports this file: xdist workers inherit the controller's environment.)
os.environ["FASTGEN_JAX_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="fastgen-xla-")


def _add_xla_flags(flags: str) -> None:
    """Appends `flags` to XLA_FLAGS unless their first flag's name is already there (the user's
    value wins)."""
    current = os.environ.get("XLA_FLAGS", "")
    if flags.split("=")[0] not in current:
        os.environ["XLA_FLAGS"] = f"{current} {flags}".strip()


# Before anything imports jax: the CPU backend then offers 4 devices (the default device stays the
# first, so single-device tests are unaffected). A GPU machine's devices are not changed by it.
_add_xla_flags("--xla_force_host_platform_device_count=4")


def _jaxlib_before(major: int, minor: int) -> bool:
    """Whether the installed jaxlib is older than major.minor (read without importing JAX)."""
    from importlib.metadata import version

    return tuple(int(part) for part in version("jaxlib").split(".")[:2]) < (major, minor)


# The suite's CPU programs compile cheaply: LLVM without its optimisation passes and XLA:CPU's older
# fusion emitter. Most of the suite's time is XLA compiling small programs that it then runs a few
# times (`pytest tests/test_llm_engine.py` on 2 cores: 150 s with XLA's defaults, 100 s with these).
# The C++ kernels are built apart, with their own flags. The servers and CLIs the tests start inherit
# these flags; outside the suite they keep XLA's defaults. FASTGEN_TEST_XLA=default runs the suite
# with XLA's defaults, and a GPU machine keeps them (they would slow its kernels' code generation).
# jaxlib 0.11 has no such emitter choice and stops the process at an XLA flag it does not know.
if os.environ.get("FASTGEN_TEST_XLA", "fast") == "fast" and not os.path.exists("/dev/nvidiactl"):
    emitters = " --xla_cpu_use_fusion_emitters=false" if _jaxlib_before(0, 11) else ""
    _add_xla_flags("--xla_backend_optimization_level=0" + emitters)


def _has_gpu() -> bool:
    try:
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_addoption(parser):
    parser.addoption(
        "--overlap",
        choices=("on", "off"),
        default="on",
        help="off: every engine built in the test process runs one step at a time "
        "(async_scheduling=False), so the engine, server and parity tests check that mode too "
        "(servers the tests start as subprocesses keep the default)",
    )


def pytest_configure(config):
    # The step programs' executable cache (`fastgen_jax.executable_cache`) stays off in the test
    # processes themselves: tests replace functions that tracing calls, and a program stored by an
    # earlier test would hide the replacement. The servers and CLIs they start use it;
    # tests/test_executable_cache.py turns it on for its own engines.
    from fastgen_jax import executable_cache

    executable_cache.ENABLED = False
    if config.getoption("--overlap") == "off":
        _turn_overlap_off()


def _turn_overlap_off():
    """Every `LLMEngine` built from here on (fixtures included) gets async_scheduling=False."""
    import dataclasses

    from fastgen_jax.config import EngineConfig
    from fastgen_jax.llm_engine import LLMEngine

    build = LLMEngine.__init__

    def one_step_at_a_time(self, checkpoint, engine_config=None, *args, **kwargs):
        engine_config = dataclasses.replace(engine_config or EngineConfig(), async_scheduling=False)
        build(self, checkpoint, engine_config, *args, **kwargs)

    LLMEngine.__init__ = one_step_at_a_time


def pytest_collection_modifyitems(config, items):
    if config.getoption("--overlap") == "off":  # their subject is overlap itself
        deselected = [item for item in items if item.get_closest_marker("overlap")]
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("overlap")]
    if any(item.get_closest_marker("gpu") for item in items) and not _has_gpu():
        skip = pytest.mark.skip(reason="needs a GPU")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_gguf():
    from tests.gguf_model import smollm2_gguf_path

    return smollm2_gguf_path()


def _once_per_run(tmp_path_factory, name: str, build):
    """`build(folder)` (it fills the empty `folder`) run once for the whole test run and shared by the
    xdist workers: the first worker to ask builds it under a file lock in the run's shared temporary
    root, the others wait for it and reuse it (SmolLM2's conversions cost 15-30 s each, once per worker
    before). Without xdist, a folder of this session's own. Returns the folder."""
    import filelock

    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent  # the run's root, above every worker's own
    folder, done = root / name, root / f"{name}.done"
    with filelock.FileLock(str(root / f"{name}.lock")):
        if done.exists():
            return folder
        shutil.rmtree(folder, ignore_errors=True)  # what a failed earlier attempt left
        folder.mkdir()
        build(folder)
        done.touch()
        return folder


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory):
    """SmolLM2-135M-Instruct converted by `fetch` into a temporary checkpoints folder (once per run;
    tests read it and never write into it)."""
    from fastgen_jax.checkpoints import fetch

    def convert(folder):
        fetch("smollm2-135m-instruct", folder, download_dir=smollm2_gguf.parent)

    return _once_per_run(tmp_path_factory, "smollm2-checkpoints", convert) / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf, tmp_path_factory):
    """Hugging Face transformers' own loading of the same GGUF file (float32): the reference. The
    first xdist worker loads the GGUF and keeps its config and float32 weights for the others, which
    load those (the same tensors) instead of converting the GGUF again."""
    import torch
    import transformers

    loaded = {}

    def load_gguf(folder):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
        ).eval()
        model.config.to_json_file(folder / "config.json")
        torch.save(model.state_dict(), folder / "weights.pt")
        loaded["model"] = model

    folder = _once_per_run(tmp_path_factory, "hf-smollm2", load_gguf)
    model = loaded.get("model")
    if model is None:
        config = transformers.AutoConfig.from_pretrained(folder)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))
        model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return model, tokenizer
