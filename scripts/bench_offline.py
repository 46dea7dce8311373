"""Offline throughput: our engine against transformers' continuous batching and, opt-in, llama.cpp's
server, on the same weights.

One fixed workload runs through every engine in one process:

- `--num_requests` requests, all queued at once (offline, no arrival process);
- prompt and generation lengths drawn from Normal(mean, 0.3 x mean), as in the FastGen benchmarks,
  rounded and clipped to [1, 2 x mean], with a fixed `--seed`; or, with `--workload=w0` (the W0 of
  issue 19), prompt lengths uniform in [64, 256] and exactly 64 generated tokens each
  (`--prompt_len`/`--gen_len` are then unused);
- prompts are random token ids from the vocabulary, so both engines get the very same ids with no
  tokenizer in between;
- greedy decoding with end-of-sequence disabled (`ignore_eos=True` for us, `eos_token_id=-1` for
  transformers), so every request generates exactly its drawn length in both engines.

Ours is `LLMEngine` (Dynamic SplitFuse over a paged KV cache); its warm-up compiles every step
program before the clock starts. Transformers runs `ContinuousBatchingManager`, the machinery behind
`model.generate_batch`, through `continuous_batching_context_manager` + `add_request`, because
`generate_batch` takes one `max_new_tokens` for all requests and we need one per request. It gets
the same limits as ours: `max_batch_tokens` = our token budget, `max_requests_per_batch` = our
`max_num_seqs`, the same KV page size and page count. It runs eagerly (no torch.compile, the CPU
default) and gets a small warm-up run first. No engine's time includes loading weights.

llama.cpp (`--llama_cpp=PATH` of a `llama-server` built by `scripts/build_llama_cpp.sh`): the
`--hf_model` GGUF rewritten with every tensor dequantized to float32 (the weights our checkpoint was
converted from, dequantized the same way; cached in `--llama_cpp_gguf`; with `--quantize=int8`, the
same weights quantized to llama.cpp's Q8_0 instead, the peer of our int8), served by `llama-server`
with one slot per request (`-np`), a context of that many slots x the longest request rounded up to
256, `--llama_cpp_threads` threads, `-b`/`-ub` = our token budget and its default f16 KV cache
(`--llama_cpp_cache_type`). Each request goes to `/completion` as its token ids, greedy (`top_k` 1,
temperature 0), `ignore_eos`, `n_predict` = its drawn length, all at once from one client thread
each, after a small warm-up; the clock runs from the first send to the last reply.

The machine floor. Two rates are measured on this machine with JAX: a large float32 matmul (GFLOP/s)
and a large array sum and add (GB/s, the faster of the two). The workload needs at least

    FLOPs = 2 x non-embedding params x tokens processed      (every matmul of every layer)
          + 2 x hidden x vocab x sampled rows                (the vocabulary projection)
          + 4 x layers x heads x head_dim x sum of context   (q.k and p.v over each token's context)

where tokens processed counts each prompt token once and each generated token but the last once
(no recomputation), and a token's context is its position + 1. Each engine step also has to read
every weight at least once, so the weight traffic is params bytes x our engine's step count. The
floor is

    floor time = max(FLOPs / matmul rate, weight bytes / bandwidth),

the time a perfect engine would need on this CPU if it reached the peak matmul rate on every FLOP or
streamed the weights at full bandwidth, whichever bounds it. It ignores KV-cache reads, activations,
norms and sampling, so it is optimistic: "fraction of floor" (floor time / our time) is at most 1
and says how much of the machine we leave unused.

Timings on a shared CPU are noisy; the JSON records the load average before and after. A slow
spell of a minute or two moves one engine's figure and so the ratios, since the engines run one after
another. `--rounds=N` runs the workload N times, each engine once per round in turn (round r's
prompts drawn with seed `--seed` + r, so no engine's cache has seen them), keeps every engine loaded
between rounds, and reports the medians: each engine's throughput, each ratio as the median of the
rounds' own ratios (an engine against the one run just before or after it), and the floor fraction;
each round's figures are printed and kept under "rounds" in the JSON.

    python scripts/bench_offline.py                  # the default workload, both engines
    python scripts/bench_offline.py --quick          # a tiny smoke test
    python scripts/bench_offline.py --engine_only    # ours only
    python scripts/bench_offline.py --workload=w0    # W0: 32 requests, prompts U[64, 256], 64 new
    scripts/build_llama_cpp.sh                       # prints the path of llama-server
    python scripts/bench_offline.py --workload=w0 --llama_cpp=PATH   # all three engines
    python scripts/bench_offline.py --workload=w0 --llama_cpp=PATH --rounds=3   # in turns, medians
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any

import numpy as np
from absl import app, flags, logging

_FETCH_HINT = "python -m fastgen_jax.checkpoints fetch smollm2-135m-instruct"

_MODEL = flags.DEFINE_string(
    "model", "checkpoints/smollm2-135m-instruct", "Our checkpoint (converted dir, HF dir or .gguf)."
)
_HF_MODEL = flags.DEFINE_string(
    "hf_model",
    "checkpoints/.cache/SmolLM2-135M-Instruct.Q4_1.gguf",
    "The same weights for transformers: a .gguf file or a Hugging Face model directory.",
)
_NUM_REQUESTS = flags.DEFINE_integer("num_requests", 32, "Requests in the workload.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 256, "Mean prompt length in tokens.")
_GEN_LEN = flags.DEFINE_integer("gen_len", 64, "Mean generation length in tokens.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for lengths and prompt token ids.")
_TOKEN_BUDGET = flags.DEFINE_integer("token_budget", 512, "Tokens per forward pass (both engines).")
_MAX_NUM_SEQS = flags.DEFINE_integer("max_num_seqs", 256, "Sequences per forward pass (both).")
_MAX_MODEL_LEN = flags.DEFINE_integer("max_model_len", 1024, "Longest sequence for our engine.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per KV page (both engines).")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmul for GFLOP/s.")
_WORKLOAD = flags.DEFINE_enum(
    "workload", "normal", ["normal", "w0"], "Length distribution: normal (FastGen's) or w0 (see above)."
)
_ENGINE_ONLY = flags.DEFINE_bool("engine_only", False, "Skip transformers; run our engine only.")
_LLAMA_CPP = flags.DEFINE_string(
    "llama_cpp", "", "Path of a llama-server binary (scripts/build_llama_cpp.sh): run llama.cpp too."
)
_LLAMA_CPP_GGUF = flags.DEFINE_string(
    "llama_cpp_gguf",
    "~/.cache/fastgen_jax/llama_cpp/{stem}.{type}.gguf",
    "Where the GGUF for llama.cpp is written (once; reused when present). {stem}: --hf_model's; "
    "{type}: F32, or Q8_0 with --quantize=int8.",
)
_LLAMA_CPP_THREADS = flags.DEFINE_integer("llama_cpp_threads", 2, "llama-server's -t and -tb.")
_LLAMA_CPP_CACHE_TYPE = flags.DEFINE_enum(
    "llama_cpp_cache_type", "f16", ["f16", "f32", "bf16", "q8_0"], "llama-server's KV cache type (-ctk/-ctv)."
)
_LLAMA_CPP_ARGS = flags.DEFINE_string(
    "llama_cpp_args", "", "Extra llama-server arguments, space-separated (e.g. '--poll 0')."
)
_DTYPE = flags.DEFINE_enum(
    "dtype",
    "float32",
    ["float32", "bfloat16"],
    "Our engine's weights, activations and KV cache (transformers stays float32: its agreement then "
    "says what bfloat16 costs in accuracy).",
)
_QUANTIZE = flags.DEFINE_enum(
    "quantize",
    "none",
    ["none", "int8"],
    "Our engine's weight-only quantization (EngineConfig.quantize). With int8, llama.cpp (if run) gets "
    "a Q8_0 GGUF of the same weights instead of F32, and transformers stays float32.",
)
_KV_CACHE_DTYPE = flags.DEFINE_enum(
    "kv_cache_dtype",
    "auto",
    ["auto", "float32", "bfloat16"],
    "Our engine's KV pages (EngineConfig.kv_cache_dtype; auto: --dtype). llama.cpp's KV is "
    "--llama_cpp_cache_type (f16 by default).",
)
_ROUNDS = flags.DEFINE_integer(
    "rounds",
    1,
    "Rounds of the workload, each engine once per round in turn (ours, transformers, llama.cpp), round "
    "r's prompts drawn with seed --seed + r. With more than one, the report's figures are medians over "
    "the rounds, and each ratio the median of the rounds' own ratios (see above).",
)
_QUICK = flags.DEFINE_bool("quick", False, "Tiny workload and engine limits: a smoke test.")
_OUTPUT_JSON = flags.DEFINE_string(
    "output_json",
    "docs/benchmarks/offline_cpu.json",
    "Where to write results; a markdown table goes next to it (.md). Empty: write nothing.",
)

W0_PROMPT_LENS = (64, 256)  # --workload=w0: uniform prompt lengths, inclusive
W0_GEN_LEN = 64  # --workload=w0: generated tokens per request
FIRST_TOKENS_SHOWN = 12  # greedy tokens of request 0 printed per engine when llama.cpp runs

# --quick overrides these flags: 8 short requests, small limits so warm-up compiles few programs.
_QUICK_SETTINGS = {
    "num_requests": 8,
    "prompt_len": 32,
    "gen_len": 8,
    "token_budget": 64,
    "max_num_seqs": 16,
    "max_model_len": 128,
    "matmul_size": 512,
}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    model: str
    hf_model: str
    num_requests: int
    prompt_len: int
    gen_len: int
    seed: int
    token_budget: int
    max_num_seqs: int
    max_model_len: int
    page_size: int
    matmul_size: int
    engine_only: bool
    quick: bool
    workload: str = "normal"
    llama_cpp: str = ""
    llama_cpp_gguf: str = ""
    llama_cpp_threads: int = 2
    llama_cpp_cache_type: str = "f16"
    llama_cpp_args: str = ""
    dtype: str = "float32"
    quantize: str = "none"
    kv_cache_dtype: str = "auto"
    rounds: int = 1

    def __post_init__(self):
        for name in (
            "rounds",
            "num_requests",
            "prompt_len",
            "gen_len",
            "token_budget",
            "max_num_seqs",
            "max_model_len",
            "page_size",
            "matmul_size",
        ):
            if getattr(self, name) <= 0:
                raise app.UsageError(f"--{name} must be positive, got {getattr(self, name)}")
        longest = (
            W0_PROMPT_LENS[1] + W0_GEN_LEN
            if self.workload == "w0"
            else 2 * self.prompt_len + 2 * self.gen_len
        )
        if longest > self.max_model_len:
            raise app.UsageError(
                f"the longest request ({longest} tokens: 2 x prompt_len + 2 x gen_len, or W0's) exceeds "
                f"--max_model_len={self.max_model_len}"
            )
        if self.llama_cpp and not self.hf_model.endswith(".gguf"):
            raise app.UsageError(f"--llama_cpp needs --hf_model to be a .gguf file, got {self.hf_model}")
        if self.llama_cpp and not os.access(self.llama_cpp, os.X_OK):
            raise app.UsageError(
                f"--llama_cpp={self.llama_cpp} is not an executable; build it with scripts/build_llama_cpp.sh"
            )


@dataclasses.dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    gen_lens: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def generated_tokens(self) -> int:
        return sum(self.gen_lens)


def config_from_flags() -> BenchConfig:
    values = {
        name: flags.FLAGS[name].value
        for name in (
            "model",
            "hf_model",
            "num_requests",
            "prompt_len",
            "gen_len",
            "seed",
            "token_budget",
            "max_num_seqs",
            "max_model_len",
            "page_size",
            "matmul_size",
            "engine_only",
            "quick",
            "workload",
            "llama_cpp",
            "llama_cpp_gguf",
            "llama_cpp_threads",
            "llama_cpp_cache_type",
            "llama_cpp_args",
            "dtype",
            "quantize",
            "kv_cache_dtype",
            "rounds",
        )
    }
    if values["quick"]:
        values.update(_QUICK_SETTINGS)
    return BenchConfig(**values)


def check_paths(cfg: BenchConfig) -> None:
    """Exits with the fetch command when a checkpoint is missing (before anything slow starts)."""
    uses_hf = not cfg.engine_only or cfg.llama_cpp
    paths = [("--model", cfg.model)] + ([("--hf_model", cfg.hf_model)] if uses_hf else [])
    for flag, path in paths:
        if not os.path.exists(path):
            sys.exit(
                f"error: {flag} {path} does not exist. Produce the default model (and its cached "
                f"GGUF) from the repository root with:\n    {_FETCH_HINT}"
            )


# ----------------------------------------------------------------------------- workload


def normal_lengths(rng: np.random.Generator, n: int, mean: int) -> list[int]:
    """n lengths ~ Normal(mean, 0.3 x mean), rounded and clipped to [1, 2 x mean]."""
    draws = np.rint(rng.normal(mean, 0.3 * mean, size=n))
    return [int(x) for x in np.clip(draws, 1, 2 * mean)]


def make_workload(cfg: BenchConfig, vocab_size: int, round_index: int = 0) -> Workload:
    """Round `round_index`'s workload: drawn with seed --seed + round_index."""
    rng = np.random.default_rng(cfg.seed + round_index)
    if cfg.workload == "w0":
        low, high = W0_PROMPT_LENS
        prompt_lens = [int(n) for n in rng.integers(low, high + 1, size=cfg.num_requests)]
        gen_lens = [W0_GEN_LEN] * cfg.num_requests
    else:
        prompt_lens = normal_lengths(rng, cfg.num_requests, cfg.prompt_len)
        gen_lens = normal_lengths(rng, cfg.num_requests, cfg.gen_len)
    prompts = [rng.integers(0, vocab_size, size=n).tolist() for n in prompt_lens]
    return Workload(prompts, gen_lens)


