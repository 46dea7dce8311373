"""Structured outputs on SmolLM2, sampled hot: does every answer keep to its schema, choice or regex?

At temperature 1.0, `--num_json` chat completions spread over five JSON schemas (nested objects, arrays
with bounds, enums, numbers with ranges, optional fields, strings with maxLength), then
`--num_choice` guided_choice and `--num_regex` guided_regex completions, all through one engine with
32 sequences at a time (so constrained rows share steps). Every answer that finishes with "stop" must
validate with `jsonschema` (or be one of the choices, or match the regex), and at least 95% of the
JSON answers must finish with "stop". Writes `<output>.json` and `<output>.md`; exits 1 if a check
fails:

    python scripts/check_structured.py --output=docs/benchmarks/structured_smollm2
"""

from __future__ import annotations

import json
import platform
import re
import sys
import time

import jsonschema
from absl import app, flags

from fastgen_jax.config import EngineConfig
from fastgen_jax.llm_engine import LLMEngine
from fastgen_jax.sampling_params import SamplingParams
from fastgen_jax.structured import StructuredOutputs

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "checkpoints/smollm2-135m-instruct", "Checkpoint to run.")
flags.DEFINE_integer("num_json", 200, "JSON-schema completions (spread over the schemas).")
flags.DEFINE_integer("num_choice", 40, "guided_choice completions.")
flags.DEFINE_integer("num_regex", 40, "guided_regex completions.")
flags.DEFINE_integer("max_tokens", 256, "max_tokens of every completion.")
flags.DEFINE_string(
    "output", "docs/benchmarks/structured_smollm2", "Prefix of the JSON and Markdown written."
)

_TEXT = {"type": "string", "maxLength": 24}
SCHEMAS = {
    "person (nested object, optional field)": {
        "type": "object",
        "properties": {
            "name": _TEXT,
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "address": {
                "type": "object",
                "properties": {"city": _TEXT, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city"],
                "additionalProperties": False,
            },
            "nickname": {"type": "string", "maxLength": 12},
        },
        "required": ["name", "age", "address"],
        "additionalProperties": False,
    },
    "order (array with bounds, enum)": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"enum": ["apple", "bread", "milk", "tea"]},
                        "quantity": {"type": "integer", "minimum": 1, "maximum": 9},
                    },
                    "required": ["sku", "quantity"],
                    "additionalProperties": False,
                },
            },
            "express": {"type": "boolean"},
        },
        "required": ["items", "express"],
        "additionalProperties": False,
    },
    "reading (numbers with ranges)": {
        "type": "object",
        "properties": {
            "temperature_c": {"type": "number", "minimum": -50, "maximum": 60},
            "humidity": {"type": "number", "minimum": 0, "maximum": 100},
            "station": {"type": "string", "maxLength": 8},
        },
        "required": ["temperature_c", "humidity", "station"],
        "additionalProperties": False,
    },
    "task (enums, optional fields)": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 30},
            "status": {"enum": ["todo", "doing", "done"]},
            "priority": {"type": "integer", "minimum": 1, "maximum": 5},
            "notes": {"type": "string", "maxLength": 40},
        },
        "required": ["title", "status"],
        "additionalProperties": False,
    },
    "tags (array of short strings)": {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 12},
                "minItems": 1,
                "maxItems": 4,
            },
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["tags", "score"],
        "additionalProperties": False,
    },
}
CHOICES = ("positive", "negative", "neutral")
REGEX = r"\+1-[0-9]{3}-[0-9]{3}-[0-9]{4}"


def _chat(engine: LLMEngine, text: str) -> list[int]:
    return engine.tokenizer.encode_chat([{"role": "user", "content": text}])


def requests(
    engine: LLMEngine, num_json: int, num_choice: int, num_regex: int, max_tokens: int
) -> list[dict]:
    """The workload: each entry holds its kind, name, prompt ids, sampling params and checker."""
    out, names = [], list(SCHEMAS)
    for i in range(num_json):
        name = names[i % len(names)]
        schema = SCHEMAS[name]
        prompt = f"Make up an example {name.split()[0]} as JSON matching this schema: {json.dumps(schema)}"
        spec = StructuredOutputs(json=schema)
        out.append(dict(kind="json", name=name, ids=_chat(engine, prompt), spec=spec, schema=schema))
    for _ in range(num_choice):
        prompt = "Is this review positive, negative or neutral? 'The food was fine, the service slow.'"
        out.append(
            dict(
                kind="choice",
                name="sentiment",
                ids=_chat(engine, prompt),
                spec=StructuredOutputs(choice=CHOICES),
            )
        )
    for _ in range(num_regex):
        prompt = "Write an American phone number."
        out.append(
            dict(kind="regex", name="phone", ids=_chat(engine, prompt), spec=StructuredOutputs(regex=REGEX))
        )
    for i, r in enumerate(out):
        r["params"] = SamplingParams(
            max_new_tokens=max_tokens, temperature=1.0, seed=i, structured_outputs=r["spec"]
        )
    return out


