"""The server under abuse, on loopback: every attack of issue 15 is answered with the right 4xx within a
few seconds (or handled) while one honest greedy stream runs throughout; the stream's text equals its
text alone, its worst gap between chunks is printed (and bounded against a stuck stream), and
afterwards nothing is running and no KV page is in use."""

import asyncio
import json
import logging
import socket
import threading
import time

import httpx
import pytest

from fastgen_jax.server import build_app
from fastgen_jax.server.guard import HTTPGuard
from fastgen_jax.server.http import ServerThread
from tests.server.conftest import TINY_CONFIG, make_engine, metric

KEY = "abuse-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# header_timeout: long enough that a loaded 2-core CI machine answers slowloris's probe before it (2 s once
# took 2.5), short enough to wait out in the test.
TIMEOUTS = {"header_timeout": 4.0, "body_timeout": 2.0, "send_timeout": 60.0}
LAG = 64  # outputs per sequence a stream may leave unread


@pytest.fixture(scope="module")
def server(tiny_random_dir):
    engine = make_engine(tiny_random_dir, TINY_CONFIG)
    app = build_app(
        engine,
        "tiny",
        api_key=KEY,
        max_stream_lag=LAG,
        body_timeout=TIMEOUTS["body_timeout"],
        send_timeout=TIMEOUTS["send_timeout"],
    )
    thread = ServerThread(app, header_timeout=TIMEOUTS["header_timeout"])
    # Small socket buffers (inherited by accepted sockets) make a client that stops reading show up
    # as back-pressure after a few kilobytes rather than megabytes.
    thread.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    with thread as url:
        yield url, engine


def post(url, path, body, headers=AUTH, timeout=30):
    if isinstance(body, bytes):
        headers = {**headers, "Content-Type": "application/json"}
        return httpx.post(url + path, content=body, headers=headers, timeout=timeout)
    return httpx.post(url + path, json=body, headers=headers, timeout=timeout)


def completion(**fields):
    return {"model": "tiny", "prompt": "the quick brown fox", "max_tokens": 4, **fields}


def chat(**fields):
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}


# Fewer tokens than LAG: the honest stream's client thread shares this process (and its GIL) with the
# server and the attacks, and was once starved long enough on a loaded CI machine to leave 64 outputs
# unread and be aborted as too slow. A stream shorter than the lag limit can never be; the client that
# never reads asks 240 tokens per sequence and still trips it. (It streams again and again throughout.)
HONEST = completion(prompt="the river and the stone", max_tokens=LAG - 16, temperature=0, ignore_eos=True)


def stream_with_gaps(url) -> tuple[str, float]:
    """One honest greedy stream: (its text, the longest wait between two chunks)."""
    parts, worst, last = [], 0.0, None
    with httpx.stream("POST", url + "/v1/completions", json={**HONEST, "stream": True}, headers=AUTH) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            now = time.perf_counter()
            worst, last = (max(worst, now - last) if last else 0.0), now
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                parts += [c["text"] for c in chunk["choices"]]
    return "".join(parts), worst


class HonestClient:
    """Streams HONEST again and again on a thread until stopped; keeps every text and the worst gap."""

    def __init__(self, url):
        self.url, self.texts, self.worst_gap = url, [], 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self):
        while not self._stop.is_set():
            text, gap = stream_with_gaps(self.url)
            self.texts.append(text)
            self.worst_gap = max(self.worst_gap, gap)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(120)


