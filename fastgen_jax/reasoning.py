"""Reasoning parsers: a thinking model's `<think>...</think>` split from its answer, as vLLM's
reasoning parsers do (the chat message's `reasoning_content` beside its `content`).

`REASONING_PARSERS` names the tag pairs we know; `resolve_reasoning_parser` maps the server's
`--reasoning_parser` (`auto` picks by the model's `model_type`, `none` turns it off) to one.
`ReasoningSplitter` follows one choice's text as it streams: `feed(new_text)` returns the reasoning
and the content that text completes, and `finish()` what was held back when the text ends. Streamed
and whole responses go through the same splitter, so their pieces join to the same two strings.

The rules, for Qwen3's output and its chat template:
- Reasoning starts with `<think>` at the start of the output (whitespace before it is dropped), or
  at once when the prompt already ends with `<think>` (templates that open the block themselves).
- It ends at `</think>`; the whitespace after the tag (Qwen3 writes a blank line) is dropped, and
  the rest is content. Output without a closing tag before it finishes is all reasoning.
- Output that does not start with `<think>` (thinking disabled, where the template closes an empty
  block in the prompt) is all content.
- A tag may arrive split over several pieces: text that could be the start of a tag waits for the
  next piece (or for `finish`), so no piece ever shows part of a tag.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ThinkTags:
    """The strings that open and close a model's reasoning."""

    start: str
    end: str


REASONING_PARSERS = {"qwen3": ThinkTags("<think>", "</think>")}
# model_type -> the parser `--reasoning_parser=auto` picks for it.
AUTO_REASONING_PARSERS = {"qwen3": "qwen3", "qwen3_moe": "qwen3"}
REASONING_PARSER_CHOICES = ("auto", "none", *REASONING_PARSERS)

_START, _REASONING, _AFTER_END, _CONTENT = "start", "reasoning", "after_end", "content"


def resolve_reasoning_parser(name: str, model_type: str) -> ThinkTags | None:
    """The tags that `--reasoning_parser=name` splits on for a model of `model_type` (None: none)."""
    if name == "auto":
        name = AUTO_REASONING_PARSERS.get(model_type, "none")
    if name == "none":
        return None
    if name not in REASONING_PARSERS:
        raise ValueError(
            f"unknown reasoning parser {name!r} (choose from {', '.join(REASONING_PARSER_CHOICES)})"
        )
    return REASONING_PARSERS[name]


def prompt_opens_reasoning(tags: ThinkTags, prompt_tail: str) -> bool:
    """Whether the prompt's last text (decoded) leaves the model inside a reasoning block."""
    return prompt_tail.rstrip().endswith(tags.start)


def _partial_tag_length(text: str, tag: str) -> int:
    """The length of the longest proper prefix of `tag` that `text` ends with."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningSplitter:
    """One choice's text split into reasoning and content as it arrives (see the module docstring)."""

    def __init__(self, tags: ThinkTags, in_reasoning: bool = False):
        self.tags = tags
        self._state = _REASONING if in_reasoning else _START
        self._held = ""  # text that may still turn out to be (part of) a tag

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) completed by `text`, the next piece of the output."""
        pending, self._held = self._held + text, ""
        reasoning, content = [], []
        while pending:
            pending = self._step(pending, reasoning, content)
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """(reasoning, content) held back when the output ends: an unfinished end tag is reasoning,
        an unfinished start tag content, and whitespace after the end tag nothing."""
        held, self._held = self._held, ""
        if self._state == _REASONING:
            return held, ""
        return "", held if self._state == _START else ""

    def split(self, text: str) -> tuple[str, str]:
        """A whole output's (reasoning, content)."""
        reasoning, content = self.feed(text)
        rest_reasoning, rest_content = self.finish()
        return reasoning + rest_reasoning, content + rest_content

    def _step(self, pending: str, reasoning: list[str], content: list[str]) -> str:
        """Consumes the head of `pending` in the current state; returns what is left."""
        if self._state == _START:
            stripped = pending.lstrip()
            if stripped.startswith(self.tags.start):
                self._state = _REASONING
                return stripped[len(self.tags.start) :]
            if not stripped or self.tags.start.startswith(stripped):
                self._held = pending  # whitespace or the start of the tag so far: wait
                return ""
            self._state = _CONTENT
            return pending
        if self._state == _REASONING:
            before, found, after = pending.partition(self.tags.end)
            if found:
                reasoning.append(before)
                self._state = _AFTER_END
                return after
            keep = _partial_tag_length(pending, self.tags.end)
            reasoning.append(pending[: len(pending) - keep])
            self._held = pending[len(pending) - keep :]
            return ""
        if self._state == _AFTER_END:
            stripped = pending.lstrip()
            if stripped:
                self._state = _CONTENT
            return stripped
        content.append(pending)
        return ""
