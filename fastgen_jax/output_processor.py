"""Turns sampled token ids into what a user sees: text deltas, stop handling and finish reasons.

Host side, no jax. One `RequestState` per request owns an incremental detokenizer and the stop
conditions: EOS (unless ignore_eos), stop token ids, stop strings matched on the detokenized text (so
a stop string may span tokens), max_new_tokens and the engine's max_model_len. While stop strings are
set, the last `len(longest stop) - 1` characters are held back from the stream, because they may turn
out to be the start of a stop string that must not be shown.
"""

from __future__ import annotations

import dataclasses

from fastgen_jax.engine.timing import RequestTiming
from fastgen_jax.sampling_params import SamplingParams
from fastgen_jax.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclasses.dataclass
class RequestOutput:
    """What one engine step produced for one request (deltas) plus its totals so far."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    prompt_length: int
    generated_length: int
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[list[tuple[int, float]]] | None = None  # per new token: (id, logprob)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (not computed)
    time: float = 0.0  # time.monotonic() when the engine had these tokens (or the abort): the one clock
    # The engine's record of the request: arrival, every token's time, SLA state, slack at admission
    # (the object itself, updated as the request runs: read it on the engine thread).
    timing: RequestTiming | None = None


class RequestState:
    """A request's output side: detokenizer, stop conditions and what was handed out. Its tokens live
    in the engine's `Sequence` only; this counts them."""

    def __init__(
        self,
        request_id: str,
        prompt_length: int,
        params: SamplingParams,
        tokenizer: Tokenizer,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
    ):
        self.request_id = request_id
        self.prompt_length = prompt_length
        self.params = params
        self.max_model_len = max_model_len
        self.eos_token_ids = () if params.ignore_eos else tuple(eos_token_ids)
        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=params.skip_special_tokens)
        self.num_generated = 0
        # Detokenized text not yet handed out: at most the held-back tail between steps, so a step
        # costs O(its own text), never O(everything generated so far).
        self._unsent = ""
        self.finish_reason: str | None = None
        self.num_cached_tokens = 0  # set by the engine once the prompt is admitted
        self._hold_back = max((len(s) for s in params.stop), default=1) - 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add_token(
        self, token_id: int, logprob: float, top: list[tuple[int, float]] | None = None
    ) -> RequestOutput:
        """Processes one sampled token (with its top alternatives, if asked) and returns the delta a
        client should see."""
        self.num_generated += 1
        n = self.num_generated
        may_stop = n > self.params.min_new_tokens
        if may_stop and (token_id in self.eos_token_ids or token_id in self.params.stop_token_ids):
            self.finish_reason = "stop"
        else:
            self._add_text(self.detokenizer.add(token_id), may_stop)
        if self.finish_reason is None and (
            n >= self.params.max_new_tokens or self.prompt_length + n >= self.max_model_len
        ):
            self.finish_reason = "length"
            self._unsent += self.detokenizer.flush()
        output = self._output([token_id], [logprob] if self.params.logprobs else None)
        if self.params.top_logprobs:
            output.new_top_logprobs = [top or []]
        return output

    def add_tokens(
        self,
        token_ids: list[int],
        logprobs: list[float],
        tops: list[list[tuple[int, float]] | None] | None = None,
    ) -> RequestOutput:
        """`add_token` for several tokens of one step (speculative decoding), as one delta. Tokens
        after the one that finishes the request are dropped, so stops and lengths stay exact."""
        if len(token_ids) == 1:
            return self.add_token(token_ids[0], logprobs[0], tops[0] if tops else None)
        outputs = []
        for i, token_id in enumerate(token_ids):
            outputs.append(self.add_token(token_id, logprobs[i], tops[i] if tops else None))
            if self.finished:
                break
        merged = outputs[-1]
        merged.new_token_ids = [t for o in outputs for t in o.new_token_ids]
        merged.new_text = "".join(o.new_text for o in outputs)
        if merged.new_logprobs is not None:
            merged.new_logprobs = [v for o in outputs for v in o.new_logprobs]
        if merged.new_top_logprobs is not None:
            merged.new_top_logprobs = [v for o in outputs for v in o.new_top_logprobs]
        return merged

    def abort(self) -> RequestOutput:
        self.finish_reason = "abort"
        return self._output([], [] if self.params.logprobs else None)

    def _add_text(self, delta: str, may_stop: bool) -> None:
        start = max(0, len(self._unsent) - self._hold_back)  # a match starts in the held-back tail or later
        self._unsent += delta
        if not (may_stop and self.params.stop):
            return
        hits = [i for s in self.params.stop if (i := self._unsent.find(s, start)) >= 0]
        if hits:
            self._unsent = self._unsent[: min(hits)]
            self.finish_reason = "stop"

    def _output(self, token_ids: list[int], logprobs: list[float] | None) -> RequestOutput:
        end = len(self._unsent) if self.finished else max(0, len(self._unsent) - self._hold_back)
        new_text, self._unsent = self._unsent[:end], self._unsent[end:]
        return RequestOutput(
            request_id=self.request_id,
            new_token_ids=token_ids,
            new_text=new_text,
            prompt_length=self.prompt_length,
            generated_length=self.num_generated,
            finished=self.finished,
            finish_reason=self.finish_reason,
            new_logprobs=logprobs,
            num_cached_tokens=self.num_cached_tokens,
        )
