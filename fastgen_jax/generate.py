"""Offline generation from the command line: one prompt, or a JSONL batch file.

    python -m fastgen_jax.generate --prompt="What is the capital of France?" --chat
    python -m fastgen_jax.generate --input=prompts.jsonl --output=out.jsonl

Each input line is a JSON object with "prompt" (a string) or "messages" (a chat), plus optional
sampling fields (max_new_tokens, min_new_tokens, temperature, top_k, top_p, seed, stop,
stop_token_ids, ignore_eos, logprobs). Output lines keep the input order. A bad line is reported on
stderr by its number and gets an {"error": ...} line in the output; every other line still completes.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from absl import app, flags, logging

from fastgen_jax import engine_flags
from fastgen_jax.sampling_params import SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_string("prompt", None, "A single prompt; its text is printed as it is generated.")
flags.DEFINE_bool("chat", False, "Wrap --prompt in the model's chat template as a user message.")
flags.DEFINE_string("input", None, "JSONL file of requests (see the module docstring).")
flags.DEFINE_string("output", None, "JSONL file for the results of --input (default: stdout).")
flags.DEFINE_integer("max_new_tokens", 256, "Default tokens to generate per request.")
flags.DEFINE_float("temperature", 0.0, "Default sampling temperature (0 = greedy).")
flags.DEFINE_float("top_p", 1.0, "Default nucleus sampling mass.")
flags.DEFINE_integer("top_k", 0, "Default top-k (0 = off).")
flags.DEFINE_integer("seed", None, "Default random seed.")

_RECORD_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def default_params() -> SamplingParams:
    return SamplingParams(
        max_new_tokens=FLAGS.max_new_tokens,
        temperature=FLAGS.temperature,
        top_p=FLAGS.top_p,
        top_k=FLAGS.top_k,
        seed=FLAGS.seed,
    )


def parse_record(line: str, defaults: SamplingParams):
    """(prompt or messages, SamplingParams) from one JSONL line; ValueError says what is wrong."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    unknown = set(record) - _RECORD_FIELDS - {"prompt", "messages"}
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}")
    if ("prompt" in record) == ("messages" in record):
        raise ValueError('needs exactly one of "prompt" or "messages"')
    prompt = record.pop("prompt", None) or record.pop("messages", None)
    if not isinstance(prompt, str | list) or not prompt:
        raise ValueError('"prompt" must be a non-empty string or "messages" a non-empty list')
    if "stop" in record and isinstance(record["stop"], list):
        record["stop"] = tuple(record["stop"])
    return prompt, dataclasses.replace(defaults, **record)


def run_batch(engine, lines: list[str], out) -> int:
    """Generates for every good line; writes one output line per input line, in order."""
    from fastgen_jax.offline import add_prompt, run_to_completion

    defaults, results, ids = default_params(), {}, {}
    for n, line in enumerate(lines, start=1):
        try:
            prompt, params = parse_record(line, defaults)
            ids[n] = add_prompt(engine, prompt, params)
        except (ValueError, TypeError) as e:
            results[n] = {"line": n, "error": str(e)}
            print(f"error: input line {n}: {e}", file=sys.stderr)
    responses = run_to_completion(engine, ids.values())
    for n, rid in ids.items():
        results[n] = {"line": n, **dataclasses.asdict(responses[rid])}
    for n in range(1, len(lines) + 1):
        out.write(json.dumps(results[n], ensure_ascii=False) + "\n")
    return sum("error" in r for r in results.values())


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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if (FLAGS.prompt is None) == (FLAGS.input is None):
        raise app.UsageError("give exactly one of --prompt or --input")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and jax log a lot at INFO
    from fastgen_jax.checkpoints import CheckpointError
    from fastgen_jax.config import ConfigError
    from fastgen_jax.llm_engine import LLMEngine, RequestError
    from fastgen_jax.sampling_params import SamplingParamsError

    try:
        default_params()
        engine = LLMEngine.from_pretrained(FLAGS.model, engine_flags.engine_config(), FLAGS.dtype)
        if FLAGS.prompt is not None:
            return run_prompt(engine, FLAGS.prompt, FLAGS.chat)
        with open(FLAGS.input) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        if FLAGS.output:
            with open(FLAGS.output, "w") as out:
                failed = run_batch(engine, lines, out)
        else:
            failed = run_batch(engine, lines, sys.stdout)
    except (CheckpointError, ConfigError, RequestError, SamplingParamsError, OSError) as e:
        sys.exit(f"error: {e}")
    if failed:
        print(f"{failed} of {len(lines)} input lines failed (see above)", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
