"""Renders engine outputs as OpenAI response bodies and stream chunks.

One `Formatter` serves one HTTP request: `chunks(index, out)` turns a `RequestOutput` into the
stream chunks it warrants (none for an output whose text is still held back by a stop string),
`usage_chunk()` ends a stream that asked for `include_usage`, and `response(choices)` builds the whole
body of a non-streamed request from each choice's collected outputs.

A chat request with tools has a `tool_parser` (`fastgen_jax.structured.tools.PARSERS`): its calls
come back as `tool_calls` with `finish_reason: "tool_calls"`. Streamed, the text that may be a call is
held back (all of it under the "json" parser, from `<tool_call>` on under "hermes") and the calls go
out at the end as OpenAI sends them: a delta with each call's id, type and name, then its arguments.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from fastgen_jax.output_processor import RequestOutput
from fastgen_jax.reasoning import ReasoningSplitter, ThinkTags
from fastgen_jax.structured import tools as tool_calls
from fastgen_jax.tokenizer import Tokenizer


@dataclasses.dataclass
class Choice:
    """A whole choice, gathered from its outputs (non-streamed responses)."""

    text_parts: list[str] = dataclasses.field(default_factory=list)  # joined once, at the end
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    generated_length: int = 0
    num_cached_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        self.text_parts.append(out.new_text)
        self.token_ids += out.new_token_ids
        self.logprobs += out.new_logprobs or []
        self.top_logprobs += out.new_top_logprobs or []
        self.generated_length = out.generated_length
        self.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            self.finish_reason = out.finish_reason

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


class Formatter:
    """Common parts: ids, usage, per-token log-probability entries."""

    object_name = ""
    chunk_object_name = ""

    def __init__(
        self,
        request_id: str,
        model: str,
        tokenizer: Tokenizer,
        prompt_lengths: list[int],
        n: int,
        logprobs: bool,
    ):
        self.request_id, self.model, self.tokenizer = request_id, model, tokenizer
        self.prompt_lengths, self.n, self.want_logprobs = prompt_lengths, n, logprobs
        self.created = int(time.time())
        self.generated = {}  # choice index -> tokens generated so far
        self.cached = {}  # choice index -> its prompt tokens served from the prefix cache

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def usage(self) -> dict[str, Any]:
        """OpenAI's usage. Like prompt_tokens, cached_tokens counts each prompt once, however many
        choices it has: the tokens of it that were served from the prefix cache rather than computed
        (its least cached choice; the others share the pages that choice computed)."""
        prompt = sum(self.prompt_lengths)
        completion = sum(self.generated.values())
        choices = range(self.n)
        cached = sum(
            min(self.cached.get(p * self.n + i, 0) for i in choices) for p in range(len(self.prompt_lengths))
        )
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._envelope(self.chunk_object_name, []), "usage": self.usage()}

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def chunks(self, index: int, out: RequestOutput) -> list[dict[str, Any]]:
        self.generated[index] = out.generated_length
        self.cached[index] = out.num_cached_tokens
        return self._chunks(index, out)

    def _chunks(self, index: int, out: RequestOutput) -> list[dict[str, Any]]:
        raise NotImplementedError

    def response(self, choices: list[Choice]) -> dict[str, Any]:
        for i, c in enumerate(choices):
            self.generated[i] = c.generated_length
            self.cached[i] = c.num_cached_tokens
        return {**self._envelope(self.object_name, self._choices(choices)), "usage": self.usage()}

    def _choices(self, choices: list[Choice]) -> list[dict[str, Any]]:
        raise NotImplementedError


class CompletionFormatter(Formatter):
    object_name = chunk_object_name = "text_completion"

    def __init__(self, *args, echo_texts: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.echo_texts = echo_texts  # one per prompt, when `echo` is set
        self.text_offsets: dict[int, int] = {}

    def _echo(self, index: int) -> str:
        return self.echo_texts[index // self.n] if self.echo_texts else ""

    def _logprobs(
        self, index: int, token_ids: list[int], logprobs: list[float], top: list | None
    ) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        tokens = [self._token(t) for t in token_ids]
        top_logprobs = [{self._token(t): lp for t, lp in alts} for alts in top] if top else None
        offsets, at = [], self.text_offsets.get(index, len(self._echo(index)))
        for tok in tokens:
            offsets.append(at)
            at += len(tok)
        self.text_offsets[index] = at
        return {
            "tokens": tokens,
            "token_logprobs": logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }

    def _chunks(self, index: int, out: RequestOutput) -> list[dict[str, Any]]:
        first = index not in self.text_offsets
        text = (self._echo(index) if first else "") + out.new_text
        logprobs = self._logprobs(index, out.new_token_ids, out.new_logprobs or [], out.new_top_logprobs)
        if not (text or out.finished or (logprobs and out.new_token_ids)):
            return []
        self.text_offsets.setdefault(index, len(self._echo(index)))
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason}
        return [self._envelope(self.chunk_object_name, [choice])]

    def _choices(self, choices: list[Choice]) -> list[dict[str, Any]]:
        return [
            {
                "index": i,
                "text": self._echo(i) + c.text,
                "logprobs": self._logprobs(i, c.token_ids, c.logprobs, c.top_logprobs),
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(choices)
        ]


class ChatFormatter(Formatter):
    """Chat bodies and chunks. With `reasoning` tags (a thinking model), each choice's text is split
    into `reasoning_content` and `content` (`fastgen_jax.reasoning`); `in_reasoning`: the prompt already
    opened the block."""

    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(
        self,
        *args,
        tool_parser: str | None = None,
        reasoning: ThinkTags | None = None,
        in_reasoning: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.started: set[int] = set()
        self.tool_parser = tool_parser
        self.text: dict[int, str] = {}  # with a tool parser: choice index -> its content so far
        self.sent: dict[int, int] = {}  # and how many characters of it went out as content
        self.reasoning, self.in_reasoning = reasoning, in_reasoning
        self.splitters: dict[int, ReasoningSplitter] = {}  # choice index -> its streamed text's splitter

    def _split_delta(self, index: int, out: RequestOutput) -> tuple[str, str]:
        """(reasoning, content) of a streamed output's new text."""
        if self.reasoning is None:
            return "", out.new_text
        splitter = self.splitters.setdefault(index, ReasoningSplitter(self.reasoning, self.in_reasoning))
        reasoning, content = splitter.feed(out.new_text)
        if out.finished:
            rest_reasoning, rest_content = splitter.finish()
            reasoning, content = reasoning + rest_reasoning, content + rest_content
        return reasoning, content

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        token = self._token(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    def _logprobs(
        self, token_ids: list[int], logprobs: list[float], top: list | None
    ) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        top = top or [[] for _ in token_ids]
        content = [
            {**self._entry(t, lp), "top_logprobs": [self._entry(a, alp) for a, alp in alts]}
            for t, lp, alts in zip(token_ids, logprobs, top, strict=True)
        ]
        return {"content": content}

    def _chunks(self, index: int, out: RequestOutput) -> list[dict[str, Any]]:
        chunks = []
        if index not in self.started:
            self.started.add(index)
            role = {
                "index": index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            chunks.append(self._envelope(self.chunk_object_name, [role]))
        logprobs = self._logprobs(out.new_token_ids, out.new_logprobs or [], out.new_top_logprobs)
        reasoning, new_content = self._split_delta(index, out)
        content, calls = new_content, []
        if self.tool_parser is not None:
            content, calls = self._tool_text(index, new_content, out.finished)
        finish_reason = _finish_reason(out.finish_reason, calls)
        if reasoning or content or (out.finished and not calls) or (logprobs and out.new_token_ids):
            delta = {"reasoning_content": reasoning} if reasoning else {}
            if content:
                delta["content"] = content
            reason = None if calls else finish_reason
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            chunks.append(self._envelope(self.chunk_object_name, [choice]))
        if calls:
            chunks += [self._delta_chunk(index, {"tool_calls": d}) for d in _call_deltas(calls)]
            chunks.append(self._delta_chunk(index, {}, finish_reason))
        return chunks

    def _delta_chunk(self, index: int, delta: dict[str, Any], finish_reason: str | None = None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope(self.chunk_object_name, [choice])

    def _tool_text(self, index: int, new: str, finished: bool) -> tuple[str, list[tool_calls.ToolCall]]:
        """(content to send now, the calls once the choice is finished) under the tool parser."""
        text = self.text[index] = self.text.get(index, "") + new
        sent = self.sent.get(index, 0)
        if finished:
            content, calls = tool_calls.PARSERS[self.tool_parser](text)
            if calls:  # the content is what came before the calls, some of it already sent
                end = tool_calls.held_back(text) if self.tool_parser == "hermes" else 0
                self.sent[index] = max(sent, end)
                return text[sent:end], calls
            self.sent[index] = len(text)
            return text[sent:], []
        end = 0 if self.tool_parser == "json" else tool_calls.held_back(text)
        self.sent[index] = max(sent, end)
        return text[sent:end], []

    def _choices(self, choices: list[Choice]) -> list[dict[str, Any]]:
        return [
            {
                "index": i,
                **self._message(c),
                "logprobs": self._logprobs(c.token_ids, c.logprobs, c.top_logprobs),
            }
            for i, c in enumerate(choices)
        ]

    def _message(self, c: Choice) -> dict[str, Any]:
        text, calls, reasoning = c.text, [], None
        if self.reasoning is not None:
            reasoning, text = ReasoningSplitter(self.reasoning, self.in_reasoning).split(text)
        if self.tool_parser is not None:
            text, calls = tool_calls.PARSERS[self.tool_parser](text)
        message = {"role": "assistant", "content": text}
        if self.reasoning is not None:
            message["content"] = text if text or not reasoning else None
            message["reasoning_content"] = reasoning or None
        if calls:
            message["tool_calls"] = [call.to_openai() for call in calls]
        return {"message": message, "finish_reason": _finish_reason(c.finish_reason, calls)}


def _finish_reason(reason: str | None, calls: list) -> str | None:
    """OpenAI's: a choice that ended by itself with calls ended for them."""
    return "tool_calls" if calls and reason == "stop" else reason


def _call_deltas(calls: list[tool_calls.ToolCall]) -> list[list[dict[str, Any]]]:
    """Stream deltas for the calls: per call, one naming it and one carrying its arguments."""
    deltas = []
    for i, call in enumerate(calls):
        function = {"name": call.name, "arguments": ""}
        deltas.append([{"index": i, "id": call.id, "type": "function", "function": function}])
        deltas.append([{"index": i, "function": {"arguments": call.arguments}}])
    return deltas
