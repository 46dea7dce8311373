"""The offline entry points: `fastgen_jax.pipeline` and `python -m fastgen_jax.generate`."""

import json
import os
import subprocess
import sys

import pytest

import fastgen_jax

SMALL_ENGINE = dict(token_budget=64, max_num_seqs=16, max_model_len=256, page_size=64)


def cli(*args):
    flags = [f"--{k}={v}" for k, v in SMALL_ENGINE.items()]
    return subprocess.run(
        [sys.executable, "-m", "fastgen_jax.generate", *flags, *args],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=600,
    )


@pytest.fixture(scope="module")
def pipe(smollm2_dir):
    return fastgen_jax.pipeline(str(smollm2_dir), progress=False, **SMALL_ENGINE)


def test_pipeline_answers_in_input_order_with_mii_fields(pipe):
    chats = [
        [{"role": "user", "content": q}]
        for q in ("What is the capital of France?", "What is 2+2? Answer with a number.")
    ]
    first, second = pipe(chats, max_new_tokens=24)
    assert first.generated_text == "The capital of France is Paris."
    assert (first.finish_reason, first.generated_length) == ("stop", 8)
    assert first.prompt_length == len(pipe.tokenizer.encode(pipe.tokenizer.apply_chat_template(chats[0])))
    assert "4" in second.generated_text


def test_pipeline_takes_a_single_string_and_returns_full_text(pipe):
    (response,) = pipe("The capital of France is", max_new_tokens=3, return_full_text=True)
    assert response.generated_text.startswith("The capital of France is")
    assert response.generated_length == 3 and response.finish_reason == "length"


def test_cli_prompt_prints_the_answer(smollm2_dir):
    result = cli(f"--model={smollm2_dir}", "--prompt=What is the capital of France?", "--chat")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "The capital of France is Paris."


def test_cli_batch_takes_openai_names_reports_bad_lines_and_orders(smollm2_dir, tmp_path):
    lines = [
        json.dumps({"messages": [{"role": "user", "content": "What is the capital of France?"}]}),
        "{this is not json",
        json.dumps({"prompt": "Once upon a time", "max_new_tokens": 5, "ignore_eos": True}),
        json.dumps({"prompt": "Hi", "temperature": -1}),
        json.dumps({"prompt": "Hi", "colour": "blue"}),
        json.dumps({"prompt": "Once upon a time", "max_tokens": 5, "stop": [" the"], "n": 2, "seed": 3}),
        json.dumps({"prompt": "Hi", "max_tokens": 5, "max_new_tokens": 5}),
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    result = cli(
        f"--model={smollm2_dir}",
        f"--input={tmp_path / 'in.jsonl'}",
        f"--output={tmp_path / 'out.jsonl'}",
        "--max_new_tokens=24",
        "--ordered",
    )
    assert result.returncode == 1, result.stderr  # some lines failed
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["line"] for r in out] == [1, 2, 3, 4, 5, 6, 7]
    assert out[0]["generated_text"] == "The capital of France is Paris."
    assert out[2]["generated_length"] == 5 and out[2]["finish_reason"] == "length"
    assert "not valid JSON" in out[1]["error"]
    assert "temperature must be in [0.0, 100.0], got -1" in out[3]["error"]
    assert "unknown field(s) ['colour']" in out[4]["error"]
    assert out[6]["error"] == "max_new_tokens and max_tokens are one setting: give one of them"
    choices = out[5]["choices"]
    assert len(choices) == 2 and all(c["generated_length"] <= 5 for c in choices)
    assert all(" the" not in c["generated_text"] for c in choices)
    assert "error: input line 2:" in result.stderr
    assert "batch: 3 ok, 4 failed;" in result.stderr


def test_cli_batch_will_not_overwrite_results(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"prompt": "Hi"}\n')
    (tmp_path / "out.jsonl").write_text('{"line": 1, "generated_text": "kept"}\n')
    result = cli(f"--input={tmp_path / 'in.jsonl'}", f"--output={tmp_path / 'out.jsonl'}")
    assert result.returncode == 1
    assert "already holds results: pass --resume to continue it, or remove it" in result.stderr
    assert (tmp_path / "out.jsonl").read_text() == '{"line": 1, "generated_text": "kept"}\n'


def test_cli_names_a_missing_model(tmp_path):
    result = cli(f"--model={tmp_path / 'nope'}", "--prompt=hi")
    assert result.returncode == 1
    assert f"error: no checkpoint at {tmp_path / 'nope'}" in result.stderr
    assert "Traceback" not in result.stderr
