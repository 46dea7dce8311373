"""Command-line flags shared by the entry points (`generate`, `serve`): the model and the engine's
limits, defined once so both CLIs can live in one process, and mapped onto `EngineConfig` here."""

from __future__ import annotations

import os

from absl import flags

FLAGS = flags.FLAGS

flags.DEFINE_string(
    "model",
    "checkpoints/smollm2-135m-instruct",
    "Converted checkpoint dir, Hugging Face model dir, or .gguf file.",
)
flags.DEFINE_string(
    "served_model_name",
    None,
    "Name requests pass as `model` (default: the model dir's name); others are answered 404.",
)
flags.DEFINE_string(
    "token_budget",
    "512",
    "Tokens per forward pass (Dynamic SplitFuse budget), or 'auto': each step picks among the compiled "
    "budgets up to --max_token_budget the largest that keeps decoding within --sla_token_rate.",
)
flags.register_validator(
    "token_budget",
    lambda v: v == "auto" or v.lstrip("-").isdigit(),
    "--token_budget must be an integer or auto",
)
flags.DEFINE_integer("max_token_budget", 512, "The largest budget --token_budget=auto may choose.")
flags.DEFINE_float(
    "sla_prompt_rate",
    512.0,
    "SLA: the first token is due within prompt_tokens / this many seconds (FastGen's 512 tokens/s; "
    "/metrics counts requests meeting and missing it).",
)
flags.DEFINE_float(
    "sla_token_rate",
    4.0,
    "SLA: the EMA (span 16) of a request's token gaps must stay at or below 1 / this many seconds "
    "(FastGen: 2, 4 or 6 tokens/s); --token_budget=auto keeps running sequences within it.",
)
flags.DEFINE_integer("max_num_seqs", 256, "Sequences per forward pass.")
flags.DEFINE_integer("max_model_len", 2048, "Longest prompt + generation.")
flags.DEFINE_integer("page_size", 16, "Tokens per KV page.")
flags.DEFINE_integer("kv_pages", None, "KV pages in the pool (default: from --kv_cache_gib).")
flags.DEFINE_float("kv_cache_gib", 2.0, "Memory for the KV pool when --kv_pages is not given.")
flags.DEFINE_enum("policy", "splitfuse", ["splitfuse", "prefill_first", "sla"], "Scheduling policy.")
flags.DEFINE_integer(
    "tensor_parallel", 1, "Devices each engine's step is split over (heads and MLP sharded).", lower_bound=1
)
flags.DEFINE_boolean(
    "enable_prefix_caching",
    True,
    "Reuse the KV of full pages of earlier prompts (and answers) that a new prompt starts with; "
    "--noenable_prefix_caching computes every prompt from scratch.",
)
flags.DEFINE_boolean(
    "async_scheduling",
    True,
    "Schedule and plan the next step while the device runs this one (overlap); "
    "--noasync_scheduling runs one step at a time (for debugging and comparison).",
)
flags.DEFINE_enum(
    "launch_timing",
    "auto",
    ["auto", "early", "late"],
    "With overlap, when the server launches the next step: as the running one starts (early), or just "
    "before it is predicted to end, with the requests that arrived meanwhile (late); auto: late under "
    "--policy=sla, early otherwise. Offline jobs add their requests first and launch early.",
)
flags.DEFINE_enum(
    "speculative",
    "off",
    ["off", "ngram", "draft"],
    "Speculative decoding: 'ngram' proposes what followed the sequence's last tokens earlier in its own "
    "prompt and output (prompt lookup), 'draft' runs --speculative_model; the model verifies the "
    "proposals in the same step, so the output is unchanged. Only budget a step leaves idle is used.",
)
flags.DEFINE_string(
    "speculative_model", None, "Draft checkpoint for --speculative=draft (same tokenizer as --model)."
)
flags.DEFINE_integer(
    "num_speculative_tokens",
    4,
    "Most draft tokens per sequence and step (adapted per sequence to its acceptance rate).",
    lower_bound=1,
    upper_bound=16,
)
flags.DEFINE_enum(
    "quantize",
    "none",
    ["none", "int8"],
    "Weight-only quantization: 'int8' keeps the projections and the LM head as int8 with a float32 scale "
    "per output channel (with the CPU kernels a decode step reads a quarter of float32's bytes; "
    "accuracy in the README). "
    "Under --tensor_parallel each device holds the int8 rows of its own heads and columns (XLA's dots "
    "multiply them: memory saved, not the CPU kernels' bandwidth).",
)
flags.DEFINE_enum(
    "kv_cache_dtype",
    "auto",
    ["auto", "float32", "bfloat16"],
    "KV pages' element type: 'auto' is --dtype; 'bfloat16' under a float32 model holds twice the tokens "
    "in the same memory and halves the bytes decode attention reads (on the CPU, scores and sums stay "
    "float32).",
)
flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16", "float16"],
    "Compute dtype (default: float32 on CPU, bfloat16 on GPU).",
)


def engine_config(kv_cache_bytes: int | None = None):
    """The EngineConfig the flags describe; `kv_cache_bytes` overrides --kv_cache_gib."""
    from fastgen_jax.config import EngineConfig

    auto = FLAGS.token_budget == "auto"
    return EngineConfig(
        token_budget=FLAGS.max_token_budget if auto else int(FLAGS.token_budget),
        adaptive_budget=auto,
        sla_token_rate=FLAGS.sla_token_rate,
        sla_prompt_rate=FLAGS.sla_prompt_rate,
        max_num_seqs=FLAGS.max_num_seqs,
        max_model_len=FLAGS.max_model_len,
        page_size=FLAGS.page_size,
        num_pages=FLAGS.kv_pages,
        kv_cache_bytes=kv_cache_bytes if kv_cache_bytes is not None else int(FLAGS.kv_cache_gib * (1 << 30)),
        policy=FLAGS.policy,
        tensor_parallel=FLAGS.tensor_parallel,
        quantize=FLAGS.quantize,
        kv_cache_dtype=FLAGS.kv_cache_dtype,
        enable_prefix_caching=FLAGS.enable_prefix_caching,
        async_scheduling=FLAGS.async_scheduling,
        launch_timing=FLAGS.launch_timing,
        speculative=FLAGS.speculative,
        speculative_model=FLAGS.speculative_model,
        num_speculative_tokens=FLAGS.num_speculative_tokens,
    )


def sla():
    """The SLA the flags describe: what /metrics judges requests by."""
    from fastgen_jax.sla import SLA

    return SLA(FLAGS.sla_prompt_rate, FLAGS.sla_token_rate)


def served_model_name() -> str:
    """The name requests must give as `model` (server and batch job alike)."""
    return FLAGS.served_model_name or os.path.basename(os.path.normpath(FLAGS.model))
