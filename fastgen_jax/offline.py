"""Offline generation in DeepSpeed-MII's shape: `pipe = pipeline(model)`, then `pipe(prompts, ...)`.

All prompts go into one engine at once, so they are batched by Dynamic SplitFuse; responses come
back in input order. A prompt may be a string, a list of token ids, or a chat (a list of
{"role", "content"} messages rendered with the model's chat template).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from typing import Any

from fastgen_jax.config import EngineConfig
from fastgen_jax.llm_engine import LLMEngine
from fastgen_jax.sampling_params import SamplingParams

Prompt = str | Sequence[int] | Sequence[dict[str, Any]]


@dataclasses.dataclass
class Response:
    generated_text: str
    prompt_length: int
    generated_length: int
    finish_reason: str
    token_ids: list[int]
    logprobs: list[float] | None = None


def add_prompt(engine: LLMEngine, prompt: Prompt, params: SamplingParams) -> str:
    """Queues a string, token ids or chat messages; returns the request id."""
    if isinstance(prompt, str):
        return engine.add_request(prompt, params)
    items = list(prompt)
    if items and all(isinstance(m, dict) for m in items):
        return engine.add_request(engine.tokenizer.apply_chat_template(items), params)
    return engine.add_request(sampling_params=params, prompt_token_ids=items)


def run_to_completion(
    engine: LLMEngine, request_ids: Iterable[str], progress: bool = True
) -> dict[str, Response]:
    """Steps the engine until the given requests finish; shows requests done and tokens/s."""
    from tqdm.auto import tqdm

    request_ids = list(request_ids)
    pending = set(request_ids)
    parts: dict[str, Response] = {}
    start, generated = time.perf_counter(), 0
    with tqdm(total=len(pending), desc="generating", unit="req", disable=not progress) as bar:
        while pending:
            if not engine.has_unfinished():
                raise RuntimeError(f"requests {sorted(pending)} are not in the engine")
            for out in engine.step():
                r = parts.setdefault(out.request_id, Response("", out.prompt_length, 0, "", []))
                r.generated_text += out.new_text
                r.token_ids += out.new_token_ids
                r.generated_length = out.generated_length
                if out.new_logprobs is not None:
                    r.logprobs = (r.logprobs or []) + out.new_logprobs
                generated += len(out.new_token_ids)
                if out.finished:
                    r.finish_reason = out.finish_reason
                    bar.update(out.request_id in pending)
                    pending.discard(out.request_id)
            bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - start):.1f}")
    return {r: parts[r] for r in request_ids}


class Pipeline:
    """Callable offline generator around one warmed-up engine."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer

    def __call__(
        self,
        prompts: Prompt | Sequence[Prompt],
        progress: bool = True,
        return_full_text: bool = False,
        **sampling: Any,
    ) -> list[Response]:
        """Generates for every prompt; keyword arguments are `SamplingParams` fields."""
        single = isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and not isinstance(prompts[0], str | list)
        )
        batch = [prompts] if single else list(prompts)
        params = SamplingParams(**sampling)
        ids = [add_prompt(self.engine, p, params) for p in batch]
        responses = run_to_completion(self.engine, ids, progress)
        out = [responses[i] for i in ids]
        if return_full_text:
            for prompt, r in zip(batch, out, strict=True):
                if isinstance(prompt, str):
                    r.generated_text = prompt + r.generated_text
        return out


def pipeline(model: str, dtype: str | None = None, progress: bool = True, **engine_options: Any) -> Pipeline:
    """Loads `model` (a checkpoint directory or .gguf), compiles its step programs, returns a Pipeline.

    Keyword arguments are `EngineConfig` fields (token_budget, max_num_seqs, page_size, ...).
    """
    engine = LLMEngine.from_pretrained(model, EngineConfig(**engine_options), dtype, progress=progress)
    return Pipeline(engine)