def valid(r: dict, text: str) -> bool:
    if r["kind"] == "choice":
        return text in CHOICES
    if r["kind"] == "regex":
        return re.fullmatch(REGEX, text) is not None
    try:
        jsonschema.validate(json.loads(text), r["schema"])
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def run_check(engine: LLMEngine, num_json: int, num_choice: int, num_regex: int, max_tokens: int) -> dict:
    """Runs the workload on `engine`; returns per-group counts and the overall verdict."""
    work = requests(engine, num_json, num_choice, num_regex, max_tokens)
    texts, reasons = {}, {}
    start = time.perf_counter()
    for i, r in enumerate(work):
        engine.add_request(prompt_token_ids=r["ids"], sampling_params=r["params"], request_id=str(i))
        texts[str(i)] = ""
    while engine.has_unfinished():
        for out in engine.step():
            texts[out.request_id] += out.new_text
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    seconds = time.perf_counter() - start
    groups: dict[str, dict] = {}
    for i, r in enumerate(work):
        g = groups.setdefault(
            r["name"], dict(kind=r["kind"], total=0, stop=0, stop_valid=0, length=0, example=None)
        )
        text, reason = texts[str(i)], reasons[str(i)]
        g["total"] += 1
        g["stop"] += reason == "stop"
        g["length"] += reason == "length"
        g["stop_valid"] += reason == "stop" and valid(r, text)
        g["example"] = g["example"] or (text if reason == "stop" else None)
    json_groups = [g for g in groups.values() if g["kind"] == "json"]
    json_stop = sum(g["stop"] for g in json_groups) / max(1, sum(g["total"] for g in json_groups))
    all_valid = all(g["stop_valid"] == g["stop"] for g in groups.values())
    choice_regex_stop = all(g["stop"] == g["total"] for g in groups.values() if g["kind"] != "json")
    return dict(
        groups=groups,
        json_stop_fraction=json_stop,
        every_stop_output_valid=all_valid,
        choice_and_regex_all_stop=choice_regex_stop,
        passed=all_valid and json_stop >= 0.95 and choice_regex_stop,
        seconds=seconds,
        compiled_after_warmup=engine.stats.compiled_after_warmup,
    )


def _markdown(result: dict) -> str:
    lines = [
        "# Structured outputs on SmolLM2-135M-Instruct, temperature 1.0",
        "",
        f"`python scripts/check_structured.py` ({result['machine']}, load average {result['load_average']}).",
        "",
        "| group | kind | completions | finish stop | stop and valid | finish length |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, g in result["groups"].items():
        lines.append(
            f"| {name} | {g['kind']} | {g['total']} | {g['stop']} | {g['stop_valid']} | {g['length']} |"
        )
    lines += [
        "",
        f"JSON answers finishing with stop: {100 * result['json_stop_fraction']:.1f}% (target >= 95%); every "
        f"stop answer valid: {result['every_stop_output_valid']}; passed: {result['passed']}; "
        f"{result['seconds']:.0f} s for all; programs compiled after warm-up: "
        f"{result['compiled_after_warmup']}.",
        "",
        "Examples:",
        "",
        *[f"- {name}: `{g['example']}`" for name, g in result["groups"].items()],
    ]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    import os

    config = EngineConfig(token_budget=128, max_num_seqs=32, max_model_len=1024, num_pages=1300)
    engine = LLMEngine.from_pretrained(FLAGS.model, config)
    result = run_check(engine, FLAGS.num_json, FLAGS.num_choice, FLAGS.num_regex, FLAGS.max_tokens)
    result.update(machine=f"{platform.machine()}, {os.cpu_count()} CPUs", load_average=os.getloadavg()[0])
    with open(f"{FLAGS.output}.json", "w") as f:
        json.dump(result, f, indent=2)
    with open(f"{FLAGS.output}.md", "w") as f:
        f.write(_markdown(result))
    print(_markdown(result))
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    app.run(main)
