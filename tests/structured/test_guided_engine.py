"""Structured outputs in the engine, on a tiny random model with SmolLM2's tokenizer: constrained rows
always follow their grammar, unconstrained rows in the same steps are untouched, nothing recompiles."""

import json
import re

import jax.numpy as jnp
import jsonschema
import llguidance.numpy
import numpy as np
import pytest

from fastgen_jax.llm_engine import LLMEngine, RequestError
from fastgen_jax.sampler import apply_token_bitmask
from fastgen_jax.sampling_params import SamplingParams
from fastgen_jax.structured import StructuredOutputs, StructuredOutputsError
from tests.server.conftest import TINY_CONFIG, make_engine

SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3},
        "point": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5}},
            "required": ["x"],
            "additionalProperties": False,
        },
    },
    "required": ["colour", "count", "flags", "point"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tiny_random_dir) -> LLMEngine:
    return make_engine(tiny_random_dir, TINY_CONFIG)


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, tuple]:
    """Runs the requests together; request id -> (text, token ids, finish reason)."""
    for request_id, (ids, params) in requests.items():
        engine.add_request(prompt_token_ids=ids, sampling_params=params, request_id=request_id)
    text, tokens, reasons = {r: "" for r in requests}, {r: [] for r in requests}, {}
    while engine.has_unfinished():
        for out in engine.step():
            text[out.request_id] += out.new_text
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    return {r: (text[r], tokens[r], reasons[r]) for r in requests}


def test_bitmask_unpacks_like_llguidance_reference():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 70)).astype(np.float32)
    mask = rng.integers(-(2**31), 2**31, (3, 3), dtype=np.int64).astype(np.int32)
    mask[1] = -1  # an all-allowed row is exactly no constraint
    expected = logits.copy()
    llguidance.numpy.apply_token_bitmask_inplace_kernel(expected, mask)
    got = np.asarray(apply_token_bitmask(jnp.asarray(logits), jnp.asarray(mask)))
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got[1], logits[1])


def test_constrained_rows_follow_their_grammar_and_leave_the_others_alone(engine):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 4000, 7).tolist() for _ in range(6)]
    free = {
        "greedy": (prompts[0], SamplingParams(max_new_tokens=12)),
        "sampled": (prompts[1], SamplingParams(max_new_tokens=12, temperature=1.0, seed=7)),
    }
    alone = run(engine, free)
    spec_json = StructuredOutputs(json=SCHEMA)
    spec_choice = StructuredOutputs(choice=("alpha", "beta gamma", "δ"))
    spec_regex = StructuredOutputs(regex=r"[0-9]{3}-[a-z]{2,4}")
    hot = dict(temperature=1.0, max_new_tokens=80)
    constrained = {
        f"json{i}": (prompts[2 + i % 4], SamplingParams(**hot, seed=i, structured_outputs=spec_json))
        for i in range(4)
    }
    constrained["choice"] = (prompts[2], SamplingParams(**hot, seed=9, structured_outputs=spec_choice))
    constrained["regex"] = (prompts[3], SamplingParams(**hot, seed=9, structured_outputs=spec_regex))
    mixed = run(engine, {**free, **constrained})
    assert {r: mixed[r] for r in free} == alone
    for i in range(4):
        text, _, reason = mixed[f"json{i}"]
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert mixed["choice"][0] in spec_choice.choice and mixed["choice"][2] == "stop"
    assert re.fullmatch(spec_regex.regex, mixed["regex"][0]) and mixed["regex"][2] == "stop"
    assert engine.stats.compiled_after_warmup == 0
    assert len(engine.guided) == 0  # finished sequences dropped their matchers


def test_a_constrained_request_cut_by_max_tokens_says_length(engine):
    spec = StructuredOutputs(regex="a{50}")
    out = run(engine, {"r": ([5, 6, 7], SamplingParams(max_new_tokens=3, structured_outputs=spec))})
    assert out["r"][2] == "length" and set(out["r"][0]) == {"a"}


@pytest.mark.overlap
def test_a_constrained_request_decodes_every_step_with_overlap_on(engine):
    """While a request has structured outputs the engine runs steps one at a time (its mask needs its
    last token), so it gets a token every step rather than every other one."""
    assert engine.engine_config.async_scheduling
    spec = StructuredOutputs(regex="[ab]{300}")  # longer than 20 tokens can spell
    params = SamplingParams(max_new_tokens=20, structured_outputs=spec)
    engine.add_request(prompt_token_ids=[5, 6, 7], sampling_params=params, request_id="constrained")
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    engine.add_request(prompt_token_ids=[8, 9], sampling_params=params, request_id="free")
    steps, tokens = 0, {"constrained": [], "free": []}
    while engine.has_unfinished():
        steps += 1
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    assert len(tokens["constrained"]) == len(tokens["free"]) == 20 and steps <= 21


@pytest.mark.parametrize(
    "spec, param",
    [
        (dict(regex="a(b", param="guided_regex"), "guided_regex"),
        (dict(grammar="start: missing_rule", param="guided_grammar"), "guided_grammar"),
        (
            dict(json={"type": "object", "properties": {"a": {"type": "strin"}}}, param="guided_json"),
            "guided_json",
        ),
    ],
)
def test_a_constraint_that_does_not_compile_names_its_field(engine, spec, param):
    with pytest.raises(RequestError) as error:
        engine.add_request(
            prompt_token_ids=[5], sampling_params=SamplingParams(structured_outputs=StructuredOutputs(**spec))
        )
    assert error.value.param == param and str(error.value).startswith(param)
    assert not engine.has_unfinished()


def test_an_empty_choice_is_refused():
    with pytest.raises(StructuredOutputsError, match="guided_choice must not be empty"):
        StructuredOutputs(choice=(), param="guided_choice")
    with pytest.raises(StructuredOutputsError, match="exactly one"):
        StructuredOutputs(regex="a", choice=("a",))


def test_compiled_grammars_are_cached_and_bounded(engine, monkeypatch):
    from fastgen_jax.structured import guided

    monkeypatch.setattr(guided, "CACHE_SIZE", 3)
    specs = [StructuredOutputs(regex=f"x{i}") for i in range(5)]
    first = engine.guided.compile(specs[0])
    assert engine.guided.compile(StructuredOutputs(regex="x0")) is first
    for spec in specs[1:]:
        engine.guided.compile(spec)
    assert engine.guided.cache_size == 3
    assert engine.guided.compile(specs[0]) is not first  # evicted, compiled again