def error_of(r, status, param=None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    if param is not None:
        assert error["param"] == param, error
    return error["message"]


# ------------------------------------------------------------------ the attacks (each: url -> None)


def many_prompts_times_n(url):
    message = error_of(post(url, "/v1/completions", completion(prompt=[[7]] * 64, n=2)), 400, "n")
    assert "128 sequences" in message and "--max_seqs_per_request" in message


def fifty_thousand_prompts_with_n_128(url):
    body = completion(prompt=[[7]] * 50_000, n=128)  # the 3 MB body
    error_of(post(url, "/v1/completions", body), 400, "prompt")


def a_hundred_thousand_stop_strings(url):
    error_of(post(url, "/v1/completions", completion(stop=["zz"] * 100_000)), 400, "stop")
    error_of(post(url, "/v1/completions", completion(stop=["z"] * 17)), 400, "stop")
    error_of(post(url, "/v1/completions", completion(stop="z" * 257)), 400, "stop")


def stop_token_ids_outside_the_vocabulary(url):
    for ids in ([-1], [10**9], list(range(65))):
        error_of(post(url, "/v1/chat/completions", chat(stop_token_ids=ids)), 400, "stop_token_ids")


def a_million_list_items(url):
    error_of(post(url, "/v1/completions", completion(prompt=[1] * 1_000_000)), 400, "prompt")
    error_of(post(url, "/v1/completions", completion(prompt=[1, "x"] * 200_000)), 400, "prompt")
    error_of(post(url, "/detokenize", {"tokens": [1] * 1_000_000}), 400, "tokens")
    messages = [{"role": "user", "content": "x"}] * 20_000
    error_of(post(url, "/v1/chat/completions", chat(messages=messages)), 400, "messages")


def deep_nesting(url):
    for depth in (100_000, 900):
        body = b'{"prompt": ' + b"[" * depth + b"]" * depth + b', "max_tokens": 4}'
        error_of(post(url, "/v1/completions", body), 400)
        extra = b"[" * depth + b"]" * depth
        body = b'{"max_tokens": 4, "messages": [{"role": "user", "content": "x", "extra": ' + extra + b"}]}"
        assert post(url, "/v1/chat/completions", body).status_code in (200, 400)


def lone_surrogates(url):
    raw = b'"\\ud800"'
    for path, body, param in [
        ("/v1/completions", b'{"prompt": ' + raw + b"}", "prompt"),
        ("/v1/completions", b'{"prompt": ["ok", ' + raw + b"]}", "prompt"),
        ("/v1/completions", b'{"prompt": "ok", "stop": [' + raw + b"]}", "stop"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": ' + raw + b"}]}", "messages"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": '
         + raw + b"}]}]}", "messages"),
        ("/tokenize", b'{"prompt": ' + raw + b"}", "prompt"),
    ]:  # fmt: skip
        assert "surrogate" in error_of(post(url, path, body), 400, param)


def tiny_temperatures(url):
    greedy = post(url, "/v1/completions", completion(max_tokens=12, temperature=0)).json()
    for t in (1e-30, 1e-8):
        r = post(url, "/v1/completions", completion(max_tokens=12, temperature=t, n=4))
        assert r.status_code == 200
        assert {c["text"] for c in r.json()["choices"]} == {greedy["choices"][0]["text"]}


def roles_outside_openais_set(url):
    for role in ("hacker", "user\nFORGED 200", "USER"):
        error_of(
            post(url, "/v1/chat/completions", chat(messages=[{"role": role, "content": "x"}])),
            400,
            "messages",
        )


def heavy_tokenize_detokenize_and_echo(url):
    text = "the river light stone " * 5000  # 20k words, under the body limit
    assert post(url, "/tokenize", {"prompt": text}).json()["count"] > 10_000
    assert post(url, "/detokenize", {"tokens": list(range(100, 49_000))}).status_code == 200
    r = post(url, "/v1/completions", completion(prompt=[list(range(100, 200))] * 16, echo=True, max_tokens=2))
    assert r.status_code == 200 and len(r.json()["choices"]) == 16


def a_big_non_streamed_response(url):
    body = completion(n=16, logprobs=5, max_tokens=200, ignore_eos=True, temperature=1.0)
    r = post(url, "/v1/completions", body, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16 * 200


def a_client_that_never_reads(url, engine):
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(completion(n=16, max_tokens=240, ignore_eos=True, stream=True)).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    try:
        deadline = time.monotonic() + 20  # its 16 sequences are aborted long before they could finish
        while engine.num_unfinished < 16 and time.monotonic() < deadline:
            time.sleep(0.01)  # admitted
        while engine.num_unfinished > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.num_unfinished <= 1, engine.num_unfinished  # only the honest stream is left
        received = b""
        sock.settimeout(10)
        while b"data: [DONE]" not in received and (chunk := sock.recv(65536)):
            received += chunk
    finally:
        sock.close()
    assert b'"code":"client_too_slow"' in received
    assert received.count(b'"text"') < 16 * 240  # far from the whole stream


def slowloris(url):
    host, port = url.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(150)]
    half = [socket.create_connection((host, int(port))) for _ in range(150)]
    for s in half:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    try:
        start = time.perf_counter()
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        assert post(url, "/v1/completions", completion(max_tokens=2)).status_code == 200
        # answered while the slow connections are still held, not once their header timeout freed the server
        assert time.perf_counter() - start < TIMEOUTS["header_timeout"]
        for s in idle + half:  # closed by the server once the header timeout has passed
            s.settimeout(TIMEOUTS["header_timeout"] + 5)
            assert s.recv(100) == b""
    finally:
        for s in idle + half:
            s.close()


def a_body_that_never_finishes(url):
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"prompt"'.encode()
        )
        s.settimeout(TIMEOUTS["body_timeout"] + 5)
        assert s.recv(100).startswith(b"HTTP/1.1 408")


