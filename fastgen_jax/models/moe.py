"""Mixture-of-experts decoder layers: Mixtral, Qwen2-MoE (with its gated shared expert) and Qwen3-MoE
(with Qwen3's q/k norm, switched on by the config).

    h = h + attn(attn_norm(h));  h = h + moe(mlp_norm(h))

Routing, as all three define it: softmax over the router logits in float32, the top
`num_experts_per_tok`, and (Mixtral always, the Qwens when `norm_topk_prob`) those weights renormalised
to sum to one. The experts then run as a grouped matmul over the token rows sorted by expert
(`jax.lax.ragged_dot`), so a step's cost follows the experts its tokens chose, not all of them.

On the CPU, XLA lowers `ragged_dot` to a masked matmul over every expert, slower there than plainly
running every expert (`experts_dense`). So on the CPU a slab whose assignments (rows x top-k) are no
more than the experts (decode steps) gathers just the chosen experts' weights per assignment, and a
larger one runs every expert densely. The rule comes from `scripts/bench_moe.py` (README) and is a
static choice per compiled slab size, so nothing recompiles.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastgen_jax.config import ModelConfig
from fastgen_jax.models.layers import MLP, DecoderLayer, activation

_init = nn.initializers.normal(0.02)
EXPERT_IMPLS = ("ragged", "gathered", "dense")
# CPU: a slab with at most this many (row, expert) assignments per expert gathers expert weights.
CPU_GATHER_MAX_ASSIGNMENTS_PER_EXPERT = 1


def route(router_logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Top-k experts per row: (weights f32[T, k], expert ids i32[T, k]) from router_logits [T, E]."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def experts_ragged(x, experts, w_gate, w_up, w_down, act) -> jax.Array:
    """Outputs [T, k, hidden] of each row's chosen experts, as a grouped matmul over rows sorted by
    expert. x [T, hidden]; experts i32[T, k]; w_gate/w_up [E, hidden, f]; w_down [E, f, hidden]."""
    num_rows, k = experts.shape
    flat = experts.reshape(-1)  # [T * k]
    order = jnp.argsort(flat, stable=True)
    rows = x[order // k]  # [T * k, hidden]: assignment rows grouped by expert
    group_sizes = jnp.bincount(flat, length=w_gate.shape[0]).astype(jnp.int32)
    hidden = act(jax.lax.ragged_dot(rows, w_gate, group_sizes)) * jax.lax.ragged_dot(rows, w_up, group_sizes)
    out = jax.lax.ragged_dot(hidden, w_down, group_sizes)  # [T * k, hidden], sorted
    unsorted = jnp.zeros_like(out).at[order].set(out)
    return unsorted.reshape(num_rows, k, -1)


def experts_gathered(x, experts, w_gate, w_up, w_down, act) -> jax.Array:
    """The same as `experts_ragged`, each assignment gathering its expert's weights (cheap when the
    assignments are fewer than the experts: a decode step on the CPU)."""
    hidden = act(jnp.einsum("td,tkdf->tkf", x, w_gate[experts])) * jnp.einsum(
        "td,tkdf->tkf", x, w_up[experts]
    )
    return jnp.einsum("tkf,tkfd->tkd", hidden, w_down[experts])


def experts_dense(x, experts, w_gate, w_up, w_down, act) -> jax.Array:
    """The same, every expert run on every row and the chosen ones picked: the reference."""
    hidden = act(jnp.einsum("td,edf->tef", x, w_gate)) * jnp.einsum("td,edf->tef", x, w_up)
    every = jnp.einsum("tef,efd->ted", hidden, w_down)  # [T, E, hidden]
    return jnp.take_along_axis(every, experts[:, :, None], axis=1)


EXPERTS = {"ragged": experts_ragged, "gathered": experts_gathered, "dense": experts_dense}


def default_expert_impl(num_rows: int, k: int, num_experts: int) -> str:
    """The formulation for a slab of `num_rows` (a static shape): see the module docstring."""
    if jax.default_backend() != "cpu":
        return "ragged"
    few = num_rows * k <= CPU_GATHER_MAX_ASSIGNMENTS_PER_EXPERT * num_experts
    return "gathered" if few else "dense"


class SparseMoE(nn.Module):
    """Router, routed experts and (when configured) the sigmoid-gated shared expert."""

    config: ModelConfig
    dtype: jnp.dtype
    impl: str | None = None  # one of EXPERT_IMPLS; None: `default_expert_impl`

    @nn.compact
    def __call__(self, x):  # [T, hidden]
        c = self.config
        e, f, hid = c.num_experts, c.moe_intermediate_size, c.hidden_size
        router = self.param("router", _init, (hid, e), self.dtype)
        w_gate = self.param("w_gate", _init, (e, hid, f), self.dtype)
        w_up = self.param("w_up", _init, (e, hid, f), self.dtype)
        w_down = self.param("w_down", _init, (e, f, hid), self.dtype)
        weights, experts = route(x @ router, c.num_experts_per_tok, c.norm_topk_prob)
        impl = self.impl or default_expert_impl(x.shape[0], c.num_experts_per_tok, e)
        out = EXPERTS[impl](x, experts, w_gate, w_up, w_down, activation(c))  # [T, k, hidden]
        out = jnp.einsum("tkd,tk->td", out, weights.astype(out.dtype))
        if c.shared_expert_intermediate_size:
            shared = MLP(c, self.dtype, c.shared_expert_intermediate_size, name="shared")(x)
            gate = self.param("shared_gate", _init, (hid, 1), self.dtype)
            out = out + jax.nn.sigmoid(x @ gate) * shared
        return out


class MoEDecoderLayer(DecoderLayer):
    """The Llama order with the MLP replaced by `SparseMoE`."""

    @nn.nowrap
    def residual_block(self, h, attend):
        h = h + attend(self.norm("attn_norm")(h))
        return h + SparseMoE(self.config, self.dtype, name="moe")(self.norm("mlp_norm")(h))