def workload_flops(workload: Workload, model_config, non_embedding_params: int) -> dict[str, float]:
    """The FLOPs any engine must spend on this workload (see the module docstring)."""
    c = model_config
    lengths = [len(p) + g - 1 for p, g in zip(workload.prompts, workload.gen_lens, strict=True)]
    tokens = sum(lengths)
    context_sum = sum(n * (n + 1) // 2 for n in lengths)  # token at position i attends to i + 1 keys
    linear = 2.0 * non_embedding_params * tokens
    vocab = 2.0 * c.hidden_size * c.vocab_size * workload.generated_tokens
    attention = 4.0 * c.num_layers * c.num_heads * c.head_dim * context_sum
    return {
        "tokens_processed": tokens,
        "linear": linear,
        "vocab_projection": vocab,
        "attention": attention,
        "total": linear + vocab + attention,
    }


# ----------------------------------------------------------------------------- machine floor


def _best_seconds(fn, *args, repeats: int = 5) -> float:
    fn(*args).block_until_ready()  # compile and touch memory
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


def measure_matmul_gflops(n: int) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)  # f32[n, n]
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)  # f32[n, n]
    seconds = _best_seconds(jax.jit(jnp.matmul), a, b)
    return 2.0 * n**3 / seconds / 1e9


def measure_bandwidth_gbs(num_bytes: int = 512 << 20) -> dict[str, float]:
    """Read rate (a sum: one pass over the array) and copy rate (x + 1: one read, one write)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((num_bytes // 4,), jnp.float32)  # f32[N]
    read = num_bytes / _best_seconds(jax.jit(jnp.sum), x) / 1e9
    copy = 2 * num_bytes / _best_seconds(jax.jit(lambda v: v + 1.0), x) / 1e9
    return {"read_gbs": read, "copy_gbs": copy, "gbs": max(read, copy)}


def machine_info() -> dict[str, Any]:
    import jax

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_devices": [str(d) for d in jax.devices()],
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),  # fastgen_jax.hugepages
    }


# ----------------------------------------------------------------------------- our engine


def load_engine(cfg: BenchConfig):
    from fastgen_jax.config import EngineConfig
    from fastgen_jax.llm_engine import LLMEngine

    engine_config = EngineConfig(
        token_budget=cfg.token_budget,
        max_num_seqs=cfg.max_num_seqs,
        max_model_len=cfg.max_model_len,
        page_size=cfg.page_size,
        quantize=cfg.quantize,
        kv_cache_dtype=cfg.kv_cache_dtype,
    )
    start = time.perf_counter()
    # An absolute path: orbax refuses relative ones.
    engine = LLMEngine.from_pretrained(os.path.abspath(cfg.model), engine_config, dtype=cfg.dtype)
    print(
        f"fastgen-jax: loaded and compiled {engine.runner.num_compiled} step programs in "
        f"{time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    return engine


def param_counts(engine) -> dict[str, int]:
    import jax

    leaves = jax.tree.leaves(engine.runner.params)
    total = sum(int(x.size) for x in leaves)
    c = engine.model_config
    # Untied, or tied and quantized (the lookup keeps the float table, the head gets its int8 copy).
    separate_head = not c.tie_word_embeddings or engine.engine_config.quantize != "none"
    embedding = c.vocab_size * c.hidden_size * (2 if separate_head else 1)
    return {
        "params": total,
        "non_embedding_params": total - embedding,
        "params_bytes": sum(int(x.nbytes) for x in leaves),
    }


def run_ours(engine, workload: Workload) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from fastgen_jax.sampling_params import SamplingParams

    before = dataclasses.replace(engine.stats)
    generated: dict[str, list[int]] = {}
    start = time.perf_counter()
    for prompt, gen_len in zip(workload.prompts, workload.gen_lens, strict=True):
        params = SamplingParams(max_new_tokens=gen_len, ignore_eos=True, temperature=0.0)
        generated[engine.add_request(prompt_token_ids=prompt, sampling_params=params)] = []
    with tqdm(total=workload.generated_tokens, desc="fastgen-jax", unit="tok") as bar:
        while engine.has_unfinished():
            for out in engine.step():
                generated[out.request_id].extend(out.new_token_ids)
                bar.update(len(out.new_token_ids))
    wall = time.perf_counter() - start
    s = engine.stats
    return {
        "wall_s": wall,
        "steps": s.steps - before.steps,
        "host_s": s.host_seconds - before.host_seconds,
        "device_s": s.device_seconds - before.device_seconds,
        "prompt_tokens_computed": s.prompt_tokens - before.prompt_tokens,
        "preemptions": s.preemptions - before.preemptions,
        "compiled_after_warmup": s.compiled_after_warmup,
        "loadavg_after": os.getloadavg(),  # 1/5/15-minute load: was the CPU shared?
        "outputs": list(generated.values()),
    }


# ----------------------------------------------------------------------------- transformers


def load_transformers(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    p = pathlib.Path(path)
    kwargs = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
    model_dir = str(p.parent) if p.suffix == ".gguf" else str(p)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    if torch.cuda.is_available():  # on a GPU machine the peer runs on the GPU too
        model = model.to("cuda")
    return model.eval()


def transformers_generate(
    model, workload: Workload, cfg: BenchConfig, num_pages: int, desc: str
) -> list[list[int]]:
    """Runs the workload through transformers' continuous batching; returns tokens per request."""
    from tqdm.auto import tqdm
    from transformers import ContinuousBatchingConfig, GenerationConfig

    gen_config = GenerationConfig(
        do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=max(workload.gen_lens)
    )
    # older transformers (5.17, the GPU image's) name the page size `block_size`
    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    page_size = {"page_size" if "page_size" in fields else "block_size": cfg.page_size}
    cb_config = ContinuousBatchingConfig(
        **page_size,
        num_blocks=num_pages,
        max_batch_tokens=cfg.token_budget,
        max_requests_per_batch=cfg.max_num_seqs,
    )
    results = {}
    with model.continuous_batching_context_manager(
        generation_config=gen_config, continuous_batching_config=cb_config, block=True, timeout=10
    ) as manager:
        ids = [
            manager.add_request(prompt, max_new_tokens=gen_len, eos_token_id=-1)
            for prompt, gen_len in zip(workload.prompts, workload.gen_lens, strict=True)
        ]
        with tqdm(total=len(ids), desc=desc, unit="req") as bar:
            while len(results) < len(ids):
                result = manager.get_result(timeout=1)
                if result is not None and result.is_finished():
                    results[result.request_id] = result
                    bar.update(1)
                elif result is None and not manager.is_running():
                    raise RuntimeError("transformers' generation thread stopped unexpectedly")
    failed = [r.error for r in results.values() if r.error is not None]
    if failed:
        raise RuntimeError(f"transformers failed {len(failed)} requests: {failed[0]}")
    return [list(results[i].generated_tokens) for i in ids]


