"""OpenAI function tools: checking them, showing them to the model, constraining and parsing its calls.

- `parse_tools` / `parse_tool_choice` check the request's `tools` and `tool_choice`.
- A chat template that takes `tools` renders them itself; for one that does not (SmolLM2's),
  `render_without_template_tools` writes them into a system-prompt section in the Hermes format
  (`<tools>` signatures, calls as `<tool_call>{"name", "arguments"}</tool_call>`) and turns the
  conversation's earlier calls and `tool` results into text the template can print.
- With `tool_choice` "required" or a named function, `call_constraint` limits the output to one
  JSON call `{"name": ..., "arguments": {...}}` whose arguments match that function's schema, so
  they always parse; the "json" parser reads it. With "auto", the "hermes" parser finds
  `<tool_call>` blocks in free text. `PARSERS` is the registry.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastgen_jax.structured.params import StructuredOutputs, StructuredOutputsError, check_json_schema

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's rule for function names


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: Mapping[str, Any]

    def signature(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def parse_tools(tools: Sequence[Any]) -> list[Tool]:
    """The request's `tools`; StructuredOutputsError names the bad one."""
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise StructuredOutputsError(f"{where} must be a function tool", "tools")
        function = tool.get("function")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise StructuredOutputsError(f"{where}.function must be an object with a name", "tools")
        name = function["name"]
        if not _NAME.match(name):
            raise StructuredOutputsError(f"{where}.function.name must match {_NAME.pattern}", "tools")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        check_json_schema(parameters, "tools")
        if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
            raise StructuredOutputsError(f"{where}.function.parameters must be an object schema", "tools")
        out.append(Tool(name, str(function.get("description") or ""), parameters))
    if len({t.name for t in out}) != len(out):
        raise StructuredOutputsError("tools must have distinct names", "tools")
    return out


def parse_tool_choice(choice: Any, tools: Sequence[Tool]) -> str:
    """ "none" | "auto" | "required" | the name of the one function the model must call."""
    if choice is None:
        return "auto" if tools else "none"
    if choice in ("none", "auto", "required"):
        if choice != "none" and not tools:
            raise StructuredOutputsError(f"tool_choice {choice!r} needs tools", "tool_choice")
        return choice
    name = choice.get("function", {}).get("name") if isinstance(choice, Mapping) else None
    if not isinstance(name, str) or (isinstance(choice, Mapping) and choice.get("type") != "function"):
        raise StructuredOutputsError(
            'tool_choice must be "none", "auto", "required" or '
            '{"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    if name not in {t.name for t in tools}:
        raise StructuredOutputsError(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
    return name


def call_constraint(tools: Sequence[Tool], choice: str) -> StructuredOutputs:
    """One call of the chosen function (or, for "required", of any), arguments matching its schema."""
    chosen = [t for t in tools if choice == "required" or t.name == choice]
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": dict(t.parameters)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return StructuredOutputs(json=schema, param="tools")


def tools_system_prompt(tools: Sequence[Tool], choice: str) -> str:
    signatures = "\n".join(json.dumps(t.signature()) for t in tools)
    if choice in ("auto", "required"):
        how = "You may call one or more of these functions to help with the user's request."
    else:
        how = f"Call the function {choice}."
    return (
        f"# Tools\n\n{how} The function signatures are within <tools></tools> XML tags:\n"
        f"<tools>\n{signatures}\n</tools>\n\n"
        "For a function call, return a JSON object with the function name and arguments within "
        "<tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def render_without_template_tools(
    messages: list[dict[str, Any]], tools: Sequence[Tool], choice: str
) -> list[dict[str, Any]]:
    """Messages for a template that knows nothing of tools: the tools in the system prompt, earlier
    calls as `<tool_call>` text, tool results as a user turn in `<tool_response>` tags."""
    out = [_plain_message(m) for m in messages]
    if tools and choice != "none":
        section = tools_system_prompt(tools, choice)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{section}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


def _plain_message(message: dict[str, Any]) -> dict[str, Any]:
    role, content = message.get("role"), message.get("content")
    if role == "assistant" and message.get("tool_calls"):
        calls = [_call_text(c) for c in message["tool_calls"]]
        return {"role": "assistant", "content": "\n".join([content or "", *calls]).strip()}
    if role in ("tool", "function"):
        return {"role": "user", "content": f"<tool_response>\n{content or ''}\n</tool_response>"}
    return {**message, "content": content or ""}


def _call_text(call: Any) -> str:
    function = call.get("function", {}) if isinstance(call, Mapping) else {}
    arguments = function.get("arguments", "{}")
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        pass  # shown to the model as the client sent it
    body = json.dumps({"name": function.get("name"), "arguments": arguments})
    return f"{TOOL_CALL_START}\n{body}\n{TOOL_CALL_END}"


# ---------------------------------------------------------------------- parsers: text -> calls


def _call_from_json(text: str) -> ToolCall | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    return ToolCall(value["name"], json.dumps(arguments))


def parse_json_call(text: str) -> tuple[str | None, list[ToolCall]]:
    """The whole output is one call (tool_choice "required" or named)."""
    call = _call_from_json(text.strip())
    return (None, [call]) if call else (text, [])


_HERMES = re.compile(re.escape(TOOL_CALL_START) + r"\s*(.*?)\s*(?:" + re.escape(TOOL_CALL_END) + r"|$)", re.S)


def parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    """`<tool_call>{json}</tool_call>` blocks anywhere in the text; the rest is the content."""
    start = text.find(TOOL_CALL_START)
    if start < 0:
        return text, []
    calls = [c for c in (_call_from_json(m.group(1)) for m in _HERMES.finditer(text, start)) if c]
    if not calls:
        return text, []
    content = text[:start].strip()
    return content or None, calls


PARSERS: dict[str, Callable[[str], tuple[str | None, list[ToolCall]]]] = {
    "json": parse_json_call,
    "hermes": parse_hermes,
}


def held_back(text: str) -> int:
    """Where streamed content must stop for now under the "hermes" parser: at a `<tool_call>`, or
    before a tail that could still grow into one."""
    start = text.find(TOOL_CALL_START)
    if start >= 0:
        return start
    for size in range(min(len(TOOL_CALL_START) - 1, len(text)), 0, -1):
        if TOOL_CALL_START.startswith(text[-size:]):
            return len(text) - size
    return len(text)
