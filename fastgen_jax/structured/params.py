"""What a request constrains its output to, and the llguidance grammar that says it.

Exactly one kind per request, as in vLLM's `StructuredOutputsParams`: `json` (a JSON schema),
`json_object` (any JSON object), `regex`, `choice` (one of some strings) or `grammar` (Lark, as
llguidance takes it; GBNF is converted). The schema is kept as compact JSON text so that equal
constraints hash equal and share one compiled grammar.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import llguidance
from llguidance.gbnf_to_lark import gbnf_to_lark

MAX_CHOICES = 256
MAX_SPEC_CHARS = 1 << 16  # characters in a schema, regex or grammar
# Compact JSON: with flexible whitespace a sampled model can pad its output with blanks until
# max_tokens runs out; separators without spaces leave it nothing to wander into.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_KINDS = ("json", "json_object", "regex", "choice", "grammar")


class StructuredOutputsError(ValueError):
    """A constraint that cannot be compiled; `param` names the request field it came from."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class StructuredOutputs:
    """One constraint on a request's output (set exactly one field). `param` is the request field
    it came from, for error messages (it takes no part in equality)."""

    json: str | None = None  # a JSON schema, as canonical JSON text (a dict is converted)
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    param: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if self.json is not None and not isinstance(self.json, str):
            object.__setattr__(self, "json", canonical_json(self.json))
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        kinds = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise StructuredOutputsError(f"set exactly one of {', '.join(_KINDS)}; got {kinds}", self.param)
        self._check()

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def _check(self) -> None:
        if self.choice is not None:
            if not self.choice:
                raise StructuredOutputsError(f"{self.param or 'choice'} must not be empty", self.param)
            if len(self.choice) > MAX_CHOICES or not all(isinstance(c, str) and c for c in self.choice):
                raise StructuredOutputsError(
                    f"{self.param or 'choice'} must hold 1 to {MAX_CHOICES} non-empty strings", self.param
                )
        for name in ("json", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or len(value) > MAX_SPEC_CHARS):
                raise StructuredOutputsError(
                    f"{self.param or name} must be a non-empty string of at most {MAX_SPEC_CHARS} characters",
                    self.param,
                )

    def to_grammar(self) -> str:
        """The llguidance grammar (its JSON form); compiling it (`GuidedDecoder`) finds the errors."""
        kind = self.kind
        if kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(self.json, defaults=JSON_OPTIONS)
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.regex)
        if kind == "choice":  # Lark string literals are JSON strings
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(map(json.dumps, self.choice))
            )
        text = gbnf_to_lark(self.grammar) if "::=" in self.grammar else self.grammar
        return llguidance.LLMatcher.grammar_from_lark(text)


def canonical_json(value: Any) -> str:
    """Compact JSON text. Keys keep their order: a schema's property order is the output's."""
    return json.dumps(value, separators=(",", ":"))


def check_json_schema(schema: Any, param: str) -> None:
    """Raises StructuredOutputsError(param) unless `schema` is a valid JSON schema (a dict or bool)."""
    import jsonschema

    if not isinstance(schema, dict | bool):
        raise StructuredOutputsError(f"{param} must be a JSON schema (an object)", param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as error:
        raise StructuredOutputsError(f"{param} is not a valid JSON schema: {error.message}", param) from None
