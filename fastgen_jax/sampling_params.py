"""Per-request generation settings (host side; no jax).

The names follow DeepSpeed-MII and vLLM so users of either feel at home. Validation happens here, so
every entry point (Python API, batch file, HTTP server) rejects bad values with the same message.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastgen_jax.structured import StructuredOutputs

MAX_TOP_LOGPROBS = 20  # equals sampler.MAX_TOP_LOGPROBS (this module stays free of jax)


class SamplingParamsError(ValueError):
    """A generation setting out of range; the message names the field."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to generate for one request.

    temperature 0 means greedy (so does any temperature below 1e-5, `sampler.MIN_TEMPERATURE`). top_k
    0 and top_p 1.0 mean no filter. `seed` None draws a random seed when the request is added; a
    given seed reproduces the same text whatever else is running.
    `stop` strings may span several tokens; they are matched on the detokenized text and are not
    included in the output. `stop_token_ids` end generation like EOS does (the token is not shown).
    `min_new_tokens` suppresses every stop condition until that many tokens exist. `logprobs` reports
    each generated token's log-probability, `top_logprobs` (<= 20) also that many likeliest tokens.
    `structured_outputs` constrains the output to a JSON schema, regex, choice or grammar
    (`fastgen_jax.structured`); a constrained request still ends at EOS, stop strings or max_new_tokens.
    `speculative` False opts the request out of speculative decoding (its output is the same either
    way; speculation only changes how many tokens a step gets).
    """

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None
    speculative: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        _check_int(self, "max_new_tokens", low=1)
        _check_int(self, "min_new_tokens", low=0)
        _check_int(self, "top_k", low=0)
        _check_int(self, "top_logprobs", low=0)
        if self.top_logprobs > MAX_TOP_LOGPROBS:
            raise SamplingParamsError(f"top_logprobs must be <= {MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            object.__setattr__(self, "logprobs", True)  # alternatives come with the chosen token's
        if self.min_new_tokens > self.max_new_tokens:
            raise SamplingParamsError(
                f"min_new_tokens={self.min_new_tokens} exceeds max_new_tokens={self.max_new_tokens}"
            )
        _check_number(self, "temperature", 0.0, 100.0)
        _check_number(self, "top_p", 0.0, 1.0, low_inclusive=False)
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32
        ):
            raise SamplingParamsError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not isinstance(self.speculative, bool):
            raise SamplingParamsError(f"speculative must be a boolean, got {self.speculative!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingParamsError(f"stop must hold non-empty strings, got {self.stop!r}")
        if self.structured_outputs is not None:
            from fastgen_jax.structured import StructuredOutputs

            if not isinstance(self.structured_outputs, StructuredOutputs):
                raise SamplingParamsError(
                    f"structured_outputs must be a StructuredOutputs, got {self.structured_outputs!r}"
                )

    @functools.cached_property
    def sampler_row(self) -> tuple[float, int, float, int, bool]:
        """(temperature, top_k, top_p, seed, logprobs): what the sampler reads of this request, as one
        step plan row (`engine.batch.SamplingArrays`), worked out once per request. A greedy request
        (temperature 0) has the same row whatever its seed and filters, which the sampler ignores then,
        so a step of greedy requests is recognised by comparing rows."""
        if self.temperature == 0:
            return (0.0, 0, 1.0, 0, self.logprobs)
        return (self.temperature, self.top_k, self.top_p, self.seed, self.logprobs)

    def with_seed(self) -> SamplingParams:
        """A copy whose seed is fixed (drawn at random when none was given)."""
        if self.seed is not None:
            return self
        return dataclasses.replace(self, seed=random.randrange(2**32))


def _check_int(params: SamplingParams, name: str, low: int, high: int = 2**31 - 1) -> None:
    """An integer in [low, high]; the default high keeps it an int32 on the device."""
    value = getattr(params, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SamplingParamsError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise SamplingParamsError(f"{name} must be >= {low}, got {value}")
    if value > high:
        raise SamplingParamsError(f"{name} must be <= {high}, got {value}")


def _check_number(
    params: SamplingParams, name: str, low: float, high: float, low_inclusive: bool = True
) -> None:
    value = getattr(params, name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise SamplingParamsError(f"{name} must be a number, got {value!r}")
    if value > high or value < low or (value == low and not low_inclusive):
        bracket = "[" if low_inclusive else "("
        raise SamplingParamsError(f"{name} must be in {bracket}{low}, {high}], got {value}")
