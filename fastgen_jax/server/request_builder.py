"""OpenAI request bodies -> engine requests plus the formatter of their answer.

The server's handlers and the offline batch job (`fastgen_jax.batch`) both go through a
`RequestBuilder`, so a body is checked the same way (same fields, limits and error messages) and its
answer rendered by the same `Formatter`, whether it came over HTTP or from a batch file.

Structured outputs are compiled here (the server builds requests on a worker thread, so a schema is
never compiled on the event loop), through the engine's grammar cache, so a bad one is a 400.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from typing import Any

from fastgen_jax.hf_config import ARCHITECTURES
from fastgen_jax.llm_engine import LLMEngine, RequestError
from fastgen_jax.reasoning import prompt_opens_reasoning, resolve_reasoning_parser
from fastgen_jax.sampling_params import SamplingParamsError
from fastgen_jax.server.async_engine import GenerationRequest
from fastgen_jax.server.guided_fields import structured_outputs
from fastgen_jax.server.openai_format import ChatFormatter, CompletionFormatter, Formatter
from fastgen_jax.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    TokenizeRequest,
    template_messages,
)
from fastgen_jax.structured import StructuredOutputs, StructuredOutputsError
from fastgen_jax.structured import tools as tool_calls
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
    prompt is tokenized. `reasoning_parser` (`fastgen_jax.reasoning`; auto: by the model's family) splits
    a thinking model's chat answers into reasoning_content and content."""

    def __init__(
        self,
        engine: LLMEngine,
        model_name: str,
        capacity: int,
        max_seqs_per_request: int | None = None,
        reasoning_parser: str = "auto",
    ):
        self.engine, self.model_name, self.capacity = engine, model_name, capacity
        self.max_seqs_per_request = min(max_seqs_per_request or capacity, capacity)
        self.tokenizer = engine.tokenizer
        model_type = ARCHITECTURES[engine.model_config.architecture][1]
        self.reasoning = resolve_reasoning_parser(reasoning_parser, model_type)

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

    def encode_chat(
        self, body: ChatCompletionRequest | TokenizeRequest, kwargs: dict, messages: list | None = None
    ) -> list[int]:
        """The chat prompt's ids; `messages` (default: the body's) as the template gets them."""
        messages = template_messages(body.messages) if messages is None else messages
        try:
            return self.tokenizer.encode_chat(messages, body.add_generation_prompt, **kwargs)
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
        spec = self.compile(structured_outputs, body)
        prompts = self._completion_prompts(body.prompt)
        logprobs, request_id = body.logprobs is not None, f"cmpl-{uuid.uuid4().hex}"
        requests = self._requests(
            request_id, body, prompts, body.max_tokens, logprobs, body.logprobs or 0, "prompt", spec
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
        spec = self.compile(structured_outputs, body)
        tools, choice = self.compile(_chat_tools, body)
        if choice not in ("none", "auto"):
            if spec is not None:
                raise APIError(
                    400, f"tool_choice {choice!r} cannot be combined with {spec.param}", spec.param
                )
            spec = self.compile(lambda _: tool_calls.call_constraint(tools, choice), body)
        messages, kwargs = self._chat_messages(body, tools, choice)
        ids = self.encode_chat(body, kwargs, messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        requests = self._requests(
            request_id, body, [ids], max_tokens, body.logprobs, body.top_logprobs or 0, "messages", spec
        )
        parser = None if choice == "none" else "hermes" if choice == "auto" else "json"
        formatter = ChatFormatter(
            request_id,
            self.model_name,
            self.tokenizer,
            [len(ids)],
            body.n,
            body.logprobs,
            tool_parser=parser,
            reasoning=self.reasoning,
            in_reasoning=self._opens_reasoning(ids),
        )
        return PreparedRequest(requests, formatter)

    def compile(self, read, body):
        """`read(body)`, a StructuredOutputs (compiled now, through the engine's cache, so that a
        constraint that does not compile is a 400 naming its field) or anything else."""
        try:
            value = read(body)
            if isinstance(value, StructuredOutputs):
                self.engine.guided.compile(value)
            return value
        except StructuredOutputsError as e:
            raise APIError(400, str(e), e.param) from None

    def _chat_messages(self, body: ChatCompletionRequest, tools: list, choice: str) -> tuple[list, dict]:
        """The conversation and variables for the template: the tools go to a template that takes
        them; for one that does not, they and the tool turns are written out by hand
        (`tools.render_without_template_tools`)."""
        messages, kwargs = template_messages(body.messages), dict(body.chat_template_kwargs or {})
        if self.tokenizer.takes_tools:
            if tools and choice != "none":
                kwargs["tools"] = [t.signature() for t in tools]
            return messages, kwargs
        return tool_calls.render_without_template_tools(messages, tools, choice), kwargs

    def _opens_reasoning(self, prompt_ids: list[int]) -> bool:
        """Whether the rendered chat prompt leaves the model inside its reasoning block."""
        if self.reasoning is None:
            return False
        return prompt_opens_reasoning(self.reasoning, self.tokenizer.decode(prompt_ids[-8:]))

    def _completion_prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.encode(prompt, "prompt")]
        if not prompt:
            raise APIError(400, "prompt is empty", "prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        return [self.encode(p, "prompt") if isinstance(p, str) else list(p) for p in prompt]

    def _requests(
        self,
        request_id: str,
        body,
        prompts: list[list[int]],
        max_tokens: int | None,
        logprobs: bool,
        top_logprobs: int,
        param: str,
        spec: StructuredOutputs | None = None,
    ) -> list[GenerationRequest]:
        config = self.engine.engine_config
        sla = body.request_sla(config.sla_prompt_rate, config.sla_token_rate)
        out = []
        for ids in prompts:
            tokens = self.check_prompt(ids, max_tokens, param)
            for i in range(body.n):
                try:
                    params = body.sampling_params(tokens, logprobs, top_logprobs, i)
                    params = dataclasses.replace(params, structured_outputs=spec)
                except SamplingParamsError as e:
                    raise APIError(400, str(e)) from None
                out.append(GenerationRequest(f"{request_id}-{len(out)}", ids, params, body.cache_salt, sla))
        if len(out) > self.capacity:
            message = f"the request asks for {len(out)} sequences; at most {self.capacity} fit"
            raise APIError(400, message, "n")
        return out


def _chat_tools(body: ChatCompletionRequest) -> tuple[list[tool_calls.Tool], str]:
    tools = tool_calls.parse_tools(body.tools or [])
    return tools, tool_calls.parse_tool_choice(body.tool_choice, tools)


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
