"""The two input formats of a batch job, and the output line each input line gets.

Every non-blank input line becomes a `Job`: the engine requests to run, and how to render the output
line once they finish, or the finished output line itself when the input line is bad. Each line has a
*key*, written into its output line, by which `--resume` knows what is already answered:

- `OpenAIBatchFormat`, the OpenAI Batch API's request lines (`custom_id`, `method`, `url`, `body`).
  A body is checked and answered by the server's own `RequestBuilder` and `Formatter`, so the output
  body is what `POST url` would answer. Key: the `custom_id`; a line without a usable one (not JSON,
  no `custom_id`, a repeated `custom_id`) is keyed and marked by its line number (`"line": N`).
- `SimpleFormat`, one `{"prompt" | "messages", ...sampling fields}` object per line, in
  `SamplingParams`' names or the OpenAI API's. Key: the line number, written as `"line"`.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable
from typing import Any

import pydantic

from fastgen_jax.sampling_params import SamplingParams, SamplingParamsError
from fastgen_jax.server.async_engine import GenerationRequest
from fastgen_jax.server.openai_format import Choice
from fastgen_jax.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from fastgen_jax.server.request_builder import RequestBuilder, validation_error

Record = dict[str, Any]


@dataclasses.dataclass
class Job:
    """One input line: engine requests and a renderer, or (a bad line) its finished output line."""

    line: int
    requests: list[GenerationRequest] = dataclasses.field(default_factory=list)
    render: Callable[[list[Choice]], Record] | None = None
    error: Record | None = None


class LineError(ValueError):
    """An input line that is no request at all; `code` names the kind of fault."""

    def __init__(self, code: str, message: str, custom_id: str | None = None):
        super().__init__(message)
        self.code, self.custom_id = code, custom_id


def _json_object(text: str) -> Record:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise LineError("invalid_json", f"not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise LineError("invalid_json", "expected a JSON object")
    return record


# ---------------------------------------------------------------------- the OpenAI Batch format

ROUTES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}
_BATCH_FIELDS = {"custom_id", "method", "url", "body"}


class OpenAIBatchFormat:
    """Request lines `{"custom_id", "method": "POST", "url", "body"}`; output lines `{"id",
    "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`."""

    name = "openai"

    def __init__(self, builder: RequestBuilder):
        self.builder = builder
        self.seen: set[str] = set()  # custom_ids met so far: a later one is a duplicate

    def restart(self) -> None:
        """Forgets the lines read, to read the file again from its first line."""
        self.seen.clear()

    def read(self, line: int, text: str) -> tuple[str, Record | LineError]:
        """(key, the parsed line or why it is none); remembers the line's custom_id."""
        try:
            record = _json_object(text)
        except LineError as e:
            return f"line:{line}", e
        custom_id = record.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            return f"line:{line}", LineError("invalid_line", '"custom_id" must be a non-empty string')
        if custom_id in self.seen:
            message = f"custom_id {custom_id!r} appears on an earlier line"
            return f"line:{line}", LineError("duplicate_custom_id", message, custom_id)
        self.seen.add(custom_id)
        return f"id:{custom_id}", record

    def prepare(self, line: int, key: str, parsed: Record | LineError) -> Job:
        """The job for a line `read` returned."""
        custom_id = parsed.get("custom_id") if isinstance(parsed, dict) else parsed.custom_id
        try:
            if isinstance(parsed, LineError):
                raise parsed
            prepared = self._prepare_request(parsed)
        except LineError as e:
            return Job(line, error=self._line_error(line, key, custom_id, e))
        except APIError as e:
            return Job(line, error=self._api_error(custom_id, e))

        def render(choices: list[Choice]) -> Record:
            body = prepared.formatter.response(choices)
            return _batch_line(custom_id, 200, prepared.formatter.request_id, body)

        return Job(line, prepared.requests, render)

    def _prepare_request(self, record: Record):
        unknown = set(record) - _BATCH_FIELDS
        if unknown:
            raise LineError("invalid_line", f"unknown field(s) {sorted(unknown)}")
        if record.get("method", "POST") != "POST":
            raise LineError("invalid_line", f'method must be "POST", got {record["method"]!r}')
        url = record.get("url")
        if url not in ROUTES:
            raise LineError("unknown_url", f"url must be one of {sorted(ROUTES)}, got {url!r}")
        if not isinstance(record.get("body"), dict):
            raise LineError("invalid_line", '"body" must be a JSON object')
        try:
            body = ROUTES[url].model_validate(record["body"])
        except pydantic.ValidationError as e:
            raise validation_error(e.errors()) from None
        if body.stream:
            raise APIError(400, "stream is not supported in a batch job", "stream")
        if url == "/v1/completions":
            return self.builder.completion(body)
        return self.builder.chat(body)

    @staticmethod
    def _line_error(line: int, key: str, custom_id: str | None, e: LineError) -> Record:
        record = _batch_line(custom_id, None, None, None, {"code": e.code, "message": f"line {line}: {e}"})
        if key.startswith("line:"):
            record["line"] = line
        return record

    @staticmethod
    def _api_error(custom_id: str, e: APIError) -> Record:
        error = {"code": e.code or e.type, "message": e.message}
        return _batch_line(custom_id, e.status, f"req_{uuid.uuid4().hex}", e.body(), error)

    @staticmethod
    def key_of(record: Record) -> str:
        """The key of an output line (see the module docstring)."""
        return f"line:{record['line']}" if "line" in record else f"id:{record['custom_id']}"

    @staticmethod
    def failed(record: Record) -> bool:
        return record.get("error") is not None


