"""Bad requests get OpenAI-style JSON errors with the right status and the field named; nothing else
is disturbed: a stream running meanwhile completes with the same text, and the server keeps serving."""

import json
import re
import threading
import time

import httpx
import pytest

from tests.server.conftest import TINY_CONFIG, make_engine, metric, serving

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 4096


@pytest.fixture(scope="module")
def server(tiny_random_dir):
    engine = make_engine(tiny_random_dir, TINY_CONFIG)
    with serving(engine, api_key=KEY, max_request_bytes=LIMIT) as url:
        yield url, engine


def completion(**fields):
    return {"model": "tiny", "prompt": "the quick brown fox", "max_tokens": 4, **fields}


def chat(**fields):
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}


LONG_PROMPT = "the " * 300  # 300 tokens; the context holds 256

# (name, path, body (dict, or raw bytes), expected status, field the error must name)
BAD_REQUESTS = [
    ("malformed JSON", "/v1/completions", b'{"prompt": "x",', 400, None),
    ("body not an object", "/v1/completions", b"[1, 2]", 400, None),
    ("max_tokens wrong type", "/v1/completions", completion(max_tokens="ten"), 400, "max_tokens"),
    ("temperature wrong type", "/v1/completions", completion(temperature="hot"), 400, "temperature"),
    ("prompt wrong type", "/v1/completions", completion(prompt={"text": "x"}), 400, "prompt"),
    ("messages not a list", "/v1/chat/completions", chat(messages="hi"), 400, "messages"),
    ("message without role", "/v1/chat/completions", chat(messages=[{"content": "hi"}]), 400, "messages"),
    ("stream wrong type", "/v1/completions", completion(stream="yes please"), 400, "stream"),
    ("missing prompt", "/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("unknown model", "/v1/completions", completion(model="gpt-17"), 404, "model"),
    ("unknown model (chat)", "/v1/chat/completions", chat(model="gpt-17"), 404, "model"),
    ("empty prompt", "/v1/completions", completion(prompt=""), 400, "prompt"),
    ("empty prompt list", "/v1/completions", completion(prompt=[]), 400, "prompt"),
    ("an empty prompt in a list", "/v1/completions", completion(prompt=["x", ""]), 400, "prompt"),
    ("an empty token-id prompt in a list", "/v1/completions", completion(prompt=[[5, 6], []]), 400, "prompt"),
    ("empty messages", "/v1/chat/completions", chat(messages=[]), 400, "messages"),
    ("prompt longer than the context", "/v1/completions", completion(prompt=LONG_PROMPT), 400, "prompt"),
    ("chat longer than the context", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": LONG_PROMPT}]), 400, "messages"),
    ("token ids outside the vocabulary", "/v1/completions", completion(prompt=[5, 10**6]), 400, "prompt"),
    ("max_tokens 0", "/v1/completions", completion(max_tokens=0), 400, "max_tokens"),
    ("max_tokens negative", "/v1/chat/completions", chat(max_tokens=-3), 400, "max_tokens"),
    ("max_tokens beyond the context", "/v1/completions", completion(max_tokens=1000), 400, "max_tokens"),
    ("temperature above 2", "/v1/completions", completion(temperature=2.5), 400, "temperature"),
    ("temperature negative", "/v1/chat/completions", chat(temperature=-0.1), 400, "temperature"),
    ("top_p 0", "/v1/completions", completion(top_p=0), 400, "top_p"),
    ("top_p above 1", "/v1/chat/completions", chat(top_p=1.5), 400, "top_p"),
    ("cache_salt empty", "/v1/chat/completions", chat(cache_salt=""), 400, "cache_salt"),
    ("cache_salt not a string", "/v1/completions", completion(cache_salt=7), 400, "cache_salt"),
    ("n 0", "/v1/completions", completion(n=0), 400, "n"),
    ("sla_prompt_rate 0", "/v1/completions", completion(sla_prompt_rate=0), 400, "sla_prompt_rate"),
    ("sla_token_rate negative", "/v1/chat/completions", chat(sla_token_rate=-1), 400, "sla_token_rate"),
    ("priority not an integer", "/v1/completions", completion(priority=0.5), 400, "priority"),
    ("speculative not a boolean", "/v1/completions", completion(speculative="maybe"), 400, "speculative"),
    ("min_tokens above max_tokens", "/v1/completions", completion(min_tokens=9), 400, "min_tokens"),
    ("empty stop string", "/v1/completions", completion(stop=[""]), 400, "stop"),
    ("presence_penalty", "/v1/completions", completion(presence_penalty=1.0), 400, "presence_penalty"),
    ("top_k beyond int32", "/v1/completions", completion(top_k=2**31), 400, "top_k"),
    ("stream_options without stream", "/v1/completions", completion(stream_options={"include_usage": True}),
     400, "stream_options"),
    ("a template smuggled in chat_template_kwargs", "/v1/chat/completions",
     chat(chat_template_kwargs={"chat_template": "{{ 'x' * 10**9 }}"}), 400, "chat_template_kwargs"),
    ("chat_template_kwargs naming a template input", "/v1/chat/completions",
     chat(chat_template_kwargs={"messages": []}), 400, "chat_template_kwargs"),
    ("tools", "/v1/chat/completions", chat(tools=[{"type": "function"}]), 400, "tools"),
    ("body over the size limit", "/v1/completions", completion(prompt="x" * (2 * LIMIT)), 413, None),
    ("detokenize ids outside the vocabulary", "/detokenize", {"tokens": [1, -1]}, 400, "tokens"),
    ("tokenize with neither prompt nor messages", "/tokenize", {}, 400, "prompt"),
]  # fmt: skip


def post(url, path, body, headers=AUTH):
    if isinstance(body, bytes):
        return httpx.post(url + path, content=body, headers={**headers, "Content-Type": "application/json"})
    return httpx.post(url + path, json=body, headers=headers)


def assert_error(r, status, field=None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and isinstance(error["message"], str)
    assert error["type"]
    if field is not None:
        assert error["param"] == field, error
        assert field in error["message"] or error["code"] == "model_not_found", error


def stream_text(url, body) -> str:
    text = []
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, headers=AUTH) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                text += [c["text"] for c in json.loads(line[6:])["choices"]]
    return "".join(text)


def test_bad_requests_get_errors_while_a_running_stream_is_undisturbed(server):
    url, _ = server
    long_request = completion(max_tokens=200, temperature=0, ignore_eos=True)
    alone = stream_text(url, long_request)
    during = {}
    runner = threading.Thread(target=lambda: during.setdefault("text", stream_text(url, long_request)))
    runner.start()
    for name, path, body, status, field in BAD_REQUESTS:
        r = post(url, path, body)
        assert r.status_code == status, f"{name}: {r.status_code} {r.text}"
        assert_error(r, status, field)
    runner.join(120)
    assert during["text"] == alone
    ok = post(url, "/v1/completions", completion(temperature=0))
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
    assert metric(url, "fastgen_requests_in_flight", AUTH) == 0


def test_malformed_json_says_so(server):
    r = post(server[0], "/v1/chat/completions", b"{not json")
    assert_error(r, 400)
    assert "not valid JSON" in r.json()["error"]["message"]


def test_missing_or_wrong_api_key_gets_401(server):
    url, _ = server
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        for path in ("/v1/completions", "/v1/models", "/metrics"):
            r = (
                post(url, path, completion(), headers)
                if "compl" in path
                else httpx.get(url + path, headers=headers)
            )
            assert_error(r, 401)
            assert r.json()["error"]["code"] == "invalid_api_key"
    for headers in ({}, {"Authorization": "Bearer nope"}):
        assert_error(httpx.post(url + "/reset_prefix_cache", headers=headers), 401)
    assert httpx.post(url + "/reset_prefix_cache", headers=AUTH).json()["status"] == "ok"
    assert httpx.get(url + "/health").status_code == 200  # load balancers probe without a key
    assert httpx.get(url + "/v1/models", headers=AUTH).status_code == 200


def test_unknown_route_and_wrong_method_are_json_errors(server):
    url, _ = server
    assert_error(httpx.get(url + "/v1/nothing", headers=AUTH), 404)
    assert_error(httpx.get(url + "/v1/completions", headers=AUTH), 405)


def test_full_server_answers_429_at_once_and_recovers(tiny_random_dir):
    engine = make_engine(tiny_random_dir, TINY_CONFIG)
    with serving(engine, max_queue=0) as url:
        body = completion(max_tokens=240, ignore_eos=True, prompt=[7, 8, 9], stream=True)
        streams = [httpx.stream("POST", url + "/v1/completions", json=body) for _ in range(32)]
        opened = [s.__enter__() for s in streams]
        assert all(r.status_code == 200 for r in opened)
        r = post(url, "/v1/completions", completion(), headers={})
        assert_error(r, 429)
        assert r.json()["error"]["code"] == "queue_full"
        for s in streams:
            s.__exit__(None, None, None)
        r = post(url, "/v1/completions", completion(max_tokens=2), headers={})
        for _ in range(50):  # the aborts land at the engine thread's next turn
            if r.status_code == 200:
                break
            r = post(url, "/v1/completions", completion(max_tokens=2), headers={})
        assert r.status_code == 200


def test_a_failed_forward_pass_ends_its_requests_with_500_and_the_server_goes_on(server):
    url, engine = server
    real_execute = engine.runner.execute

    def fail_once(*args):
        engine.runner.execute = real_execute  # the next step runs for real
        raise RuntimeError("device fell over at /secret/path shape=(64, 8)")

    engine.runner.execute = fail_once  # fails inside step(), after the scheduler composed it
    try:
        r = post(url, "/v1/completions", completion(max_tokens=5))
    finally:
        engine.runner.execute = real_execute
    assert_error(r, 500)
    message = r.json()["error"]["message"]
    assert "secret" not in message and "fell over" not in message  # the details stay in the log
    assert re.fullmatch(r"generation failed on the server \(request cmpl-[0-9a-f]{32}\)", message)
    assert httpx.get(url + "/health").status_code == 200  # alive: no restart needed
    for _ in range(100):  # the engine probes itself within a second and is ready again
        if httpx.get(url + "/ready").status_code == 200:
            break
        time.sleep(0.05)
    assert httpx.get(url + "/ready").json()["replicas"] == [{"replica": 0, "ready": True, "failed_steps": 1}]
    assert not engine.has_unfinished() and engine.scheduler.num_free_pages == engine.stats.total_pages
    assert (
        metric(url, "fastgen_kv_pages_used", AUTH) == 0 and metric(url, "fastgen_requests_running", AUTH) == 0
    )
    assert metric(url, 'fastgen_replica_step_failures_total{replica="0"}', AUTH) == 1
    assert post(url, "/v1/completions", completion(max_tokens=5)).status_code == 200