def run_transformers(cfg: BenchConfig, workload: Workload, num_pages: int, model) -> dict[str, Any]:
    """The workload through transformers; `model` as `load_transformers` gives it."""
    warm = Workload(workload.prompts[:4], [min(g, 8) for g in workload.gen_lens[:4]])
    transformers_generate(model, warm, cfg, num_pages, desc="transformers warm-up")
    start = time.perf_counter()
    outputs = transformers_generate(model, workload, cfg, num_pages, desc="transformers")
    wall = time.perf_counter() - start
    return {"wall_s": wall, "loadavg_after": os.getloadavg(), "outputs": outputs}


# ----------------------------------------------------------------------------- llama.cpp


def llama_cpp_gguf_path(cfg: BenchConfig) -> pathlib.Path:
    stem = pathlib.Path(cfg.hf_model).name.removesuffix(".gguf")
    kind = "Q8_0" if cfg.quantize == "int8" else "F32"
    return pathlib.Path(os.path.expanduser(cfg.llama_cpp_gguf.format(stem=stem, type=kind)))


def run_llama_cpp(cfg: BenchConfig, workload: Workload) -> dict[str, Any]:
    from fastgen_jax.benchmarks.llama_cpp import LlamaServer, LlamaServerConfig, write_f32_gguf

    gguf_path = llama_cpp_gguf_path(cfg)
    if not gguf_path.exists():
        start = time.perf_counter()
        write_f32_gguf(cfg.hf_model, gguf_path, "Q8_0" if cfg.quantize == "int8" else "F32")
        print(f"llama.cpp: wrote {gguf_path} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    longest = max(len(p) + g for p, g in zip(workload.prompts, workload.gen_lens, strict=True))
    server_config = LlamaServerConfig(
        binary=cfg.llama_cpp,
        model=str(gguf_path),
        parallel=len(workload.prompts),
        slot_context=-(-longest // 256) * 256,
        threads=cfg.llama_cpp_threads,
        batch=cfg.token_budget,
        cache_type=cfg.llama_cpp_cache_type,
        extra_args=tuple(cfg.llama_cpp_args.split()),
    )
    start = time.perf_counter()
    with LlamaServer(server_config) as server:
        print(f"llama.cpp: server ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        server.complete_all(workload.prompts[:4], [min(g, 8) for g in workload.gen_lens[:4]])  # warm-up
        start = time.perf_counter()
        outputs = server.complete_all(workload.prompts, workload.gen_lens)
        wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "loadavg_after": os.getloadavg(),
        "command": " ".join(server_config.command(server.port)),
        "outputs": outputs,
    }


# ----------------------------------------------------------------------------- report


def check_lengths(name: str, outputs: list[list[int]], workload: Workload) -> None:
    got = [len(o) for o in outputs]
    if got != workload.gen_lens:
        bad = sum(g != w for g, w in zip(got, workload.gen_lens, strict=True))
        raise RuntimeError(f"{name}: {bad} requests did not generate their drawn length")


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict[str, float]:
    """How far two greedy outputs match: whole requests, and tokens before the first difference."""
    same_prefix = 0
    for a, b in zip(ours, theirs, strict=True):
        same_prefix += next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), min(len(a), len(b))
        )
    total = sum(len(a) for a in ours)
    return {
        "identical_requests": sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(ours),
        "tokens_before_first_difference": same_prefix / total,
    }


