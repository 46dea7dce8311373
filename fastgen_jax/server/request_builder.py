"""OpenAI request bodies -> engine requests plus the formatter of their answer.

The server's handlers and the offline batch job (`fastgen_jax.batch`) both go through a
`RequestBuilder`, so a body is checked the same way (same fields, limits and error messages) and its
answer rendered by the same `Formatter`, whether it came over HTTP or from a batch file.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from typing import Any

from fastgen_jax.llm_engine import LLMEngine, RequestError
from fastgen_jax.sampling_params import SamplingParamsError
from fastgen_jax.server.async_engine import GenerationRequest
from fastgen_jax.server.openai_format import ChatFormatter, CompletionFormatter, Formatter
from fastgen_jax.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    TokenizeRequest,
    template_messages,
)
from fastgen_jax.tokenizer import TokenizerError


def _num_prompts(prompt: Any) -> int:
    """How many prompts `prompt` holds (the schema bounds the list), before tokenizing any."""
    if isinstance(prompt, str) or not prompt or all(isinstance(p, int) for p in prompt):
        return 1
    return len(prompt)


@dataclasses.dataclass
class PreparedRequest:
    """An API request made ready: its engine requests (choice i is `requests[i]`) and its formatter."""

    requests: list[GenerationRequest]
    formatter: Formatter


class RequestBuilder:
    """Checks bodies against one engine and model name; one request may ask for at most
    `max_seqs_per_request` sequences (prompts x n; default and cap: `capacity`), checked before any
    prompt is tokenized."""

    def __init__(
        self, engine: LLMEngine, model_name: str, capacity: int, max_seqs_per_request: int | None = None
    ):
        self.engine, self.model_name, self.capacity = engine, model_name, capacity
        self.max_seqs_per_request = min(max_seqs_per_request or capacity, capacity)
        self.tokenizer = engine.tokenizer

    def check_count(self, num_prompts: int, n: int) -> None:
        """Before any per-prompt work: a request may ask for at most max_seqs_per_request sequences."""
        if num_prompts * n > self.max_seqs_per_request:
            raise APIError(
                400,
                f"n: the request asks for {num_prompts} prompt(s) x n={n} = {num_prompts * n} sequences; "
                f"at most {self.max_seqs_per_request} per request (--max_seqs_per_request)",
                "n",
            )

    def check_stop_token_ids(self, ids: list[int] | None) -> None:
        vocab = self.engine.model_config.vocab_size
        bad = [t for t in ids or () if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"stop_token_ids must lie in [0, {vocab}); got {bad[:5]}", "stop_token_ids")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                "model",
                code="model_not_found",
            )

    def check_prompt(self, ids: list[int], max_tokens: int | None, param: str) -> int:
        """Validates a tokenized prompt; returns max_tokens (the rest of the context when None)."""
        if max_tokens is None:
            max_tokens = max(self.engine.max_model_len - len(ids), 1)
        try:
            self.engine.check_prompt(ids, max_tokens)
        except RequestError as e:
            field = "max_tokens" if e.param == "max_tokens" else param  # the prompt, as the client named it
            message = str(e) if str(e).startswith(field) else f"{field}: {e}"
            raise APIError(400, message, field) from None
        return max_tokens

    def encode(self, text: str, param: str, **kwargs) -> list[int]:
        if not text:
            raise APIError(400, f"{param} is empty", param)
        try:
            return self.tokenizer.encode(text, **kwargs)
        except UnicodeEncodeError:
            raise APIError(400, f"{param} holds a lone UTF-16 surrogate (not valid Unicode)", param) from None

    def encode_chat(self, body: ChatCompletionRequest | TokenizeRequest, kwargs: dict) -> list[int]:
        try:
            return self.tokenizer.encode_chat(
                template_messages(body.messages), body.add_generation_prompt, **kwargs
            )
        except TokenizerError as e:
            raise APIError(400, str(e), "messages") from None
        except UnicodeEncodeError:  # e.g. in a field of a message other than its content
            raise APIError(
                400, "messages hold a lone UTF-16 surrogate (not valid Unicode)", "messages"
            ) from None

    # ------------------------------------------------------------------ the two generation routes

    def completion(self, body: CompletionRequest) -> PreparedRequest:
        """A /v1/completions body made ready; APIError says what the client must fix."""
        self.check_model(body.model)
        body.check_unsupported()
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported", "echo")
        self.check_count(_num_prompts(body.prompt), body.n)
        self.check_stop_token_ids(body.stop_token_ids)
        prompts = self._completion_prompts(body.prompt)
        logprobs, request_id = body.logprobs is not None, f"cmpl-{uuid.uuid4().hex}"
        requests = self._requests(
            request_id, body, prompts, body.max_tokens, logprobs, body.logprobs or 0, "prompt"
        )
        echo = [self.tokenizer.decode(p) for p in prompts] if body.echo else None
        formatter = CompletionFormatter(
            request_id,
            self.model_name,
            self.tokenizer,
            [len(p) for p in prompts],
            body.n,
            logprobs,
            echo_texts=echo,
        )
        return PreparedRequest(requests, formatter)

    def chat(self, body: ChatCompletionRequest) -> PreparedRequest:
        """A /v1/chat/completions body made ready; APIError says what the client must fix."""
        self.check_model(body.model)
        body.check_unsupported()
        self.check_count(1, body.n)
        self.check_stop_token_ids(body.stop_token_ids)
        ids = self.encode_chat(body, body.chat_template_kwargs or {})
        max_tokens = body.max_completion_tokens or body.max_tokens
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        requests = self._requests(
            request_id, body, [ids], max_tokens, body.logprobs, body.top_logprobs or 0, "messages"
        )
        formatter = ChatFormatter(
            request_id, self.model_name, self.tokenizer, [len(ids)], body.n, body.logprobs
        )
        return PreparedRequest(requests, formatter)

    def _completion_prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.encode(prompt, "prompt")]
        if not prompt:
            raise APIError(400, "prompt is empty", "prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        prompts = [self.encode(p, "prompt") if isinstance(p, str) else list(p) for p in prompt]
        if any(not p for p in prompts):
            raise APIError(400, "prompt holds an empty prompt", "prompt")
        return prompts

    def _requests(
        self,
        request_id: str,
        body,
        prompts: list[list[int]],
        max_tokens: int | None,
        logprobs: bool,
        top_logprobs: int,
        param: str,
    ) -> list[GenerationRequest]:
        config = self.engine.engine_config
        sla = body.request_sla(config.sla_prompt_rate, config.sla_token_rate)
        out = []
        for ids in prompts:
            tokens = self.check_prompt(ids, max_tokens, param)
            for i in range(body.n):
                try:
                    params = body.sampling_params(tokens, logprobs, top_logprobs, i)
                except SamplingParamsError as e:
                    raise APIError(400, str(e)) from None
                out.append(GenerationRequest(f"{request_id}-{len(out)}", ids, params, body.cache_salt, sla))
        if len(out) > self.capacity:
            message = f"the request asks for {len(out)} sequences; at most {self.capacity} fit"
            raise APIError(400, message, "n")
        return out


# ---------------------------------------------------------------------- validation errors

_UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|function-\w+\[.*\]|[A-Z]\w*)$")


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """The 400 for a body the request model rejects (pydantic's `errors()`), naming the first field."""
    # Of a union's alternatives, the one that says what is wrong with the value (not just its type).
    error = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    loc = [str(p) for p in error.get("loc", ()) if p != "body" and not _UNION_TAG.match(str(p))]
    if error.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {error.get('ctx', {}).get('error', '')}")
    if not loc:
        return APIError(400, f"the request body must be a JSON object: {error.get('msg')}")
    field = ".".join(loc)
    return APIError(400, f"{field}: {error.get('msg')}", loc[0])