def auth_scheme_in_any_case(url):
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert httpx.get(url + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200
    error_of(httpx.get(url + "/v1/models", headers={"Authorization": f"Basic {KEY}"}), 401)
    error_of(httpx.get(url + "/v1/models", headers={"Authorization": b"Bearer \xc3\xa9"}), 401)


ATTACKS = [
    many_prompts_times_n,
    fifty_thousand_prompts_with_n_128,
    a_hundred_thousand_stop_strings,
    stop_token_ids_outside_the_vocabulary,
    a_million_list_items,
    deep_nesting,
    lone_surrogates,
    tiny_temperatures,
    roles_outside_openais_set,
    heavy_tokenize_detokenize_and_echo,
    a_big_non_streamed_response,
    a_client_that_never_reads,
    slowloris,
    a_body_that_never_finishes,
    auth_scheme_in_any_case,
]
# seconds each may take: the timeouts' own waits, and CPU generation of 3,200 tokens, included
SLOW = {a_client_that_never_reads: 30, slowloris: 15, a_big_non_streamed_response: 60}


def test_every_attack_is_answered_while_an_honest_stream_runs(server, capsys):
    url, engine = server
    alone, alone_gap = stream_with_gaps(url)
    times = {}
    with HonestClient(url) as honest:
        for attack in ATTACKS:
            start = time.perf_counter()
            attack(url, engine) if attack is a_client_that_never_reads else attack(url)
            times[attack.__name__] = time.perf_counter() - start
            assert times[attack.__name__] < SLOW.get(attack, 5.0), (attack.__name__, times)
    assert honest.texts and all(t == alone for t in honest.texts)
    with capsys.disabled():
        print(
            f"\nhonest stream: {len(honest.texts)} runs, worst gap {honest.worst_gap:.3f} s "
            f"(alone: {alone_gap:.3f} s); attack seconds: "
            + ", ".join(f"{k} {v:.2f}" for k, v in times.items())
        )
    # A stream stuck behind an attack, not a slow one: alone on these 2 cores the worst gap is about
    # 0.25 s, and under CI's second worker it once reached 3.27 s with nothing wrong (a bound of 3 s
    # failed there). Latency under abuse is measured by `scripts/soak_server.py`, not asserted here.
    assert honest.worst_gap < 10.0
    deadline = time.monotonic() + 10
    while metric(url, "fastgen_requests_in_flight", AUTH) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(url, "fastgen_requests_in_flight", AUTH) == 0
    assert metric(url, "fastgen_requests_running", AUTH) == 0
    assert metric(url, "fastgen_kv_pages_used", AUTH) == 0
    assert not engine.has_unfinished() and engine.scheduler.num_free_pages == engine.stats.total_pages


def test_log_lines_cannot_be_forged(server, caplog):
    url, _ = server
    with caplog.at_level(logging.INFO, logger="fastgen_jax.server"):
        httpx.get(url + "/v1/models%0AFORGED%20200", headers=AUTH)
        post(url, "/v1/chat/completions", chat(chat_template_kwargs={"a\nFORGED": 1}))
        time.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records if r.name == "fastgen_jax.server"]
    assert any("FORGED" in line for line in lines)
    assert not any("\n" in line or "\r" in line for line in lines), lines


def test_a_non_ascii_or_blank_api_key_is_refused_at_start_up(server):
    _, engine = server
    for key in ("clé", "two words", ""):
        with pytest.raises(ValueError, match="--api_key"):
            build_app(engine, "tiny", api_key=key)


def test_a_client_that_reads_nothing_is_cut_off_after_the_send_timeout():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send_blocked(message):
        if message["type"] == "http.response.body":
            await asyncio.Event().wait()  # the socket's buffers are full and stay full

    guard = HTTPGuard(app, api_key=None, max_request_bytes=1024, send_timeout=0.2)
    scope = {"type": "http", "method": "GET", "path": "/x", "headers": []}
    start = time.perf_counter()
    asyncio.run(guard(scope, receive, send_blocked))  # returns: the server then closes the socket
    assert time.perf_counter() - start < 2 and "dropped: client not reading" in scope["fastgen.log"]


def test_a_websocket_scope_cannot_bypass_the_key():
    reached = []

    async def app(scope, receive, send):
        reached.append(scope)

    guard = HTTPGuard(app, api_key=KEY, max_request_bytes=1024)
    sent = []

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "websocket",
        "path": "/v1/completions",
        "headers": [(b"authorization", f"Bearer {KEY}".encode())],
    }
    asyncio.run(guard(scope, receive, send))
    assert not reached and sent == [{"type": "websocket.close", "code": 1008}]