def throughput(result: dict[str, Any], workload: Workload) -> None:
    result["gen_tok_s"] = workload.generated_tokens / result["wall_s"]
    result["total_tok_s"] = (workload.prompt_tokens + workload.generated_tokens) / result["wall_s"]


def compute_floor(
    flops: dict[str, float], params_bytes: int, steps: int, rates: dict[str, float], our_wall: float
) -> dict[str, float]:
    compute_s = flops["total"] / (rates["matmul_gflops"] * 1e9)
    weight_bytes = float(params_bytes) * steps
    memory_s = weight_bytes / (rates["bandwidth_gbs"] * 1e9)
    floor = max(compute_s, memory_s)
    return {
        "flops": flops["total"],
        "compute_s": compute_s,
        "weight_bytes": weight_bytes,
        "memory_s": memory_s,
        "floor_s": floor,
        "bound": "compute" if compute_s >= memory_s else "memory",
        "fraction_of_floor": floor / our_wall,
    }


def format_table(report: dict[str, Any]) -> str:
    wl, res, fl, cf = report["workload"], report["results"], report["floor"], report["config"]
    which = f" (round {report['median_round'] + 1}, the median's)" if "rounds" in report else ""
    lines = [
        f"workload{which}: {wl['num_requests']} requests, {wl['prompt_tokens']} prompt + "
        f"{wl['generated_tokens']} generated tokens (means {wl['prompt_len_mean']}/"
        f"{wl['gen_len_mean']}, seed {wl['seed']})",
        f"model: {report['model']}, ours {cf.get('dtype', 'float32')}"
        f"{' int8 weights' if cf.get('quantize', 'none') == 'int8' else ''}"
        f"{' bf16 KV' if cf.get('kv_cache_dtype', 'auto') == 'bfloat16' else ''} (transformers float32, "
        f"llama.cpp {'Q8_0' if cf.get('quantize', 'none') == 'int8' else 'F32'}), CPU; "
        f"all engines: token budget "
        f"{cf['token_budget']}, max {cf['max_num_seqs']} seqs, KV pages of {cf['page_size']}",
        f"{'engine':<14}{'wall s':>9}{'gen tok/s':>11}{'total tok/s':>13}",
    ]
    for name, r in res.items():
        lines.append(f"{name:<14}{r['wall_s']:>9.2f}{r['gen_tok_s']:>11.1f}{r['total_tok_s']:>13.1f}")
    if report.get("rounds"):
        lines += format_rounds(report["rounds"])
    ours = res["fastgen-jax"]
    rounds = report.get("rounds", [])
    of = f", the median of {len(rounds)} rounds' ratios" if rounds else ""
    if "transformers" in res:
        lines.append(
            f"ours / transformers (throughput{of}): {report['speedup']:.2f}x; greedy outputs "
            f"identical for {100 * report['agreement']['identical_requests']:.0f}% of "
            "requests"
        )
    if "llama.cpp" in res:
        lines.append(
            f"ours / llama.cpp (throughput{of}): {report['speedup_vs_llama_cpp']:.2f}x; greedy outputs "
            f"identical for {100 * report['agreement_llama_cpp']['identical_requests']:.0f}% of "
            f"requests, {100 * report['agreement_llama_cpp']['tokens_before_first_difference']:.0f}% "
            "of tokens before the first difference"
        )
        lines.append(f"llama.cpp: {res['llama.cpp']['command']}")
        for name, tokens in report["first_request_first_tokens"].items():
            lines.append(f"request 0, first {len(tokens)} tokens, {name}: {tokens}")
    lines += [
        f"fastgen-jax: {ours['steps']} steps, host {ours['host_s']:.2f} s, device "
        f"{ours['device_s']:.2f} s, {ours['preemptions']} preemptions",
        f"machine: {report['machine']['matmul_gflops']:.1f} GFLOP/s matmul, "
        f"{report['machine']['bandwidth_gbs']:.1f} GB/s memory",
        f"floor: {fl['flops'] / 1e9:.0f} GFLOP -> {fl['compute_s']:.2f} s; weight reads "
        f"{fl['weight_bytes'] / 1e9:.1f} GB -> {fl['memory_s']:.2f} s; floor {fl['floor_s']:.2f} s "
        f"({fl['bound']}-bound); ours at {fl['fraction_of_floor']:.2f} of the floor",
    ]
    return "\n".join(lines)


