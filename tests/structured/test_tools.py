"""Tool prompts, call constraints and the request fields that constrain output (no engine needed)."""

import json

import jsonschema
import pytest

from fastgen_jax.server.guided_fields import structured_outputs
from fastgen_jax.server.protocol import ChatCompletionRequest
from fastgen_jax.structured import StructuredOutputs, StructuredOutputsError
from fastgen_jax.structured import tools as tool_calls
from fastgen_jax.tokenizer import Tokenizer

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


def test_required_constrains_to_a_call_of_some_tool_and_named_to_that_one():
    tools = tool_calls.parse_tools([ADD, {"type": "function", "function": {"name": "now"}}])
    spec = tool_calls.call_constraint(tools, "required")
    schema = json.loads(spec.json)
    jsonschema.validate({"name": "add", "arguments": {"a": 1, "b": 2}}, schema)
    jsonschema.validate({"name": "now", "arguments": {}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "add", "arguments": {"a": 1}}, schema)
    named = json.loads(tool_calls.call_constraint(tools, "now").json)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "add", "arguments": {"a": 1, "b": 2}}, named)


def test_a_tool_conversation_renders_with_a_template_that_has_no_tools(smollm2_dir):
    tokenizer = Tokenizer.from_hf_dir(smollm2_dir)
    assert not tokenizer.takes_tools
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    messages = [
        {"role": "user", "content": "1 + 2?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    rendered = tool_calls.render_without_template_tools(messages, tool_calls.parse_tools([ADD]), "auto")
    text = tokenizer.apply_chat_template(rendered)
    assert text.startswith("<|im_start|>system\n# Tools\n") and '"name": "add"' in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
        in text
    )
    assert "<|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"response_format": {"type": "json_object"}}, StructuredOutputs(json_object=True)),
        ({"guided_json": '{"type": "integer"}'}, StructuredOutputs(json={"type": "integer"})),
        ({"structured_outputs": {"choice": ["a", "b"]}}, StructuredOutputs(choice=("a", "b"))),
        ({"structured_outputs": {"regex": "x+"}}, StructuredOutputs(regex="x+")),
        ({"guided_grammar": 'start: "x"'}, StructuredOutputs(grammar='start: "x"')),
        ({"response_format": {"type": "text"}}, None),
    ],
)
def test_every_spelling_reads_into_one_constraint(fields, expected):
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)
    assert structured_outputs(body) == expected


def test_a_schema_that_is_not_one_names_its_field():
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], guided_json={"type": "nope"})
    with pytest.raises(StructuredOutputsError) as error:
        structured_outputs(body)
    assert error.value.param == "guided_json" and "not a valid JSON schema" in str(error.value)
