"""The server splits a thinking model's reasoning from its answer (`fastgen_jax.reasoning`): a tiny
random Qwen3 over SmolLM2's tokenizer with a Qwen3-style template that opens `<think>` in the prompt
(unless `enable_thinking` is false). The random model never writes the closing tag, so with the block
opened everything it says is reasoning; the splitter's tag handling is tested in tests/test_reasoning.py."""

import json

import httpx
import pytest

from fastgen_jax.checkpoints.random_model import make_random_checkpoint
from fastgen_jax.config import EngineConfig
from fastgen_jax.tokenizer import Tokenizer
from tests.server.conftest import make_engine, serving

THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]
# One slab size and few sequences: a single compiled step keeps start-up short.
CONFIG = EngineConfig(token_budget=32, token_buckets=(32,), max_num_seqs=2, max_model_len=128, num_pages=24)


@pytest.fixture(scope="module")
def engine(smollm2_dir, tmp_path_factory):
    tokenizer_dir = tmp_path_factory.mktemp("thinking-tokenizer")
    Tokenizer.from_hf_dir(smollm2_dir).save(tokenizer_dir)
    config_path = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": THINKING_TEMPLATE}))
    model_dir = tmp_path_factory.mktemp("tiny-qwen3")
    make_random_checkpoint(model_dir, Tokenizer.from_hf_dir(tokenizer_dir), shape="tiny-qwen3")
    return make_engine(model_dir, CONFIG)


def _chat(url: str, **extra) -> dict:
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()


def _stream(url: str, **extra) -> list[dict]:
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "stream": True, **extra}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        lines = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    return [json.loads(line)["choices"][0]["delta"] for line in lines[:-1] if json.loads(line)["choices"]]


def test_reasoning_is_split_streamed_or_not_for_qwen3_and_not_when_turned_off(engine):
    no_thinking = dict(chat_template_kwargs={"enable_thinking": False})
    with serving(engine, reasoning_parser="none") as url:
        plain = _chat(url)["choices"][0]["message"]
        plain_off = _chat(url, **no_thinking)["choices"][0]["message"]
    text = plain["content"]
    assert text and "</think>" not in text and "reasoning_content" not in plain
    with serving(engine) as url:  # auto: the model's family (qwen3) thinks
        thinking = _chat(url)["choices"][0]["message"]
        deltas = _stream(url)
        off = _chat(url, **no_thinking)["choices"][0]["message"]
    assert (thinking["reasoning_content"], thinking["content"]) == (text, None)
    assert "".join(d.get("reasoning_content", "") for d in deltas) == text
    assert not any(d.get("content") for d in deltas)
    assert (off["reasoning_content"], off["content"]) == (None, plain_off["content"])