def _batch_line(
    custom_id: str | None, status: int | None, request_id: str | None, body: Any, error: Any = None
) -> Record:
    response = None if status is None else {"status_code": status, "request_id": request_id, "body": body}
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }


# ---------------------------------------------------------------------- the simple format

_ALIASES = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "min_tokens": "min_new_tokens",
}
_PARAM_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
SIMPLE_FIELDS = {"prompt", "messages", "n"} | _PARAM_FIELDS | set(_ALIASES)


class SimpleFormat:
    """`{"prompt" | "messages", sampling fields}` lines; output `{"line", "generated_text", ...}`."""

    name = "simple"

    def __init__(self, builder: RequestBuilder, defaults: SamplingParams):
        self.builder, self.defaults = builder, defaults

    def restart(self) -> None:
        pass

    def read(self, line: int, text: str) -> tuple[str, Record | LineError]:
        try:
            return f"line:{line}", _json_object(text)
        except LineError as e:
            return f"line:{line}", e

    def prepare(self, line: int, key: str, parsed: Record | LineError) -> Job:
        try:
            if isinstance(parsed, LineError):
                raise parsed
            ids, params, n = self._parse(dict(parsed))
        except (LineError, SamplingParamsError, APIError, TypeError) as e:
            return Job(line, error={"line": line, "error": getattr(e, "message", str(e))})
        requests = [
            GenerationRequest(f"line{line}-{uuid.uuid4().hex[:8]}-{i}", ids, _choice_params(params, i))
            for i in range(n)
        ]
        return Job(line, requests, lambda choices: _simple_line(line, len(ids), choices))

    def _parse(self, record: Record) -> tuple[list[int], SamplingParams, int]:
        unknown = set(record) - SIMPLE_FIELDS
        if unknown:
            raise LineError("invalid_line", f"unknown field(s) {sorted(unknown)}")
        if ("prompt" in record) == ("messages" in record):
            raise LineError("invalid_line", 'needs exactly one of "prompt" or "messages"')
        ids = self._prompt_ids(record.pop("prompt", None) or record.pop("messages", None))
        n = record.pop("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
            raise LineError("invalid_line", f"n must be an integer in [1, 128], got {n!r}")
        params = dataclasses.replace(self.defaults, **_sampling_fields(record))
        self.builder.check_prompt(ids, 1, "prompt")  # generation stops at the context's end
        return ids, params, n

    def _prompt_ids(self, prompt: Any) -> list[int]:
        tokenizer = self.builder.tokenizer
        if isinstance(prompt, str) and prompt:
            return tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            return tokenizer.encode(tokenizer.apply_chat_template(prompt))
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            return list(prompt)
        raise LineError(
            "invalid_line",
            '"prompt" must be a non-empty string or token id list, or "messages" a non-empty list',
        )

    @staticmethod
    def key_of(record: Record) -> str:
        return f"line:{record['line']}"

    @staticmethod
    def failed(record: Record) -> bool:
        return "error" in record


def _sampling_fields(record: Record) -> Record:
    """`SamplingParams` keyword arguments from a line's fields, OpenAI's names mapped onto ours."""
    fields, named = {}, {}
    for name, value in record.items():
        target = _ALIASES.get(name, name)
        if target in fields:
            both = " and ".join(sorted((named[target], name)))
            raise LineError("invalid_line", f"{both} are one setting: give one of them")
        fields[target], named[target] = value, name
    logprobs = fields.get("logprobs")
    if isinstance(logprobs, int) and not isinstance(logprobs, bool):  # OpenAI completions: top-N count
        fields["logprobs"] = True
        fields.setdefault("top_logprobs", logprobs)
    if isinstance(fields.get("stop"), list):
        fields["stop"] = tuple(fields["stop"])
    return fields


def _choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index` of n: its own seed, as the server gives it."""
    if params.seed is None or index == 0:
        return params
    return dataclasses.replace(params, seed=(params.seed + index) % 2**32)


def _simple_choice(prompt_length: int, c: Choice) -> Record:
    out = {
        "generated_text": c.text,
        "prompt_length": prompt_length,
        "generated_length": c.generated_length,
        "finish_reason": c.finish_reason,
        "token_ids": c.token_ids,
        "logprobs": c.logprobs or None,
    }
    if c.top_logprobs:
        out["top_logprobs"] = [[[t, lp] for t, lp in alts] for alts in c.top_logprobs]
    return out


def _simple_line(line: int, prompt_length: int, choices: list[Choice]) -> Record:
    if len(choices) == 1:
        return {"line": line, **_simple_choice(prompt_length, choices[0])}
    return {"line": line, "choices": [_simple_choice(prompt_length, c) for c in choices]}
