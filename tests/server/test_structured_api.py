"""Structured outputs and tool calls over HTTP, through the official `openai` client, on a tiny random
model: whatever gibberish the weights prefer, the grammar decides the shape of the answer."""

import dataclasses
import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.server.conftest import TINY_CONFIG, make_engine, serving

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
CONFIG = dataclasses.replace(TINY_CONFIG, max_model_len=1024)  # room for the tools' system prompt
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Pet(pydantic.BaseModel):
    kind: Literal["cat", "dog", "fish"]
    age: int = pydantic.Field(ge=0, le=30)
    name: str = pydantic.Field(max_length=10)


@pytest.fixture(scope="module")
def server(tiny_random_dir):
    engine = make_engine(tiny_random_dir, CONFIG)
    with serving(engine, model_name="tiny") as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_parse_with_a_pydantic_model_returns_the_parsed_object(client):
    r = client.chat.completions.parse(
        model="tiny", messages=ASK, response_format=Pet, temperature=1.0, seed=3, max_tokens=120
    )
    assert r.choices[0].finish_reason == "stop"
    pet = r.choices[0].message.parsed
    assert isinstance(pet, Pet) and pet == Pet.model_validate_json(r.choices[0].message.content)


def test_guided_choice_regex_and_json_over_completions(server):
    url, engine = server
    schema = {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "maxItems": 4}
    cases = [
        ({"guided_choice": ["yes", "no", "maybe"]}, lambda t: t in ("yes", "no", "maybe")),
        (
            {"guided_regex": r"[A-Z][a-z]{1,5} [0-9]{2}"},
            lambda t: re.fullmatch(r"[A-Z][a-z]{1,5} [0-9]{2}", t),
        ),
        ({"structured_outputs": {"regex": "(ab)+c"}}, lambda t: re.fullmatch("(ab)+c", t)),
        ({"guided_json": schema}, lambda t: jsonschema.validate(json.loads(t), schema) is None),
    ]
    for fields, check in cases:
        body = {"prompt": "Hello", "max_tokens": 120, "temperature": 1.0, "n": 4, "seed": 5, **fields}
        choices = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"]
        for c in choices:
            if c["finish_reason"] == "stop":
                assert check(c["text"]), (fields, c["text"])
        assert sum(c["finish_reason"] == "stop" for c in choices) >= 3, (fields, choices)
    # Any object: a random model's keys run on until max_tokens, but they run on inside an object.
    body = {"prompt": "Hi", "max_tokens": 8, "response_format": {"type": "json_object"}, "temperature": 1.0}
    text = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    assert text.startswith("{")
    assert engine.stats.compiled_after_warmup == 0


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_a_tool_call_round_trip(client, stream, tool_choice):
    kw = dict(model="tiny", tools=[WEATHER, TIME], temperature=1.0, seed=1, max_tokens=100)
    call = _ask(client, stream, messages=ASK, tool_choice=tool_choice, **kw)
    assert call["finish_reason"] == "tool_calls" and call["content"] is None
    (tool_call,) = call["tool_calls"]
    assert tool_call["id"].startswith("call_") and tool_call["type"] == "function"
    function = tool_call["function"]
    tool = {"get_weather": WEATHER, "get_time": TIME}[function["name"]]
    if isinstance(tool_choice, dict):
        assert function["name"] == "get_time"
    jsonschema.validate(json.loads(function["arguments"]), tool["function"]["parameters"])
    follow_up = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [tool_call]},
        {"role": "tool", "tool_call_id": tool_call["id"], "content": '{"temperature": 21}'},
    ]
    answer = _ask(client, stream, messages=follow_up, tool_choice="auto", **kw)
    assert answer["finish_reason"] in ("stop", "length", "tool_calls")
    assert answer["content"] or answer["tool_calls"]


def _ask(client, stream: bool, **kw) -> dict:
    """One choice as {content, tool_calls, finish_reason}, from a whole response or a stream."""
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        calls = [c.model_dump() for c in choice.message.tool_calls or []]
        return {"content": choice.message.content, "tool_calls": calls, "finish_reason": choice.finish_reason}
    content, calls, finish = None, {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        delta = chunk.choices[0].delta
        if delta.content:
            content = (content or "") + delta.content
        for d in delta.tool_calls or []:
            call = calls.setdefault(
                d.index, {"id": None, "type": None, "function": {"name": "", "arguments": ""}}
            )
            call["id"], call["type"] = d.id or call["id"], d.type or call["type"]
            call["function"]["name"] += d.function.name or ""
            call["function"]["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return {"content": content, "tool_calls": [calls[i] for i in sorted(calls)], "finish_reason": finish}


def test_hermes_tool_calls_in_free_text_are_parsed():
    from fastgen_jax.structured.tools import held_back, parse_hermes

    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = parse_hermes(text)
    assert content == "Let me check." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert parse_hermes("no calls here") == ("no calls here", [])
    assert held_back("Sure <tool_") == len("Sure ") and held_back("Sure <b>") == len("Sure <b>")


@pytest.mark.parametrize(
    "fields, param",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
            "response_format",
        ),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a(b"}, "guided_regex"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_grammar": "start: nowhere"}, "guided_grammar"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
            "tools",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "missing"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_bad_constraints_are_a_400_naming_the_field(server, fields, param):
    body = {"messages": ASK, "max_tokens": 4, **fields}
    r = httpx.post(f"{server[0]}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
