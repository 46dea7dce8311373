"""The request fields that constrain output, read into one `StructuredOutputs` (or None).

OpenAI's `response_format` ({"type": "json_object"} or {"type": "json_schema", "json_schema":
{"name", "schema", "strict"}}), vLLM's older extensions `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar` and its current `structured_outputs` object ({json, regex,
choice, grammar, json_object}). A request may use one of them; errors name the field.
"""

from __future__ import annotations

import json
from typing import Any

from fastgen_jax.structured.params import StructuredOutputs, StructuredOutputsError, check_json_schema

_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
_STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def structured_outputs(body: Any) -> StructuredOutputs | None:
    """The body's constraint; StructuredOutputsError when it is malformed or set twice."""
    found = [
        spec
        for spec in (
            _from_response_format(getattr(body, "response_format", None)),
            *(_from_guided(name, getattr(body, name, None)) for name in _GUIDED),
            _from_structured(getattr(body, "structured_outputs", None)),
        )
        if spec is not None
    ]
    if len(found) > 1:
        fields = ", ".join(s.param for s in found)
        raise StructuredOutputsError(
            f"set one way of constraining the output, not several ({fields})", found[1].param
        )
    return found[0] if found else None


def _from_response_format(fmt: dict[str, Any] | None) -> StructuredOutputs | None:
    param = "response_format"
    kind = (fmt or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs(json_object=True, param=param)
    if kind != "json_schema":
        raise StructuredOutputsError(
            f"response_format.type must be text, json_object or json_schema, got {kind!r}", param
        )
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise StructuredOutputsError("response_format.json_schema must be an object with a schema", param)
    check_json_schema(spec["schema"], param)
    return StructuredOutputs(json=spec["schema"], param=param)


def _from_guided(name: str, value: Any) -> StructuredOutputs | None:
    if value is None:
        return None
    if name == "guided_json":
        return _json_spec(value, name)
    if name == "guided_choice":
        return StructuredOutputs(choice=tuple(value), param=name)
    key = name.removeprefix("guided_")
    return StructuredOutputs(**{key: value}, param=name)


def _from_structured(value: dict[str, Any] | None) -> StructuredOutputs | None:
    param = "structured_outputs"
    if not value:
        return None
    set_keys = {k: v for k, v in value.items() if k in _STRUCTURED_KEYS and v not in (None, False)}
    if len(set_keys) != 1:
        keys = ", ".join(_STRUCTURED_KEYS)
        raise StructuredOutputsError(f"structured_outputs must set exactly one of {keys}", param)
    ((key, spec),) = set_keys.items()
    if key == "json":
        return _json_spec(spec, param)
    if key == "choice":
        if not isinstance(spec, list):
            raise StructuredOutputsError("structured_outputs.choice must be a list of strings", param)
        spec = tuple(spec)
    return StructuredOutputs(**{key: spec}, param=param)


def _json_spec(value: Any, param: str) -> StructuredOutputs:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise StructuredOutputsError(f"{param} is not valid JSON: {error}", param) from None
    check_json_schema(value, param)
    return StructuredOutputs(json=value, param=param)
