"""SmolLM2-135M-Instruct behind the server, driven by the official `openai` package and our client."""

import json
from typing import Literal

import httpx
import openai
import pydantic
import pytest

import fastgen_jax
from fastgen_jax.http_client import ClientError
from fastgen_jax.offline import run_to_completion
from fastgen_jax.sampling_params import SamplingParams
from tests.server.conftest import SMOLLM2_CONFIG, make_engine, serving

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2_dir):
    engine = make_engine(smollm2_dir, SMOLLM2_CONFIG)
    with serving(engine, model_name="smollm2") as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0) as c:
        yield c


def chat(client, **kw):
    kw.setdefault("messages", FRANCE)
    return client.chat.completions.create(model="smollm2", temperature=0, **kw)


def test_models_lists_the_served_model(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2"]
    assert client.models.retrieve("smollm2").id == "smollm2"


def test_chat_answers_and_counts_usage(client, server):
    r = chat(client, max_tokens=20)
    assert r.choices[0].message.content == "The capital of France is Paris."
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.role == "assistant"
    url, engine = server
    prompt_ids = engine.tokenizer.encode_chat(FRANCE)
    generated = engine.tokenizer.encode(r.choices[0].message.content, add_special_tokens=False)
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(generated) + 1  # + <|im_end|>
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    tokenized = httpx.post(f"{url}/tokenize", json={"messages": FRANCE}).json()
    assert tokenized["tokens"] == prompt_ids


def test_streamed_chat_equals_the_whole_response(client):
    whole = chat(client, max_tokens=40).choices[0].message.content
    stream = chat(client, max_tokens=40, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_completion_equals_the_offline_engine(client, server, smollm2_dir):
    prompts = ["The three primary colours are", "def fibonacci(n):", "Once upon a time"]
    r = client.completions.create(model="smollm2", prompt=prompts, temperature=0, max_tokens=24)
    engine = make_engine(smollm2_dir, SMOLLM2_CONFIG)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=24)) for p in prompts]
    offline = run_to_completion(engine, ids, progress=False)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [offline[i].generated_text for i in ids]
    assert [c.finish_reason for c in r.choices] == [offline[i].finish_reason for i in ids]


def test_stop_strings_cut_the_text_streamed_or_not(client):
    for stop in ([" is"], ["of France"], ["zzz", "Paris"]):
        whole = chat(client, max_tokens=20, stop=stop).choices[0]
        streamed = "".join(
            c.choices[0].delta.content or "" for c in chat(client, max_tokens=20, stop=stop, stream=True)
        )
        expected = "The capital of France is Paris.".split(stop[-1])[0]
        assert whole.message.content == streamed == expected
        assert whole.finish_reason == "stop"


