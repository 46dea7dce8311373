"""Sampling on device, with every setting a per-row array so a new temperature never recompiles.

Each row draws with its own key, `fold_in(PRNGKey(seed), num_generated)`, so a request's text depends
only on its seed and its own logits, never on what else shares the batch.

Temperature 0 means greedy, and so does any temperature below `MIN_TEMPERATURE` (as in vLLM):
dividing logits by a tinier one overflows float32 and would turn the row into NaNs. top_k 0 and top_p
1.0 switch those filters off; the sort they need only runs when some row in the batch asks for a
filter.

Speculative verification (`verify`) runs in the same step: a slot's logit rows hold the positions
of its draft tokens and the one after them; each row samples the token plain decoding would have
sampled there (greedy: the argmax; sampled: the same per-position key), and the slot keeps the
longest run of rows whose sample equals the next draft token, plus the first row that differs (or
the bonus row after the last draft). Whatever the proposer, the output is the one decoding without
speculation gives.

A token bitmask (i32[S, ceil(V/32)], bit j of word i allows token 32 * i + j) constrains rows to what
a grammar allows (`fastgen_jax.structured`); an all-ones row is exactly no constraint, so one program
serves constrained and unconstrained steps alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastgen_jax.models.metadata import SamplingArrays  # the pytree; fields defined in engine.batch

NEG_INF = -jnp.inf
MAX_TOP_LOGPROBS = 20  # alternatives reported per token (OpenAI's limit); a static shape
MIN_TEMPERATURE = 1e-5  # below this a row samples greedily (logits / T stays finite above it)
ARGMAX_CHUNK = 256  # vocabulary entries per chunk of `argmax`'s first pass
# `sample_used`: a step whose used logit rows fit in this many samples only those (its rows lead).
FEW_ROWS = 64


def argmax(logits: jax.Array) -> jax.Array:
    """jnp.argmax(logits f32[S, V], axis=-1) (the first maximal entry; a NaN counts as the maximum),
    as i32[S] computed in two passes: the max of each chunk of ARGMAX_CHUNK entries, then the argmax
    of those maxima and the argmax inside the winning chunk. XLA's CPU argmax over a long row is a
    scalar loop (7 ms at [32, 49152] on a 2-core machine, `scripts/bench_sampler.py`); a plain max
    over chunks vectorises, and what is left is two short argmaxes (0.2 ms)."""
    rows, vocab = logits.shape
    pad = -vocab % ARGMAX_CHUNK
    chunks = jnp.pad(logits, ((0, 0), (0, pad)), constant_values=NEG_INF).reshape(rows, -1, ARGMAX_CHUNK)
    # XLA's vectorised CPU max may drop NaNs, so a chunk holding one says so explicitly.
    peaks = jnp.where(jnp.any(jnp.isnan(chunks), axis=-1), jnp.nan, jnp.max(chunks, axis=-1))  # [S, C]
    best = jnp.argmax(peaks, axis=-1)  # [S]: the first chunk holding the max
    within = jnp.take_along_axis(chunks, best[:, None, None], axis=1)[:, 0]  # [S, ARGMAX_CHUNK]
    return (best * ARGMAX_CHUNK + jnp.argmax(within, axis=-1)).astype(jnp.int32)


def _filter_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Masks (to -inf) tokens outside each row's top-k and nucleus; logits f32[S, V] already scaled."""
    vocab = logits.shape[-1]
    sorted_logits = -jnp.sort(-logits, axis=-1)  # descending, [S, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)  # [S, 1]
    sorted_logits = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], sorted_logits, NEG_INF)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token while the mass strictly before it is below top_p (the first always survives).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    threshold = jnp.maximum(kth, cutoff)
    return jnp.where(logits >= threshold, logits, NEG_INF)


def _draw(scaled: jax.Array, s: SamplingArrays) -> jax.Array:
    """One token per row by inverse-CDF sampling: one uniform per row, not one Gumbel per vocab entry."""
    keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.PRNGKey(seed), step))(s.seed, s.step)
    u = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(keys)  # [S]
    probs = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))  # unnormalised, masked -> 0
    cdf = jnp.cumsum(probs, axis=-1)  # [S, V]
    target = u[:, None] * cdf[:, -1:]
    # The first token whose cumulative mass exceeds the target; never a zero-probability token.
    drawn = jnp.sum(cdf <= target, axis=-1)
    return jnp.minimum(drawn, scaled.shape[-1] - 1)


