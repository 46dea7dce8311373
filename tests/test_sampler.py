"""On-device sampling: greedy, temperature, top-k, top-p, per-row seeds, log-probabilities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastgen_jax import sampler
from fastgen_jax.sampler import SamplingArrays, argmax, sample, sample_used

VOCAB = 50


def settings(rows, **values) -> SamplingArrays:
    """Greedy settings for `rows` rows, then the given fields overwritten."""
    arrays = SamplingArrays.greedy(rows)
    for name, value in values.items():
        getattr(arrays, name)[:] = value
    return arrays


def run(logits, **values):
    tokens, logprobs, _, _ = jax.jit(sample)(jnp.asarray(logits), settings(logits.shape[0], **values))
    return np.asarray(tokens), np.asarray(logprobs)


def random_logits(rows, seed=0):
    return np.random.default_rng(seed).normal(size=(rows, VOCAB)).astype(np.float32) * 3


def test_temperature_zero_is_argmax_with_its_logprob():
    logits = random_logits(8)
    tokens, logprobs = run(logits, logprobs=[True] + [False] * 7)
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    expected = jax.nn.log_softmax(logits, axis=-1)[np.arange(8), tokens]
    np.testing.assert_allclose(logprobs, expected, rtol=1e-6, atol=1e-6)


def test_logprobs_are_skipped_when_no_row_asks():
    _, logprobs = run(random_logits(4))
    np.testing.assert_array_equal(logprobs, np.zeros(4, np.float32))


def test_top_k_one_is_greedy_at_any_temperature():
    logits = random_logits(16, seed=1)
    tokens, _ = run(logits, temperature=5.0, top_k=1, seed=np.arange(16))
    np.testing.assert_array_equal(tokens, logits.argmax(-1))


def test_top_k_draws_only_from_the_k_best():
    logits = np.tile(random_logits(1, seed=2), (512, 1))
    tokens, _ = run(logits, temperature=10.0, top_k=3, seed=np.arange(512))
    best3 = set(np.argsort(-logits[0])[:3].tolist())
    assert set(tokens.tolist()) == best3


def test_top_p_draws_only_from_the_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05] + [0.0] * (VOCAB - 4)) + 1e-9
    logits = np.tile(np.log(probs / probs.sum()).astype(np.float32), (512, 1))
    tokens, _ = run(logits, temperature=1.0, top_p=0.7, seed=np.arange(512))
    # Mass before token 1 is 0.5 < 0.7 (kept); before token 2 it is 0.8 (dropped).
    assert set(tokens.tolist()) == {0, 1}


def test_same_seed_and_step_give_the_same_token_whatever_the_other_rows():
    logits = random_logits(6, seed=3)
    alone, _ = run(logits[:1], temperature=1.0, seed=1234, step=7)
    crowd_logits = np.concatenate([random_logits(5, seed=4), logits[:1]])
    in_crowd, _ = run(
        crowd_logits,
        temperature=[0.5, 1.0, 0.0, 2.0, 1.0, 1.0],
        top_k=[0, 5, 0, 0, 3, 0],
        seed=[1, 2, 3, 4, 5, 1234],
        step=[0, 0, 0, 0, 0, 7],
    )
    assert in_crowd[-1] == alone[0]


def test_different_steps_draw_different_tokens():
    logits = np.zeros((64, VOCAB), np.float32)  # uniform
    tokens, _ = run(logits, temperature=1.0, seed=99, step=np.arange(64))
    assert len(set(tokens.tolist())) > 20


def test_new_settings_do_not_recompile():
    jitted = jax.jit(lambda logits, settings: sample(logits, settings))  # a cache of its own
    logits = jnp.asarray(random_logits(4))
    for temperature, top_k, top_p in [(0.0, 0, 1.0), (0.7, 10, 0.9), (1.3, 0, 0.5)]:
        jitted(logits, settings(4, temperature=temperature, top_k=top_k, top_p=top_p))
    assert jitted._cache_size() == 1


def test_top_logprobs_are_the_largest_entries_of_log_softmax():
    logits = random_logits(3)
    arrays = settings(3, logprobs=[True, False, True])
    tokens, logprobs, top_ids, top_logprobs = jax.jit(sample)(jnp.asarray(logits), arrays)
    log_softmax = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1))
    order = np.argsort(-log_softmax, axis=-1)[:, :20]
    np.testing.assert_array_equal(np.asarray(top_ids), order)
    np.testing.assert_allclose(
        np.asarray(top_logprobs), np.take_along_axis(log_softmax, order, -1), atol=1e-6
    )
    assert np.asarray(top_ids)[0, 0] == np.asarray(tokens)[0]  # greedy: the best is the one drawn
    np.testing.assert_allclose(np.asarray(logprobs)[0], np.asarray(top_logprobs)[0, 0], atol=1e-6)


def test_tiny_temperatures_are_greedy_and_every_row_stays_finite():
    # logits / 1e-30 overflows float32; below MIN_TEMPERATURE a row is treated as greedy.
    temperatures = [1e-37, 1e-30, 1e-12, 9.99e-6, 1e-5, 1e-4, 1.0, 2.0]
    logits = random_logits(len(temperatures), seed=3) * 1000  # large logits make overflow likelier
    for top_p in (1.0, 0.9):
        tokens, logprobs = run(
            logits, temperature=temperatures, top_p=top_p, seed=np.arange(8), logprobs=True
        )
        np.testing.assert_array_equal(tokens[:4], logits[:4].argmax(-1))
        assert ((tokens >= 0) & (tokens < VOCAB)).all(), tokens
        assert np.isfinite(logprobs).all(), logprobs
        np.testing.assert_array_equal(tokens[4:6], logits[4:6].argmax(-1))  # 1e-5 with gaps of ~1000


@pytest.mark.parametrize("vocab", [1, 50, 256, 257, 49152])
def test_argmax_is_jnp_argmax_with_ties_nans_and_infinities(vocab):
    rng = np.random.default_rng(vocab)
    logits = rng.integers(-3, 3, size=(6, vocab)).astype(np.float32)  # many ties
    logits[1] = -np.inf
    logits[2, rng.integers(vocab)] = np.nan
    logits[3, -1] = np.inf
    logits[4, :] = 7.0
    np.testing.assert_array_equal(jax.jit(argmax)(logits), jnp.argmax(jnp.asarray(logits), axis=-1))


def pack(allowed):
    """A token bitmask i32[S, ceil(V/32)] from bool[S, V]."""
    rows, vocab = allowed.shape
    bits = np.zeros((rows, -(-vocab // 32) * 32), np.uint64)
    bits[:, :vocab] = allowed
    words = (bits.reshape(rows, -1, 32) << np.arange(32, dtype=np.uint64)).sum(-1)
    return words.astype(np.uint32).view(np.int32)


def test_greedy_rows_under_a_bitmask_take_the_best_allowed_token():
    """Rows whose unmasked argmax is allowed, rows where it is not, and unconstrained rows."""
    logits = random_logits(6, seed=7)
    allowed = np.ones_like(logits, bool)
    allowed[1, logits[1].argmax()] = False  # the best is banned: the second best wins
    allowed[2, np.argsort(-logits[2])[:5]] = False
    allowed[3, :] = False
    allowed[3, 11] = True  # only one token allowed
    tokens, *_ = jax.jit(sample)(jnp.asarray(logits), settings(6), jnp.asarray(pack(allowed)))
    np.testing.assert_array_equal(tokens, np.where(allowed, logits, -np.inf).argmax(-1))


def test_sampled_rows_under_a_bitmask_draw_only_allowed_tokens():
    logits = np.tile(random_logits(1, seed=8), (256, 1))
    allowed = np.zeros_like(logits, bool)
    allowed[:, [3, 17, 40]] = True
    mask = jnp.asarray(pack(allowed))
    tokens, *_ = jax.jit(sample)(
        jnp.asarray(logits), settings(256, temperature=5.0, seed=np.arange(256)), mask
    )
    assert set(np.asarray(tokens).tolist()) == {3, 17, 40}


@pytest.mark.parametrize("used", [1, 5, 6, 16])
@pytest.mark.parametrize("kind", ["greedy", "sampled", "logprobs", "masked"])
def test_sampling_the_used_rows_only_gives_their_tokens(monkeypatch, used, kind):
    """`sample_used` over a bucket of 16 rows, 5 of which fit its short way (a plain greedy step):
    each used row's outputs are `sample`'s, whichever way the step takes."""
    monkeypatch.setattr(sampler, "FEW_ROWS", 5)
    rows = 16
    logits = jnp.asarray(random_logits(rows, seed=9))
    values = dict(seed=np.arange(rows), step=7)
    if kind == "sampled":
        values |= dict(temperature=np.where(np.arange(rows) % 2, 2.0, 0.0), top_k=3)
    if kind == "logprobs":
        values |= dict(logprobs=True)
    s = settings(rows, **values)
    mask = jnp.full((rows, -(-VOCAB // 32)), -1, jnp.int32)  # no constraint, as the engine sends it
    if kind == "masked":
        allowed = np.ones((rows, VOCAB), bool)
        allowed[np.arange(rows), np.asarray(logits).argmax(-1)] = False  # each row's best banned
        mask = jnp.asarray(pack(allowed))
    whole = jax.jit(sample)(logits, s, mask)
    few = jax.jit(sample_used)(logits, s, mask, jnp.int32(used))
    for a, b in zip(whole, few, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(b)[:used], np.asarray(a)[:used], rtol=1e-6, atol=1e-6)
    if kind == "greedy" and used <= 5:  # the short way: the rows past FEW_ROWS are zeros
        np.testing.assert_array_equal(np.asarray(few[0])[5:], 0)