def test_max_tokens_ends_with_length(client):
    r = client.completions.create(model="smollm2", prompt="Count: 1, 2, 3,", max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_seed_reproduces_sampled_text_and_n_gives_distinct_choices(client):
    def sample(seed, n=1):
        r = client.completions.create(
            model="smollm2",
            prompt="Write a word:",
            max_tokens=16,
            temperature=1.0,
            top_p=0.95,
            seed=seed,
            n=n,
        )
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    three = sample(7, n=3)
    assert three[0] == sample(7)[0] and len(set(three)) == 3


def test_logprobs_are_the_sampled_tokens(client):
    r = chat(client, max_tokens=10, logprobs=True)
    content = r.choices[0].logprobs.content
    # every generated token has an entry, the closing <|im_end|> (counted in usage) included
    assert "".join(t.token for t in content) == r.choices[0].message.content + "<|im_end|>"
    assert len(content) == r.usage.completion_tokens
    assert all(t.logprob <= 0 for t in content) and content[0].logprob > -5
    c = client.completions.create(model="smollm2", prompt="Hello", max_tokens=4, temperature=0, logprobs=0)
    assert len(c.choices[0].logprobs.tokens) == 4 == len(c.choices[0].logprobs.token_logprobs)


def test_top_logprobs_rank_alternatives_with_the_greedy_token_first(client):
    r = chat(client, max_tokens=6, logprobs=True, top_logprobs=3)
    for entry in r.choices[0].logprobs.content:
        alternatives = entry.top_logprobs
        assert len(alternatives) == 3
        assert alternatives[0].token == entry.token and alternatives[0].logprob == pytest.approx(
            entry.logprob
        )
        assert alternatives[0].logprob >= alternatives[1].logprob >= alternatives[2].logprob
    streamed = chat(client, max_tokens=6, logprobs=True, top_logprobs=3, stream=True)
    entries = [
        e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [e.top_logprobs[1].token for e in entries] == [
        e.top_logprobs[1].token for e in r.choices[0].logprobs.content
    ]
    c = client.completions.create(model="smollm2", prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
    tops = c.choices[0].logprobs.top_logprobs
    assert len(tops) == 3 and all(len(t) == 2 for t in tops)
    assert [max(t, key=t.get) for t in tops] == c.choices[0].logprobs.tokens


def test_extensions_top_k_min_tokens_ignore_eos(client):
    r = chat(client, max_tokens=12, extra_body={"min_tokens": 12, "ignore_eos": True, "top_k": 1})
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"


def test_detokenize_inverts_tokenize(server):
    url, _ = server
    ids = httpx.post(f"{url}/tokenize", json={"prompt": "Hello, world!"}).json()["tokens"]
    assert httpx.post(f"{url}/detokenize", json={"tokens": ids}).json()["prompt"] == "Hello, world!"


def test_mii_style_client_generates_and_streams(client, server):
    url, _ = server
    c = fastgen_jax.client(url)
    prompts = ["The capital of Italy is", "Water boils at"]
    responses = c.generate(prompts, max_new_tokens=8)
    expected = client.completions.create(model="smollm2", prompt=prompts, temperature=0, max_tokens=8)
    assert [r.generated_text for r in responses] == [ch.text for ch in expected.choices]
    assert [r.generated_length for r in responses] == [8, 8]
    assert responses[0].prompt_length == len(c.tokenize(prompts[0]))
    pieces = []
    streamed = c.generate(
        prompts[0], max_new_tokens=8, streaming_fn=lambda r: pieces.append(r.generated_text)
    )
    assert "".join(pieces) == streamed[0].generated_text == responses[0].generated_text
    assert streamed[0].generated_length == 8 and len(pieces) > 1
    with pytest.raises(ClientError, match="max_tokens") as error:
        c.generate("x", max_new_tokens=0)
    assert error.value.status == 400


# -- prefix caching ---------------------------------------------------------------------------------

SYSTEM = (
    "You are a meticulous assistant for a travel agency. Answer in one short sentence. Always name "
    "the country first, then the city, and never invent facts you are unsure about. "
) * 4


def ask(client, question, **kw):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return client.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=12, **kw
    )


def test_cached_tokens_report_what_the_engine_skipped_and_change_nothing_else(client, server):
    url, engine = server
    assert httpx.post(f"{url}/reset_prefix_cache").json()["status"] == "ok"
    cold = ask(client, "Where is Lyon?", extra_body={"cache_salt": "cold-run"})
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    for question in ("Where is Lyon?", "Where is Kyoto?"):
        computed, hits = engine.stats.prompt_tokens, engine.stats.prefix_cache_hits
        r = ask(client, question)
        cached = r.usage.prompt_tokens_details.cached_tokens
        assert cached == engine.stats.prefix_cache_hits - hits
        assert r.usage.prompt_tokens - cached == engine.stats.prompt_tokens - computed
        if question == "Where is Lyon?":
            assert cached == 0  # the salted run's pages are not shared with unsalted requests
            assert r.choices[0].message.content == cold.choices[0].message.content
        else:  # the system prompt's full pages were computed by the request before
            assert cached >= 100 and cached % engine.engine_config.page_size == 0


def test_n_choices_count_the_cached_tokens_of_their_prompt_once(client, server):
    url, _ = server
    httpx.post(f"{url}/reset_prefix_cache")
    prompt = SYSTEM + "Name three rivers."
    first = client.completions.create(model="smollm2", prompt=prompt, max_tokens=4, n=3, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # nothing was cached before it
    assert len({c.text for c in first.choices}) == 1
    again = client.completions.create(model="smollm2", prompt=prompt, max_tokens=4, n=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= 100
    assert [c.text for c in again.choices] == [first.choices[0].text] * 2


def test_streamed_usage_has_cached_tokens_and_metrics_count_the_cache(client, server):
    url, _ = server
    ask(client, "Where is Porto?")
    chunks = list(ask(client, "Where is Porto?", stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 100
    text = httpx.get(f"{url}/metrics").text
    for name in (
        "fastgen_prefix_cache_queries_total",
        "fastgen_prefix_cache_hits_total",
        "fastgen_kv_pages_cached",
    ):
        assert f"\n{name} " in text
    forgotten = httpx.post(f"{url}/reset_prefix_cache").json()["pages_forgotten"]
    assert forgotten > 0 and "\nfastgen_kv_pages_cached 0.0" in httpx.get(f"{url}/metrics").text


class Pet(pydantic.BaseModel):
    kind: Literal["cat", "dog", "fish"]
    age: int = pydantic.Field(ge=0, le=30)
    name: str = pydantic.Field(max_length=16)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
        },
    },
}


def test_parse_and_a_named_tool_call_round_trip(client):
    r = client.chat.completions.parse(
        model="smollm2",
        messages=[{"role": "user", "content": "Invent a pet with a kind, an age and a name."}],
        response_format=Pet,
        temperature=0,
        max_tokens=60,
    )
    assert isinstance(r.choices[0].message.parsed, Pet)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = chat(client, messages=messages, tools=[WEATHER_TOOL], tool_choice=named, max_tokens=60)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city"}
    messages += [
        r.choices[0].message.model_dump(),
        {"role": "tool", "tool_call_id": call.id, "content": "21 C"},
    ]
    answer = chat(client, messages=messages, tools=[WEATHER_TOOL], max_tokens=40)
    assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop", "length")
