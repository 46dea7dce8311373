"""Mixture of experts: routing as the models define it, and every expert formulation equal to running
all experts densely and weighting the chosen ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastgen_jax.models.moe import EXPERT_IMPLS, EXPERTS, default_expert_impl, route

E, HID, F, K = 6, 32, 24, 2


def weights(seed=0):
    rng = np.random.default_rng(seed)
    return [
        jnp.asarray(rng.standard_normal(s, np.float32) * 0.3) for s in ((E, HID, F), (E, HID, F), (E, F, HID))
    ]


def dense_reference(x, router_logits, w_gate, w_up, w_down, k, normalize):
    """Every expert on every row, weighted by the renormalised top-k softmax (numpy, float64)."""
    x, logits = np.asarray(x, np.float64), np.asarray(router_logits, np.float64)
    g, u, d = (np.asarray(w, np.float64) for w in (w_gate, w_up, w_down))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        top = np.argsort(-probs[t])[:k]
        w = probs[t, top] / (probs[t, top].sum() if normalize else 1.0)
        for e, we in zip(top, w, strict=True):
            h = x[t] @ g[e]
            out[t] += we * (((h / (1 + np.exp(-h))) * (x[t] @ u[e])) @ d[e])
    return out


@pytest.mark.parametrize("impl", EXPERT_IMPLS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("num_rows", [1, 5, 64])
def test_routed_experts_equal_the_dense_all_experts_reference(impl, normalize, num_rows):
    rng = np.random.default_rng(num_rows)
    x = jnp.asarray(rng.standard_normal((num_rows, HID), np.float32))
    logits = jnp.asarray(rng.standard_normal((num_rows, E), np.float32) * 3)
    w_gate, w_up, w_down = weights()
    routing, experts = route(logits, K, normalize)
    per_choice = jax.jit(EXPERTS[impl], static_argnums=5)(x, experts, w_gate, w_up, w_down, jax.nn.silu)
    ours = np.asarray(jnp.einsum("tkd,tk->td", per_choice, routing))
    expected = dense_reference(x, logits, w_gate, w_up, w_down, K, normalize)
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=1e-4)


def test_route_picks_the_largest_probabilities_and_renormalises():
    logits = jnp.asarray([[0.0, 2.0, 1.0, -1.0]])
    w, e = route(logits, 2, normalize=True)
    assert e.tolist() == [[1, 2]]
    np.testing.assert_allclose(np.asarray(w), [[np.e / (np.e + 1), 1 / (np.e + 1)]], rtol=1e-6)
    w_raw, _ = route(logits, 2, normalize=False)
    np.testing.assert_allclose(
        np.asarray(w_raw).sum(), (np.e**2 + np.e) / np.exp([0, 2, 1, -1]).sum(), rtol=1e-6
    )


def test_formulation_choice_is_static_per_slab_size():
    if jax.default_backend() != "cpu":
        assert default_expert_impl(1, 2, 8) == default_expert_impl(512, 2, 8) == "ragged"
    else:
        assert default_expert_impl(1, 2, 8) == "gathered"
        assert default_expert_impl(4, 2, 8) == "gathered"
        assert default_expert_impl(5, 2, 8) == default_expert_impl(512, 2, 8) == "dense"
