"""/metrics judges every finished request against the SLA, counts prompt and generation lengths, and
the request log gets one JSON line per finished request."""

import dataclasses
import json
import time

import httpx
import pytest

from fastgen_jax.sla import SLA
from tests.server.conftest import TINY_CONFIG, make_engine, metric, serving

EASY = SLA(prompt_rate=0.001, token_rate=0.001)  # 1000 s per prompt token, 1000 s per token gap
IMPOSSIBLE = SLA(prompt_rate=1e9, token_rate=1e9)  # first token in ~0 s, token gaps of ~0 s


@pytest.fixture(scope="module")
def engine(tiny_random_dir):
    return make_engine(tiny_random_dir, TINY_CONFIG)


def complete(url, prompt_len, max_tokens, stream=False):
    body = {
        "model": "tiny",
        "prompt": list(range(100, 100 + prompt_len)),
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text


def sla_counts(url):
    return {
        (part, outcome): metric(url, f'fastgen_sla_requests_total{{outcome="{outcome}",part="{part}"}}')
        for part in ("prompt", "generation", "both")
        for outcome in ("met", "missed")
    }


def test_requests_meeting_an_easy_sla_are_counted_met_with_their_lengths(engine):
    with serving(engine, sla=EASY) as url:
        for prompt_len, max_tokens in [(5, 3), (20, 7), (40, 2)]:
            complete(url, prompt_len, max_tokens, stream=True)
        assert sla_counts(url) == {
            ("prompt", "met"): 3,
            ("prompt", "missed"): 0,
            ("generation", "met"): 3,
            ("generation", "missed"): 0,
            ("both", "met"): 3,
            ("both", "missed"): 0,
        }
        assert metric(url, "fastgen_requests_judged_total") == 3
        assert metric(url, "fastgen_request_prompt_tokens_count") == 3
        assert metric(url, "fastgen_request_prompt_tokens_sum") == 65
        assert metric(url, 'fastgen_request_prompt_tokens_bucket{le="16.0"}') == 1
        assert metric(url, 'fastgen_request_prompt_tokens_bucket{le="32.0"}') == 2
        assert metric(url, "fastgen_request_generation_tokens_sum") == 12
        assert metric(url, 'fastgen_request_generation_tokens_bucket{le="2.0"}') == 1
        assert metric(url, "fastgen_sla_prompt_rate") == 0.001
        assert metric(url, "fastgen_token_budget") == TINY_CONFIG.token_budget  # fixed: never changes
        assert metric(url, "fastgen_token_budget_changes_total") == 0


def test_requests_missing_an_impossible_sla_are_counted_missed_by_part(engine):
    with serving(engine, sla=IMPOSSIBLE) as url:
        complete(url, 10, 4)
        complete(url, 10, 1)  # one token: no gap, so the generation part holds
        assert sla_counts(url) == {
            ("prompt", "met"): 0,
            ("prompt", "missed"): 2,
            ("generation", "met"): 1,
            ("generation", "missed"): 1,
            ("both", "met"): 0,
            ("both", "missed"): 2,
        }


def test_aborted_requests_are_counted_in_the_histograms_but_not_judged(engine, tmp_path):
    log = tmp_path / "requests.jsonl"
    with serving(engine, sla=EASY, request_log=str(log)) as url:
        body = {
            "model": "tiny",
            "prompt": [100, 101, 102],
            "max_tokens": 200,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            next(line for line in r.iter_lines() if line.startswith("data: {"))  # then hang up
        deadline = time.monotonic() + 60
        while metric(url, 'fastgen_requests_finished_total{finish_reason="abort"}', missing=0) < 1:
            assert time.monotonic() < deadline, "the abort never arrived"
            time.sleep(0.05)
        assert metric(url, "fastgen_requests_judged_total") == 0
        assert metric(url, "fastgen_request_prompt_tokens_count") == 1
    [entry] = [json.loads(line) for line in log.read_text().splitlines()]
    assert entry["finish_reason"] == "abort" and entry["prompt_tokens"] == 3
    assert entry["sla_prompt"] is None and entry["sla_generation"] is None
    assert 1 <= entry["output_tokens"] < 200


def test_the_request_log_has_a_line_per_finished_request(engine, tmp_path):
    log = tmp_path / "requests.jsonl"
    before = time.time()
    with serving(engine, sla=EASY, request_log=str(log)) as url:
        complete(url, 12, 5)
        complete(url, 30, 9, stream=True)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["prompt_tokens"], e["output_tokens"], e["finish_reason"]) for e in entries] == [
        (12, 5, "length"),
        (30, 9, "length"),
    ]
    assert all(e["sla_prompt"] is True and e["sla_generation"] is True for e in entries)
    assert before <= entries[0]["arrival"] <= entries[1]["arrival"] <= time.time()
    assert all(0 < e["ttft"] <= e["latency"] for e in entries)


def test_a_request_with_its_own_sla_is_judged_by_it_and_counted_apart(engine, tmp_path):
    log = tmp_path / "requests.jsonl"
    with serving(engine, sla=EASY, request_log=str(log)) as url:
        complete(url, 10, 4)  # the server's easy SLA: met
        own = {"sla_prompt_rate": 1e9, "sla_token_rate": 1e9, "priority": -1}  # impossible: missed
        body = {"model": "tiny", "prompt": list(range(100, 110)), "max_tokens": 4, "ignore_eos": True, **own}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=120).status_code == 200
        assert sla_counts(url)[("both", "met")] == 1 and sla_counts(url)[("both", "missed")] == 1
        name = 'fastgen_sla_own_requests_total{{outcome="{}",part="both"}}'
        own_counts = {o: metric(url, name.format(o)) for o in ("met", "missed")}
        assert own_counts == {"met": 0, "missed": 1}
        assert metric(url, "fastgen_sla_deferred_decodes_total") == 0  # splitfuse defers nothing
    first, second = [json.loads(line) for line in log.read_text().splitlines()]
    assert first["sla"] is None and first["sla_prompt"] is True
    assert second["sla"] == {"prompt_rate": 1e9, "token_rate": 1e9, "priority": -1}
    assert second["sla_prompt"] is False and second["admission_slack"] is None  # not the sla policy


def test_under_the_sla_policy_the_log_has_each_requests_slack_at_admission(tiny_random_dir, tmp_path):
    log = tmp_path / "requests.jsonl"
    config = dataclasses.replace(TINY_CONFIG, policy="sla", sla_prompt_rate=0.001)
    engine = make_engine(tiny_random_dir, config)
    with serving(engine, sla=EASY, request_log=str(log)) as url:
        complete(url, 20, 3)
        assert metric(url, "fastgen_sla_prompts_past_deadline_total") == 0
    [entry] = [json.loads(line) for line in log.read_text().splitlines()]
    # 20 tokens at 0.001 tokens/s: due 20000 s after arrival, less a prefill of well under 100 s
    assert 19_900 < entry["admission_slack"] < 20_000 and entry["sla_prompt"] is True
