"""The engine's limits, resolved once at start-up, and the one check of a request against them.

`EngineLimits` holds what the engine found at run time (how many KV pages fit, the longest sequence,
the vocabulary), not configuration. `check_request` is the pure check of a tokenized request against
them: the engine runs it on `add_request` and the server runs the same function before it queues a
request, so a limit is stated once and a refusal reads the same from both. numpy-free, jax-free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from fastgen_jax.config import ConfigError
from fastgen_jax.engine.sequence import pages_for


class RequestError(ValueError):
    """A request the engine cannot take (empty or too long prompt, bad settings); says why, and
    `param` names the offending input ("prompt", "max_tokens", ...) when there is one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def check_pool_holds_a_sequence(num_pages: int, max_model_len: int, page_size: int) -> None:
    """ConfigError unless `num_pages` (page 0 reserved as scratch) hold one sequence of max_model_len."""
    needed = pages_for(max_model_len, page_size)
    if num_pages - 1 < needed:
        raise ConfigError(
            f"num_pages={num_pages} (page 0 reserved) cannot hold one sequence of max_model_len="
            f"{max_model_len} at page_size={page_size}: need num_pages >= {needed + 1}; raise "
            "num_pages/kv_cache_bytes or lower max_model_len"
        )


@dataclasses.dataclass(frozen=True)
class EngineLimits:
    """Limits found at run time; checked at construction to hold one full-length sequence."""

    num_pages: int  # KV pool pages, page 0 included (a scratch page no sequence owns)
    page_size: int  # tokens per page
    max_model_len: int  # prompt + generated tokens of one sequence
    vocab_size: int  # token ids lie in [0, vocab_size)
    kv_cache_bytes: int  # device memory of the pool

    def __post_init__(self):
        check_pool_holds_a_sequence(self.num_pages, self.max_model_len, self.page_size)


def check_request(limits: EngineLimits, prompt_token_ids: Sequence[int], max_new_tokens: int = 1) -> None:
    """Raises RequestError unless the prompt plus `max_new_tokens` generated tokens fit the engine."""
    check_length(limits.max_model_len, len(prompt_token_ids), max_new_tokens)
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= limits.vocab_size:
        raise RequestError(f"prompt token ids must lie in [0, {limits.vocab_size})", "prompt")


def check_length(max_model_len: int, prompt_tokens: int, max_new_tokens: int) -> None:
    """Raises RequestError unless a prompt of `prompt_tokens` tokens plus `max_new_tokens` generated
    ones fits a sequence of `max_model_len` (`check_request`'s length part; the scheduler's too)."""
    n, max_len = prompt_tokens, max_model_len
    if not n:
        raise RequestError("prompt is empty", "prompt")
    if n >= max_len:
        raise RequestError(
            f"prompt has {n} tokens; the context holds {max_len} (max_model_len) including at least "
            "one generated token",
            "prompt",
        )
    if n + max_new_tokens > max_len:
        raise RequestError(
            f"prompt ({n} tokens) + max_tokens ({max_new_tokens}) exceeds the context of {max_len} "
            "tokens (max_model_len)",
            "max_tokens",
        )
