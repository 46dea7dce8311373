"""Guided decoding on the host: compiled grammars (a bounded cache), one matcher per sequence, masks.

The engine asks for a mask only when some sampled row of the step is constrained (`bitmask`), so an
unconstrained step costs nothing here. A mask is i32[rows, ceil(V/32)], bit j of word i allowing
token 32 * i + j (llguidance's layout); rows with no constraint stay all ones, which the device
sampler treats exactly like no mask. After the device samples, `advance` feeds each constrained
sequence its token. A constrained sequence therefore needs step N's token on the host before step
N+1's mask can be built: with overlapped scheduling it must sit out the step built while N runs.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Sequence

import llguidance
import llguidance.numpy
import numpy as np

from fastgen_jax.structured.params import StructuredOutputs, StructuredOutputsError

log = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled grammars kept (LRU); each is a matcher in its initial state


class GuidedDecoder:
    """Compiles constraints for one tokenizer and vocabulary and tracks the constrained sequences.

    `compile` may run on any thread (the server calls it while building a request, off the event
    loop); `add`, `bitmask`, `advance` and `remove` run on the engine's thread.
    """

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int]):
        self.vocab_size = vocab_size  # the logits' width (the model's vocabulary)
        self.words = -(-vocab_size // 32)  # int32 words per mask row
        self._tokenizer_json, self._eos = tokenizer_json, list(eos_token_ids)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._cache: collections.OrderedDict[StructuredOutputs, llguidance.LLMatcher] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()
        self._matchers: dict[str, llguidance.LLMatcher] = {}
        self._executor: llguidance.LLExecutor | None = None

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """Built on first use (about 0.2 s for a 50k vocabulary)."""
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(
                    self._tokenizer_json, n_vocab=self.vocab_size, eos_token=self._eos
                )
            return self._ll_tokenizer

    # ------------------------------------------------------------------ compiling (any thread)

    def compile(self, spec: StructuredOutputs) -> llguidance.LLMatcher:
        """The matcher of `spec` in its initial state (shared: copy it before use); raises
        StructuredOutputsError naming `spec.param` when the constraint does not compile."""
        with self._lock:
            matcher = self._cache.get(spec)
            if matcher is not None:
                self._cache.move_to_end(spec)
                return matcher
        matcher = self._compile(spec)
        with self._lock:
            self._cache[spec] = matcher
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher

    def _compile(self, spec: StructuredOutputs) -> llguidance.LLMatcher:
        try:
            grammar = spec.to_grammar()
        except ValueError as error:
            raise StructuredOutputsError(f"{spec.param or spec.kind}: {error}", spec.param) from None
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            message = " ".join(matcher.get_error().split())[:500]
            raise StructuredOutputsError(f"{spec.param or spec.kind}: {message}", spec.param)
        return matcher

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    # ------------------------------------------------------------------ sequences (engine thread)

    def add(self, request_id: str, spec: StructuredOutputs) -> None:
        self._matchers[request_id] = self.compile(spec).deep_copy()

    def remove(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._matchers

    def __len__(self) -> int:
        return len(self._matchers)

    def bitmask(self, rows: Sequence[tuple[int, str]], num_rows: int) -> np.ndarray:
        """i32[num_rows, words]: all ones but for `rows`, (row, request id) pairs of constrained
        sequences, which get their matcher's next-token mask."""
        mask = np.full((num_rows, self.words), -1, np.int32)
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        pairs = [(self._matchers[request_id], row) for row, request_id in rows]
        llguidance.numpy.fill_next_token_bitmask_par(self._executor, pairs, mask)
        return mask

    def advance(self, request_id: str, token_id: int) -> bool:
        """Feeds a sampled token to the sequence's matcher; False if it refused it (then the matcher
        is in its error state and allows only EOS from here on)."""
        matcher = self._matchers.get(request_id)
        if matcher is None:
            return True
        if matcher.consume_token(token_id):
            return True
        log.warning("request %s: the grammar refused token %d: %s", request_id, token_id, matcher.get_error())
        return False

    def is_finished(self, request_id: str) -> bool:
        """The grammar is complete: the sequence may only end (its mask allows EOS alone)."""
        matcher = self._matchers.get(request_id)
        return matcher is not None and matcher.is_stopped()
