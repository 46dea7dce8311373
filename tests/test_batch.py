"""Batch jobs (`fastgen_jax.batch`): the OpenAI Batch format answered as the server answers, bad lines
named, results kept across a kill, and the results file's own rules."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from fastgen_jax.batch import output
from fastgen_jax.batch.formats import OpenAIBatchFormat, _sampling_fields
from fastgen_jax.batch.job import run_batch
from fastgen_jax.server.request_builder import RequestBuilder
from tests.server.conftest import SMOLLM2_CONFIG, make_engine, serving, tiny_random_dir  # noqa: F401

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
GOOD = {
    "chat-france": ("/v1/chat/completions", {"model": "smollm2", "messages": FRANCE, "temperature": 0}),
    "colours": (
        "/v1/completions",
        {"model": "smollm2", "prompt": "The three primary colours are", "temperature": 0, "max_tokens": 12},
    ),
    "two-prompts": (
        "/v1/completions",
        {
            "prompt": ["def fibonacci(n):", "Once upon a time"],
            "temperature": 0,
            "max_tokens": 10,
            "stop": "\n",
        },
    ),
    "seeded-n2": (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Name a colour."}],
            "temperature": 0.8,
            "seed": 7,
            "n": 2,
            "max_completion_tokens": 10,
        },
    ),
    "echo": ("/v1/completions", {"prompt": "Hello", "echo": True, "max_tokens": 4, "temperature": 0}),
    "json-answer": (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Name a city and its country as JSON."}],
            "temperature": 0,
            "max_tokens": 60,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "city",
                    "schema": {
                        "type": "object",
                        "properties": {
                            "city": {"type": "string", "maxLength": 20},
                            "country": {"enum": ["France", "Japan"]},
                        },
                        "required": ["city", "country"],
                    },
                },
            },
        },
    ),
}
REFUSED = {  # valid lines whose bodies the server refuses
    "hot": ("/v1/completions", {"prompt": "Hi", "temperature": 7}),
    "other-model": ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": FRANCE}),
}


def batch_line(custom_id, url, body):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def without_ids(body):
    return {k: v for k, v in body.items() if k not in ("id", "created")}


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    return make_engine(smollm2_dir, SMOLLM2_CONFIG)


@pytest.mark.slow  # a SmolLM2 engine compiles and a server starts: about a minute on 2 shared cores
def test_openai_batch_file_is_answered_line_by_line_as_the_server_answers(engine, tmp_path):
    with serving(engine, model_name="smollm2") as url:
        served = {
            cid: httpx.post(f"{url}{route}", json=body, timeout=120)
            for cid, (route, body) in {**GOOD, **REFUSED}.items()
        }
    lines = [batch_line(cid, *GOOD[cid]) for cid in ("chat-france", "colours")]
    lines += [
        "{not json",
        batch_line("two-prompts", *GOOD["two-prompts"]),
        batch_line("embed", "/v1/embeddings", {"input": "x"}),
        batch_line("hot", *REFUSED["hot"]),
        "",
        batch_line("chat-france", *GOOD["colours"]),
        batch_line("seeded-n2", *GOOD["seeded-n2"]),
        batch_line("other-model", *REFUSED["other-model"]),
        batch_line("echo", *GOOD["echo"]),
        batch_line("json-answer", *GOOD["json-answer"]),
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    builder = RequestBuilder(engine, "smollm2", engine.engine_config.max_num_seqs + 1024)
    path = str(tmp_path / "out.jsonl")
    with open(path, "w") as out:
        summary = run_batch(
            engine, OpenAIBatchFormat(builder), str(tmp_path / "in.jsonl"), out,
            output_path=path, ordered=True, progress=False,
        )  # fmt: skip
    results = [json.loads(x) for x in open(path)]
    assert [r["custom_id"] for r in results] == [
        "chat-france", "colours", None, "two-prompts", "embed", "hot", "chat-france", "seeded-n2",
        "other-model", "echo", "json-answer",
    ]  # fmt: skip
    by_id = {r["custom_id"]: r for r in results if "line" not in r}
    for cid in GOOD:
        response = by_id[cid]["response"]
        assert by_id[cid]["error"] is None and response["status_code"] == 200
        assert response["request_id"] == response["body"]["id"]
        assert without_ids(response["body"]) == without_ids(served[cid].json())
    assert by_id["chat-france"]["response"]["body"]["choices"][0]["message"]["content"] == (
        "The capital of France is Paris."
    )
    for cid in REFUSED:
        response = by_id[cid]["response"]
        assert (response["status_code"], response["body"]) == (served[cid].status_code, served[cid].json())
        assert by_id[cid]["error"]["message"] == served[cid].json()["error"]["message"]
    assert served["hot"].status_code == 400 and served["other-model"].status_code == 404
    assert results[2]["line"] == 3 and results[2]["error"]["code"] == "invalid_json"
    assert results[2]["error"]["message"].startswith("line 3: not valid JSON")
    assert by_id["embed"]["response"] is None and by_id["embed"]["error"]["code"] == "unknown_url"
    assert results[6]["line"] == 8 and results[6]["error"] == {
        "code": "duplicate_custom_id",
        "message": "line 8: custom_id 'chat-france' appears on an earlier line",
    }
    answer = json.loads(by_id["json-answer"]["response"]["body"]["choices"][0]["message"]["content"])
    assert set(answer) == {"city", "country"} and answer["country"] in ("France", "Japan")
    assert (summary.ok, summary.failed, summary.any_failed) == (6, 5, True)


@pytest.mark.slow  # two CLI runs (start-up and compile each)
def test_a_job_killed_mid_way_resumes_and_answers_each_custom_id_once(tiny_random_dir, tmp_path):  # noqa: F811
    """A SIGKILL after some results, plus a half-written last line: `--resume` finishes the job."""
    num = 120
    lines = [
        batch_line(
            f"r{i}", "/v1/completions", {"prompt": f"Request {i}", "max_tokens": 24, "ignore_eos": True}
        )
        for i in range(num)
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    flags = [
        f"--model={tiny_random_dir}", f"--input={tmp_path / 'in.jsonl'}", f"--output={out}",
        "--token_budget=32", "--max_num_seqs=4", "--max_model_len=128", "--page_size=16",
        "--max_in_flight=4", "--noprogress",
    ]  # fmt: skip
    command = [sys.executable, "-m", "fastgen_jax.generate", *flags]
    killed = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out.exists() and out.read_text().count("\n") >= 10):
        assert killed.poll() is None, killed.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    before = out.read_text()
    assert killed.returncode == -signal.SIGKILL and 10 <= before.count("\n") < num
    with open(out, "a") as f:
        f.write('{"id": "batch_req_0", "custom_id": "r')  # as if killed while writing this line
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "cut an incomplete last line (37 bytes)" in resumed.stderr
    text = out.read_text()
    assert text.startswith(before) and text.endswith("\n")
    results = [json.loads(x) for x in text.splitlines()]
    assert sorted(r["custom_id"] for r in results) == sorted(f"r{i}" for i in range(num))
    assert all(r["response"]["body"]["usage"]["completion_tokens"] == 24 for r in results)
    assert (
        f"batch: {num - before.count(chr(10))} ok, 0 failed (and {before.count(chr(10))} ok" in resumed.stderr
    )


# ---------------------------------------------------------------------- the results file, no model


def test_resume_cuts_only_an_incomplete_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"line": 1}\n{"line": 2, "error": "bad"}\n{"line": 3, "genera')
    keys, failed = output.answered(str(path), lambda r: r["line"], lambda r: "error" in r)
    assert (keys, failed) == ({1, 2}, 1)
    assert path.read_text() == '{"line": 1}\n{"line": 2, "error": "bad"}\n'


def test_resume_refuses_a_damaged_line_before_the_last(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"line": 1}\n{"line": 2, "gen\n{"line": 3}\n')
    with pytest.raises(output.OutputError, match="the line at byte 12 is not a complete JSON line"):
        output.answered(str(path), lambda r: r["line"], lambda r: False)
    assert path.read_text().count("\n") == 3  # left as it was


def test_ordered_rewrite_sorts_lines_by_input_position(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"line": 3}\n{"line": 1, "x": "é"}\n{"line": 2}\n')
    output.rewrite_in_order(str(path), lambda r: r["line"])
    assert path.read_text() == '{"line": 1, "x": "é"}\n{"line": 2}\n{"line": 3}\n'
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_simple_lines_take_openai_field_names():
    fields = _sampling_fields({"max_tokens": 8, "min_tokens": 2, "stop": ["\n"], "logprobs": 3, "seed": 1})
    assert fields == dict(
        max_new_tokens=8, min_new_tokens=2, stop=("\n",), logprobs=True, top_logprobs=3, seed=1
    )
    with pytest.raises(ValueError, match="max_new_tokens and max_tokens are one setting: give one of them"):
        _sampling_fields({"max_new_tokens": 8, "max_tokens": 8})
