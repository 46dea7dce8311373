"""Offline generation from the command line: one prompt, or a JSONL batch job.

    python -m fastgen_jax.generate --prompt="What is the capital of France?" --chat
    python -m fastgen_jax.generate --input=requests.jsonl --output=results.jsonl [--resume] [--ordered]

An input file holds OpenAI Batch request lines (`{"custom_id", "method", "url", "body"}`, answered
as the server would answer them) or simple lines (`{"prompt" | "messages", sampling fields}`); see
`fastgen_jax.batch`. Results are appended and flushed as requests finish; `--resume` continues a
killed job; a bad line gets its error line and the job goes on; the exit status is 1 if any failed.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

from fastgen_jax import engine_flags, hugepages
from fastgen_jax.sampling_params import SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_string("prompt", None, "A single prompt; its text is printed as it is generated.")
flags.DEFINE_bool("chat", False, "Wrap --prompt in the model's chat template as a user message.")
flags.DEFINE_string("input", None, "JSONL file of requests (see the module docstring).")
flags.DEFINE_string("output", None, "JSONL file for the results of --input (default: stdout).")
flags.DEFINE_enum(
    "input_format",
    "auto",
    ["auto", "openai", "simple"],
    "Format of --input; auto: openai if the first JSON line has custom_id, url or body.",
)
flags.DEFINE_bool("resume", False, "Continue --output: answer only the lines it does not answer yet.")
flags.DEFINE_bool("ordered", False, "At the end, rewrite --output in input order (else completion order).")
flags.DEFINE_integer(
    "max_in_flight", None, "Sequences in the engine at once (default: twice --max_num_seqs).", lower_bound=1
)
flags.DEFINE_bool("progress", True, "Show progress bars (compiling, then the batch) on stderr.")
# Defaults of --prompt and of simple lines; OpenAI Batch bodies take the server's defaults instead.
flags.DEFINE_integer("max_new_tokens", 256, "Default tokens to generate per request.")
flags.DEFINE_float("temperature", 0.0, "Default sampling temperature (0 = greedy).")
flags.DEFINE_float("top_p", 1.0, "Default nucleus sampling mass.")
flags.DEFINE_integer("top_k", 0, "Default top-k (0 = off).")
flags.DEFINE_integer("seed", None, "Default random seed.")


def default_params() -> SamplingParams:
    return SamplingParams(
        max_new_tokens=FLAGS.max_new_tokens,
        temperature=FLAGS.temperature,
        top_p=FLAGS.top_p,
        top_k=FLAGS.top_k,
        seed=FLAGS.seed,
    )


def run_prompt(engine, prompt: str, chat: bool) -> None:
    if chat:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    rid = engine.add_request(prompt, default_params())
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid:
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
    sys.stdout.write("\n")


def detect_format(path: str) -> str:
    """openai if the first line that is a JSON object has custom_id, url or body; else simple."""
    from fastgen_jax.batch.output import input_lines

    for _, text in input_lines(path):
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            return "openai" if {"custom_id", "url", "body"} & set(record) else "simple"
    return "simple"


def run_file(engine) -> bool:
    """Runs the --input job; prints the summary line; True if any line failed."""
    from fastgen_jax.batch.formats import OpenAIBatchFormat, SimpleFormat
    from fastgen_jax.batch.job import run_batch
    from fastgen_jax.server.request_builder import RequestBuilder

    kind = FLAGS.input_format if FLAGS.input_format != "auto" else detect_format(FLAGS.input)
    capacity = engine.engine_config.max_num_seqs + 1024  # the server's, at its default --max_queue
    builder = RequestBuilder(engine, engine_flags.served_model_name(), capacity)
    fmt = OpenAIBatchFormat(builder) if kind == "openai" else SimpleFormat(builder, default_params())
    options = dict(
        output_path=FLAGS.output,
        resume=FLAGS.resume,
        ordered=FLAGS.ordered,
        max_in_flight=FLAGS.max_in_flight,
        progress=FLAGS.progress,
    )
    try:
        if FLAGS.output is None:
            summary = run_batch(engine, fmt, FLAGS.input, sys.stdout, **options)
        else:
            with open(FLAGS.output, "a" if FLAGS.resume else "w", encoding="utf-8") as out:
                summary = run_batch(engine, fmt, FLAGS.input, out, **options)
    except KeyboardInterrupt:
        if FLAGS.output is None:
            sys.exit("interrupted")
        sys.exit(f"interrupted: the results so far are in {FLAGS.output}; rerun with --resume to go on")
    print(summary.line(), file=sys.stderr)
    return summary.any_failed


def check_batch_flags() -> None:
    """Refuses flag combinations that would lose results, before the model loads."""
    if (FLAGS.resume or FLAGS.ordered) and not FLAGS.output:
        raise app.UsageError("--resume and --ordered need --output")
    if FLAGS.resume and not os.path.exists(FLAGS.output):
        raise app.UsageError(f"--resume: {FLAGS.output} does not exist (run once without --resume)")
    if FLAGS.output and not FLAGS.resume and os.path.exists(FLAGS.output) and os.path.getsize(FLAGS.output):
        raise app.UsageError(
            f"{FLAGS.output} already holds results: pass --resume to continue it, or remove it"
        )
    open(FLAGS.input).close()  # an OSError names a missing input now, not after start-up


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if (FLAGS.prompt is None) == (FLAGS.input is None):
        raise app.UsageError("give exactly one of --prompt or --input")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and jax log a lot at INFO
    from fastgen_jax.batch.output import OutputError
    from fastgen_jax.checkpoints import CheckpointError
    from fastgen_jax.config import ConfigError
    from fastgen_jax.llm_engine import LLMEngine, RequestError
    from fastgen_jax.sampling_params import SamplingParamsError

    try:
        default_params()
        if FLAGS.input is not None:
            check_batch_flags()
        config = engine_flags.engine_config()
        engine = LLMEngine.from_pretrained(FLAGS.model, config, FLAGS.dtype, progress=FLAGS.progress)
        if FLAGS.prompt is not None:
            return run_prompt(engine, FLAGS.prompt, FLAGS.chat)
        failed = run_file(engine)
    except (CheckpointError, ConfigError, RequestError, SamplingParamsError, OutputError, OSError) as e:
        sys.exit(f"error: {e}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    hugepages.restart_with_huge_pages()
    app.run(main)