def format_rounds(rounds: list[dict[str, Any]]) -> list[str]:
    """Each round's generated tok/s per engine, its ratios and floor fraction, a line apiece."""
    engines = list(rounds[0]["gen_tok_s"])
    lines = [f"{len(rounds)} rounds, the engines in turn in each; the figures above are their medians:"]
    lines.append(
        f"{'round':<7}{'seed':>5}"
        + "".join(f"{name:>14}" for name in engines)
        + f"{'/ llama.cpp':>13}{'/ transformers':>16}{'floor':>7}"
    )
    for i, r in enumerate(rounds):
        ratios = [f"{r[k]:.2f}x" if k in r else "-" for k in ("speedup_vs_llama_cpp", "speedup")]
        lines.append(
            f"{i + 1:<7}{r['seed']:>5}"
            + "".join(f"{r['gen_tok_s'][name]:>14.1f}" for name in engines)
            + f"{ratios[0]:>13}{ratios[1]:>16}{r['fraction_of_floor']:>7.2f}"
        )
    return lines


def format_markdown(report: dict[str, Any]) -> str:
    rows = ["| engine | wall s | generated tok/s | total tok/s |", "| --- | ---: | ---: | ---: |"]
    for name, r in report["results"].items():
        rows.append(f"| {name} | {r['wall_s']:.2f} | {r['gen_tok_s']:.1f} | {r['total_tok_s']:.1f} |")
    m = report["machine"]
    return "\n".join(
        [
            "# Offline throughput on CPU",
            "",
            f"`{report['command']}` on {m['cpu_count']} x {m['cpu']} (load average "
            f"{m['loadavg_start'][0]:.1f} at the start, {m['loadavg_end'][0]:.1f} at the end). "
            "One run on a shared CPU: the numbers are noisy. How the floor is computed: see the "
            "docstring of `scripts/bench_offline.py`.",
            "",
            *rows,
            "",
            "```",
            format_table(report),
            "```",
            "",
        ]
    )