def _allowed(token_bitmask: jax.Array, tokens: jax.Array) -> jax.Array:
    """Whether token_bitmask i32[S, ceil(V/32)] allows each row's token i32[S]: bool[S]."""
    words = jnp.take_along_axis(token_bitmask, (tokens // 32)[:, None], axis=-1)[:, 0].astype(jnp.uint32)
    return ((words >> (tokens % 32).astype(jnp.uint32)) & 1).astype(bool)


def apply_token_bitmask(logits: jax.Array, token_bitmask: jax.Array) -> jax.Array:
    """Sets to -inf the logits f32[S, V] whose bit in token_bitmask i32[S, ceil(V/32)] is clear."""
    shifts = jnp.arange(32, dtype=jnp.uint32)
    bits = (token_bitmask.astype(jnp.uint32)[:, :, None] >> shifts) & 1  # [S, W, 32]
    allowed = bits.reshape(bits.shape[0], -1)[:, : logits.shape[-1]].astype(bool)  # [S, V]
    return jnp.where(allowed, logits, NEG_INF)


def sample(
    logits: jax.Array, s: SamplingArrays, token_bitmask: jax.Array | None = None
) -> tuple[jax.Array, ...]:
    """Draws one token per row. Returns (token ids i32[S], their log-probabilities f32[S], the most
    likely tokens i32[S, K] and their log-probabilities f32[S, K]), K = min(MAX_TOP_LOGPROBS, V).

    Log-probabilities are of the model's own distribution (before temperature and filters), as
    OpenAI-style APIs report them; they and the top-K are computed only when some row asks (else
    zeros). A batch that is greedy throughout skips the random draw entirely. `token_bitmask` limits
    each row's draw (greedy included) to its allowed tokens; log-probabilities stay the model's.
    """
    logits = logits.astype(jnp.float32)  # [S, V]
    model_logits = logits
    greedy = s.temperature < MIN_TEMPERATURE
    best = argmax(logits)  # of the unmasked logits
    # A greedy row whose unmasked argmax is allowed has it as its masked argmax too (every entry
    # before it is smaller, and masking only lowers entries), so a step of such rows needs neither
    # the bitmask unpacked nor anything but the argmax.
    fast = jnp.all(greedy if token_bitmask is None else greedy & _allowed(token_bitmask, best))

    def general(logits):
        if token_bitmask is not None:  # unpacked only when some row is constrained
            unconstrained = jnp.all(token_bitmask == -1)
            logits = jax.lax.cond(
                unconstrained, lambda x: x, lambda x: apply_token_bitmask(x, token_bitmask), logits
            )
        best = argmax(logits)

        def draw_some(logits):
            scaled = logits / jnp.where(greedy, 1.0, s.temperature)[:, None]
            needs_filter = jnp.any(~greedy & ((s.top_k > 0) | (s.top_p < 1.0)))
            scaled = jax.lax.cond(
                needs_filter, _filter_top_k_top_p, lambda x, *_: x, scaled, s.top_k, s.top_p
            )
            return jnp.where(greedy, best, _draw(scaled, s))

        return jax.lax.cond(jnp.all(greedy), lambda _: best, draw_some, logits)

    tokens = jax.lax.cond(fast, lambda _: best, general, logits).astype(jnp.int32)
    k = min(MAX_TOP_LOGPROBS, logits.shape[-1])

    def with_logprobs(logits):
        lse = jax.nn.logsumexp(logits, axis=-1)  # [S]
        chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
        top_values, top_ids = jax.lax.top_k(logits, k)  # [S, K] each
        return chosen - lse, top_ids.astype(jnp.int32), top_values - lse[:, None]

    def without(logits):
        rows = logits.shape[0]
        return (
            jnp.zeros(rows, jnp.float32),
            jnp.zeros((rows, k), jnp.int32),
            jnp.zeros((rows, k), jnp.float32),
        )

    logprobs, top_ids, top_logprobs = jax.lax.cond(jnp.any(s.logprobs), with_logprobs, without, model_logits)
    return tokens, logprobs, top_ids, top_logprobs


def verify(tokens: jax.Array, s: SamplingArrays) -> tuple[jax.Array, jax.Array]:
    """Accepts draft tokens: tokens i32[L] sampled at every logit row. Returns (num_emitted i32[S]:
    tokens each slot emits, its rows' accepted prefix plus one; last i32[S]: the last of them)."""
    num_rows, num_slots = tokens.shape[0], s.cu_logit_rows.shape[0] - 1
    rows = jnp.arange(num_rows)
    slot = jnp.searchsorted(s.cu_logit_rows, rows, side="right") - 1  # [L]; num_slots past the used rows
    rejected = ((s.draft_token_ids >= 0) & (tokens != s.draft_token_ids)).astype(jnp.int32)
    rejected_before = jnp.cumsum(rejected) - rejected  # [L]: rejections in earlier rows
    first_row = s.cu_logit_rows[jnp.minimum(slot, num_slots - 1)]
    emitted = (rejected_before == rejected_before[jnp.minimum(first_row, num_rows - 1)]) & (slot < num_slots)
    num_emitted = jax.ops.segment_sum(emitted.astype(jnp.int32), slot, num_segments=num_slots)
    last = tokens[jnp.maximum(s.cu_logit_rows[:-1] + num_emitted - 1, 0)]
    return num_emitted, last


def sample_used(
    logits: jax.Array, s: SamplingArrays, token_bitmask: jax.Array | None, used: jax.Array
) -> tuple[jax.Array, ...]:
    """`sample` of logits f32[L, V] whose first `used` rows (i32[], traced) are the step's. Where they
    fit in FEW_ROWS (of more) and the step is plain greedy (every row greedy, no log-probabilities,
    no constraint), only those rows' argmax is taken and the rest of each output is zeros; else
    `sample` over every row. A used row's outputs are the same either way. A prompt step's bucket
    has many logit rows (256 at a 512-token budget) of which its few sequences use a handful: their
    argmax over SmolLM2's 49k vocabulary cost about 20 ms of such a step on a 2-core AVX2 EPYC.
    Only the greedy step takes the short way, so the program holds one more argmax, not a second
    sampler (which added 5 s to start-up's compile)."""
    rows = logits.shape[0]
    if rows <= FEW_ROWS:
        return sample(logits, s, token_bitmask)
    plain = (used <= FEW_ROWS) & jnp.all(s.temperature < MIN_TEMPERATURE) & ~jnp.any(s.logprobs)
    if token_bitmask is not None:
        plain &= jnp.all(token_bitmask == -1)
    k = min(MAX_TOP_LOGPROBS, logits.shape[-1])

    def few(logits):
        tokens = jnp.pad(argmax(logits[:FEW_ROWS].astype(jnp.float32)), (0, rows - FEW_ROWS))
        zeros = (
            jnp.zeros(rows, jnp.float32),
            jnp.zeros((rows, k), jnp.int32),
            jnp.zeros((rows, k), jnp.float32),
        )
        return tokens, *zeros

    return jax.lax.cond(plain, few, lambda x: sample(x, s, token_bitmask), logits)
