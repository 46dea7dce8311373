"""The OpenAI wire format: request bodies (pydantic), their sampling settings, and error bodies.

Field names and defaults follow OpenAI's API (temperature 1.0, completions `max_tokens` 16), with
vLLM's extensions `top_k`, `min_tokens`, `ignore_eos`, `stop_token_ids` and `skip_special_tokens`, and
its structured-output fields (`guided_*`, `structured_outputs`; read by `guided_fields`).
Ranges are checked here so that a 400 names the field as the client spelled it.

Every list and string whose length decides how much work a request makes has a bound here, checked by
pydantic before anything else runs (a list over its bound costs one error, not one per item; lists of
token ids also stop at their first bad item): see the `MAX_*` constants, which the README lists. Text
fields refuse lone UTF-16 surrogates ("\ud800" in JSON), which no tokenizer can encode.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from fastgen_jax.engine.sla_policy import RequestSLA
from fastgen_jax.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from fastgen_jax.structured.params import MAX_CHOICES


class APIError(Exception):
    """An error the client caused (or must be told of); becomes an OpenAI-style JSON body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


MAX_PROMPTS = 64  # prompts in one completions request (a list of strings or of token-id lists)
MAX_PROMPT_TOKEN_IDS = 1 << 17  # token ids in one prompt (or one /detokenize call)
MAX_MESSAGES = 1024  # chat messages in one request
MAX_CONTENT_PARTS = 256  # text parts in one message
MAX_STOP_STRINGS = 16  # OpenAI allows 4; vLLM does not limit them
MAX_STOP_CHARS = 256  # characters in one stop string
MAX_STOP_TOKEN_IDS = 64
MAX_DICT_ITEMS = 64  # entries in chat_template_kwargs, logit_bias, response_format; items in tools
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")  # OpenAI's set


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds a lone UTF-16 surrogate (not valid Unicode)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
TokenIds = Annotated[list[int], Field(max_length=MAX_PROMPT_TOKEN_IDS, fail_fast=True)]
StopString = Annotated[Text, Field(max_length=MAX_STOP_CHARS)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    """Settings shared by completions and chat completions."""

    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Annotated[dict[str, float], Field(max_length=MAX_DICT_ITEMS)] | None = None
    user: str | None = None
    # vLLM's: requests share cached prompt KV only with requests of the same salt (tenant isolation)
    cache_salt: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    # extensions (vLLM's names)
    top_k: Annotated[int, Field(ge=-1, le=2**31 - 1)] = 0
    min_tokens: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_STOP_TOKEN_IDS, fail_fast=True)] | None = None
    skip_special_tokens: bool = True
    # structured outputs: OpenAI's response_format, vLLM's guided_* and structured_outputs
    response_format: Annotated[dict[str, Any], Field(max_length=MAX_DICT_ITEMS)] | None = None
    guided_json: Annotated[dict[str, Any], Field(max_length=MAX_DICT_ITEMS)] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: Annotated[list[Text], Field(max_length=MAX_CHOICES)] | None = None
    guided_grammar: Text | None = None
    structured_outputs: Annotated[dict[str, Any], Field(max_length=MAX_DICT_ITEMS)] | None = None
    # the request's own SLA (a premium tenant's tighter one): served by --policy=sla, judged in /metrics
    priority: Annotated[int, Field(ge=-(2**31), le=2**31 - 1)] = 0  # vLLM's: lower is served earlier
    sla_prompt_rate: Annotated[float, Field(gt=0.0, le=1e9)] | None = None  # first token within prompt / P s
    sla_token_rate: Annotated[float, Field(gt=0.0, le=1e9)] | None = None  # token-gap EMA within 1 / R s
    # False: this request never speculates under --speculative (its output is the same either way)
    speculative: bool = True

    def check_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported (only 0)", name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")
        if isinstance(self.stop, list) and not all(self.stop):
            raise APIError(400, "stop must not contain empty strings", "stop")
        if self.stop == "":
            raise APIError(400, "stop must not be an empty string", "stop")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")

    def sampling_params(
        self, max_tokens: int, logprobs: bool, top_logprobs: int = 0, index: int = 0
    ) -> SamplingParams:
        """Engine settings for choice `index` (a seed gives each choice its own stream)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        seed = None if self.seed is None else (self.seed + index) % 2**32
        if self.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens={self.min_tokens} exceeds max_tokens={max_tokens}", "min_tokens")
        return SamplingParams(
            max_new_tokens=max_tokens,
            min_new_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=max(self.top_k, 0),
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=seed,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            speculative=self.speculative,
        )

    def request_sla(self, prompt_rate: float, token_rate: float) -> RequestSLA | None:
        """The request's own SLA (the server's rates where it sets none), None when it sets nothing."""
        if self.priority == 0 and self.sla_prompt_rate is None and self.sla_token_rate is None:
            return None
        return RequestSLA(
            self.sla_prompt_rate or prompt_rate, self.sla_token_rate or token_rate, self.priority
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: (
        Text
        | Annotated[list[Text], Field(max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS)]
    )
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    suffix: str | None = None
    best_of: int | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if self.best_of not in (None, self.n):
            raise APIError(400, "best_of is not supported (leave it unset or equal to n)", "best_of")


# A request may set template variables (e.g. enable_thinking), never the template or its inputs.
_RESERVED_TEMPLATE_KEYS = {"chat_template", "messages", "add_generation_prompt", "tools", "documents", "self"}


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal[CHAT_ROLES]
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=MAX_DICT_ITEMS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: Annotated[dict[str, Any], Field(max_length=MAX_DICT_ITEMS)] | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        for key, value in (self.chat_template_kwargs or {}).items():
            if key in _RESERVED_TEMPLATE_KEYS or not key.isidentifier():
                raise APIError(400, f"chat_template_kwargs may not set {key!r}", "chat_template_kwargs")
            if not isinstance(value, str | int | float | bool | None):
                raise APIError(
                    400, f"chat_template_kwargs.{key} must be a plain value", "chat_template_kwargs"
                )


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(max_length=MAX_MESSAGES)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: TokenIds


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages for the chat template (which drops None fields itself): text parts joined."""
    out = []
    for m in messages:
        d = m.model_dump()
        if isinstance(m.content, list):
            d["content"] = "".join(p.text for p in m.content)
        out.append(d)
    return out