def write_outputs(report: dict[str, Any], path: str) -> None:
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(format_markdown(report))
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)


def run(cfg: BenchConfig) -> dict[str, Any]:
    check_paths(cfg)
    loadavg_start = os.getloadavg()
    engine = load_engine(cfg)
    model_config = engine.model_config
    workloads = [make_workload(cfg, model_config.vocab_size, r) for r in range(cfg.rounds)]
    counts = param_counts(engine)
    num_pages = engine.limits.num_pages
    transformers_model = None  # loaded once, for every round
    rounds = []
    for r, workload in enumerate(workloads):
        if cfg.rounds > 1:
            print(f"round {r + 1} of {cfg.rounds}", file=sys.stderr)
        results = {"fastgen-jax": run_ours(engine, workload)}
        if cfg.rounds == 1:
            del engine  # give its KV pool back before transformers allocates its own
        if not cfg.engine_only:
            if transformers_model is None:  # after `del engine` where there is one round
                start = time.perf_counter()
                transformers_model = load_transformers(cfg.hf_model)
                print(f"transformers: loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr)
            results["transformers"] = run_transformers(cfg, workload, num_pages, transformers_model)
        if cfg.llama_cpp:
            results["llama.cpp"] = run_llama_cpp(cfg, workload)
        rounds.append(results)
    machine = {**machine_info(), "loadavg_start": loadavg_start}
    bandwidth = measure_bandwidth_gbs()
    machine.update(
        matmul_gflops=measure_matmul_gflops(cfg.matmul_size),
        bandwidth_gbs=bandwidth["gbs"],
        bandwidth_detail=bandwidth,
    )
    reports = []
    for workload, results in zip(workloads, rounds, strict=True):
        flops = workload_flops(workload, model_config, counts["non_embedding_params"])
        reports.append(assemble_report(cfg, workload, counts, flops, results, machine))
    return reports[0] if cfg.rounds == 1 else combine_rounds(reports)


# Per-round figures that `combine_rounds` takes the median of.
_RATIOS = ("speedup", "speedup_vs_llama_cpp")


def combine_rounds(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report for several rounds: the round whose ours/llama.cpp ratio (else ours/transformers, else
    our throughput) is the median's, with every engine's throughput, each ratio and the floor fraction
    replaced by their medians over the rounds (a ratio's median taken over the rounds' own ratios, each
    from engines run minutes apart), the greedy agreement summed over every round's requests, and each
    round's figures under "rounds"."""
    key = next((k for k in ("speedup_vs_llama_cpp", "speedup") if k in reports[0]), None)

    def sort_key(report):
        return report[key] if key else report["results"]["fastgen-jax"]["gen_tok_s"]

    middle = sorted(reports, key=sort_key)[(len(reports) - 1) // 2]
    combined = copy.deepcopy(middle)
    combined["median_round"] = reports.index(middle)
    combined["workload"]["seed"] += combined["median_round"]  # the seed its prompts were drawn with
    for name, result in combined["results"].items():
        for field in ("gen_tok_s", "total_tok_s", "wall_s"):
            result[field] = float(np.median([r["results"][name][field] for r in reports]))
    for ratio in _RATIOS:
        if ratio in middle:
            combined[ratio] = float(np.median([r[ratio] for r in reports]))
    fractions = [r["floor"]["fraction_of_floor"] for r in reports]
    combined["floor"]["fraction_of_floor"] = float(np.median(fractions))
    for field in ("agreement", "agreement_llama_cpp"):
        if field in middle:  # every round has as many requests
            for measure in middle[field]:
                combined[field][measure] = float(np.mean([r[field][measure] for r in reports]))
    combined["rounds"] = [
        {
            "seed": r["workload"]["seed"] + i,  # each report holds --seed
            "gen_tok_s": {name: res["gen_tok_s"] for name, res in r["results"].items()},
            **{ratio: r[ratio] for ratio in _RATIOS if ratio in r},
            "fraction_of_floor": r["floor"]["fraction_of_floor"],
            "loadavg_after": {name: res["loadavg_after"][0] for name, res in r["results"].items()},
        }
        for i, r in enumerate(reports)
    ]
    return combined


def _library_versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def assemble_report(
    cfg: BenchConfig,
    workload: Workload,
    counts: dict[str, int],
    flops: dict[str, float],
    results: dict[str, Any],
    machine: dict[str, Any],
) -> dict[str, Any]:
    for name, r in results.items():
        check_lengths(name, r["outputs"], workload)
        throughput(r, workload)
    ours = results["fastgen-jax"]
    report: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "model": pathlib.Path(cfg.model).name,
        "config": dataclasses.asdict(cfg),
        "workload": {
            "num_requests": cfg.num_requests,
            "prompt_len_mean": cfg.prompt_len,
            "gen_len_mean": cfg.gen_len,
            "seed": cfg.seed,
            "prompt_tokens": workload.prompt_tokens,
            "generated_tokens": workload.generated_tokens,
            **counts,
            "flops": flops,
        },
        "machine": {**machine, "loadavg_end": os.getloadavg()},
        "results": results,
        "floor": compute_floor(flops, counts["params_bytes"], ours["steps"], machine, ours["wall_s"]),
    }
    if "transformers" in results:
        report["speedup"] = ours["gen_tok_s"] / results["transformers"]["gen_tok_s"]
        report["agreement"] = agreement(ours["outputs"], results["transformers"]["outputs"])
        report["machine"].update(_library_versions())
    if "llama.cpp" in results:
        theirs = results["llama.cpp"]
        report["speedup_vs_llama_cpp"] = ours["gen_tok_s"] / theirs["gen_tok_s"]
        report["agreement_llama_cpp"] = agreement(ours["outputs"], theirs["outputs"])
        report["first_request_first_tokens"] = {
            name: r["outputs"][0][:FIRST_TOKENS_SHOWN] for name, r in results.items()
        }
    for r in results.values():
        r.pop("outputs")
    return report


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax and jax log every restore at INFO
    cfg = config_from_flags()
    report = run(cfg)
    print(format_table(report))
    if _OUTPUT_JSON.value:
        write_outputs(report, _OUTPUT_JSON.value)


if __name__ == "__main__":
    from fastgen_jax import hugepages

    hugepages.restart_with_huge_pages()  # as the server runs: malloc on huge pages
    app.run(main)
