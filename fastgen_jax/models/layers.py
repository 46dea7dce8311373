"""Building blocks every family shares: norms, RoPE, paged attention, the gated MLP, and the causal LM
shell that embeds tokens, runs the scanned layer stack and projects to the vocabulary.

One call processes a flat token slab: T rows of token ids from any number of sequences, each row with
its position and the KV slot it writes. Every layer writes the rows' keys and values into the shared
page pool first, then attends through the pages, so prompt chunks and decode tokens of many sequences
share one pass. Only the rows listed in `logits_indices` reach the vocabulary projection.

Layers are stacked along a leading axis and run under `nn.scan`, so compile time does not grow with
depth. What differs between layers of one model (Gemma's sliding or global attention, and the RoPE
base that goes with it) reaches each layer as a scanned array (`LayerSettings`), never as a Python
value, so the stack stays one compiled body. The KV cache is carried through the scan and updated in
place (the caller donates it).

KV cache layout: a pair (k_pages, v_pages), each [num_kv_heads, num_layers * num_pages, page_size,
head_dim]. Layer l owns pages l * num_pages .. (l + 1) * num_pages - 1, so attention sees one flat page
pool and a layer only offsets its page table; the heads axis comes first so it can be sharded.

A family module (llama.py, moe.py, gemma.py, falcon.py) writes only its `DecoderLayer`'s residual
block from these pieces; the registry in `__init__` pairs it with `CausalLM`.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fastgen_jax import weight_layout
from fastgen_jax.attention import Attention
from fastgen_jax.config import ModelConfig
from fastgen_jax.models.metadata import AttentionMetadata

KVCache = tuple[jax.Array, jax.Array]
# A window no position reaches: a global layer's value where some layers slide and others do not.
NO_WINDOW = 1 << 30


@struct.dataclass
class LayerSettings:
    """Per-layer values, scanned along the layer axis (each i32[] or bool[] inside one layer)."""

    index: jax.Array  # i32: the layer's number (it offsets the layer's KV pages)
    sliding: jax.Array  # bool: a sliding-window (local) layer


def layer_settings(config: ModelConfig) -> LayerSettings:
    windows = config.layer_windows()
    return LayerSettings(
        index=jnp.arange(config.num_layers, dtype=jnp.int32),
        sliding=jnp.asarray([w is not None for w in windows]),
    )


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(config: ModelConfig, max_model_len: int, local: bool = False) -> np.ndarray:
    """Inverse RoPE frequencies f32[rotary_dim // 2] and the cos/sin scale, for global layers or (with
    `local`) Gemma 3's sliding ones. LongRoPE's factors are chosen here once, from `max_model_len`."""
    dim = config.rotary_dim
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = None if local else config.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32), 1.0
    if scaling.kind == "linear":
        return (inv_freq / scaling.factor).astype(np.float32), 1.0
    if scaling.kind == "longrope":
        long = max_model_len > scaling.original_max_position_embeddings
        ext = np.asarray(scaling.long_factor if long else scaling.short_factor, np.float64)
        inv = 1.0 / (ext * theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        return inv.astype(np.float32), scaling.attention_factor
    return _llama3_inv_freq(inv_freq, scaling), 1.0


def _llama3_inv_freq(inv_freq: np.ndarray, scaling) -> np.ndarray:
    # Llama 3: leave high frequencies alone, divide low ones by `factor`, blend in between.
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    out = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, blended, out).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, scale: float = 1.0) -> jax.Array:
    """Rotates the leading 2 * len(inv_freq) dims of x [T, heads, head_dim] by position, in the
    rotate-half layout Hugging Face uses; the rest pass through (partial rotary)."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, R/2]
    cos = (jnp.cos(angles) * scale)[:, None, :].astype(x.dtype)
    sin = (jnp.sin(angles) * scale)[:, None, :].astype(x.dtype)
    rot, rest = x[..., : 2 * inv_freq.shape[0]], x[..., 2 * inv_freq.shape[0] :]
    x1, x2 = jnp.split(rot, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


# ----------------------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    """RMS norm over the last axis; `plus_one` scales by (1 + weight), as Gemma stores it."""

    eps: float
    dtype: jnp.dtype
    plus_one: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (y * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        return y.astype(self.dtype) * scale


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with a scale and a bias, computed in float32 (Falcon, OPT)."""

    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.dtype)
        xf = x.astype(jnp.float32)
        centred = xf - xf.mean(axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def norm(config: ModelConfig, dtype, name: str) -> nn.Module:
    if config.norm_kind == "layer":
        return LayerNorm(config.rms_norm_eps, dtype, name=name)
    return RMSNorm(config.rms_norm_eps, dtype, config.norm_plus_one, name=name)


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def activation(config: ModelConfig):
    return _ACTIVATIONS[config.hidden_act]


class PagedAttention(nn.Module):
    """q/k/v projections (optional biases, optional per-head q/k norm), RoPE, the K/V write into the
    layer's pages and attention through them, then the output projection."""

    config: ModelConfig
    attention: Attention
    dtype: jnp.dtype
    max_model_len: int

    @nn.compact
    def __call__(self, x, kv_cache: KVCache, layer: LayerSettings, md: AttentionMetadata):
        c = self.config
        q, k, v = self._project(x)  # [T, H, D], [T, KVH, D], [T, KVH, D]
        if c.qk_norm:
            q = norm(c, self.dtype, "q_norm")(q)
            k = norm(c, self.dtype, "k_norm")(k)
        if c.position_embedding == "rope":
            inv_freq, rope_scale = self._rope(layer)
            q = apply_rope(q, md.positions, inv_freq, rope_scale)
            k = apply_rope(k, md.positions, inv_freq, rope_scale)
        k_pages, v_pages = kv_cache
        pages_per_layer = k_pages.shape[1] // c.num_layers
        slots = _layer_slots(md.slot_mapping, layer.index, pages_per_layer, k_pages.shape)
        k_pages, v_pages = self.attention.write_kv(k_pages, v_pages, k, v, slots)
        out = self.attention.paged_attention(
            q,
            k_pages,
            v_pages,
            md.kv_lens,
            md.page_indices + layer.index * pages_per_layer,
            md.cu_q_lens,
            md.num_seqs,
            sm_scale=1.0 / math.sqrt(c.query_pre_attn_scalar or c.head_dim),
            sliding_window=self._window(layer),
            logit_softcap=c.attn_logit_softcap,
        )
        if (quantized := _quantized(self, "wo")) is not None:
            out = self.attention.int8_matmul(out.reshape(out.shape[0], -1), *quantized, rows=_REAL_ROWS.get())
        elif (packed := _packed(self, "wo")) is not None:
            out = self.attention.packed_matmul(out, *packed, (c.hidden_size,), rows=_REAL_ROWS.get())
        else:
            wo = self.param("wo", _init, (c.num_heads, c.head_dim, c.hidden_size), self.dtype)
            out = self.attention.matmul(out, wo, stack=_stacked(self, "wo"), rows=_REAL_ROWS.get())
        if c.attn_out_bias:
            out = out + self.param("bo", nn.initializers.zeros, (c.hidden_size,), self.dtype)
        return out, (k_pages, v_pages)

    def _project(self, x):
        if any(self.has_variable("params", f"wqkv{suffix}") for suffix in ("", "_int8", _PACKED)):
            return self._project_fused(x)
        c = self.config
        out = []
        for name, heads in (("q", c.num_heads), ("k", c.num_kv_heads), ("v", c.num_kv_heads)):
            if (quantized := _quantized(self, f"w{name}")) is not None:
                y = self.attention.int8_matmul(x, *quantized, rows=_REAL_ROWS.get())
                y = y.reshape(x.shape[0], heads, c.head_dim)
            elif (packed := _packed(self, f"w{name}")) is not None:
                y = self.attention.packed_matmul(x, *packed, (heads, c.head_dim), rows=_REAL_ROWS.get())
            else:
                w = self.param(f"w{name}", _init, (c.hidden_size, heads, c.head_dim), self.dtype)
                y = self.attention.matmul(x, w, stack=_stacked(self, f"w{name}"), rows=_REAL_ROWS.get())
            if c.attention_bias:
                y = y + self.param(f"b{name}", nn.initializers.zeros, (heads, c.head_dim), self.dtype)
            out.append(y)
        return out

    def _project_fused(self, x):
        """q, k, v from one matmul with the fused weight `parallel.fuse_projections` builds:
        wqkv [hidden, S, (heads + 2 x kv_heads) / S, head_dim], S the shard count."""
        c = self.config
        if (quantized := _quantized(self, "wqkv")) is not None:  # [S x heads per shard x D, hidden]
            shards = self.attention.shards
            y = self.attention.int8_matmul(x, *quantized, rows=_REAL_ROWS.get())
            y = y.reshape(x.shape[0], shards, -1, c.head_dim)
        elif (packed := _packed(self, "wqkv")) is not None:  # one device: S = 1
            shards = self.attention.shards
            heads = (c.num_heads + 2 * c.num_kv_heads) // shards
            y = self.attention.packed_matmul(x, *packed, (shards, heads, c.head_dim), rows=_REAL_ROWS.get())
        else:
            w = self.get_variable("params", "wqkv")
            shards = w.shape[1]
            # [T, S, heads per shard, D]
            y = self.attention.matmul(x, w, stack=_stacked(self, "wqkv"), rows=_REAL_ROWS.get())
        if c.attention_bias:
            y = y + self.get_variable("params", "bqkv")
        q_end = c.num_heads // shards
        q, k, v = jnp.split(y, [q_end, q_end + c.num_kv_heads // shards], axis=2)
        t = x.shape[0]
        return (
            q.reshape(t, c.num_heads, c.head_dim),
            k.reshape(t, c.num_kv_heads, c.head_dim),
            v.reshape(t, c.num_kv_heads, c.head_dim),
        )

    def _rope(self, layer: LayerSettings):
        c = self.config
        inv_freq, scale = rope_inv_freq(c, self.max_model_len)
        if c.rope_local_theta is None:
            return jnp.asarray(inv_freq), scale
        local, _ = rope_inv_freq(c, self.max_model_len, local=True)
        return jnp.where(layer.sliding, jnp.asarray(local), jnp.asarray(inv_freq)), scale

    def _window(self, layer: LayerSettings):
        """The layer's sliding window: a static int or None when every layer has the same one (Llama,
        Mistral), else a traced i32[] (NO_WINDOW on global layers) so one scanned body serves all."""
        windows = set(self.config.layer_windows())
        if len(windows) == 1:
            return windows.pop()
        return jnp.where(layer.sliding, self.config.sliding_window, NO_WINDOW).astype(jnp.int32)


def _layer_slots(slot_mapping, layer, pages_per_layer: int, pages_shape) -> jax.Array:
    """Slots of this layer's pages; padding rows carry an out-of-range slot and keep one."""
    page_size = pages_shape[2]
    in_range = slot_mapping < pages_per_layer * page_size
    return jnp.where(in_range, slot_mapping + layer * pages_per_layer * page_size, pages_shape[1] * page_size)


_init = nn.initializers.normal(0.02)


def _quantized(module: nn.Module, name: str) -> tuple[jax.Array, jax.Array, tuple | None] | None:
    """The int8 weights [N, K] and per-channel scales [N] that `fastgen_jax.quantize` put in place of
    the module's weight `name`, and (their whole stacks, this layer's index) when `CausalLM` handed
    the stacks to the layers (see `_stacked`; else None), or None when it is not quantized."""
    if not module.has_variable("params", f"{name}_int8"):
        return None
    q, scale = module.get_variable("params", f"{name}_int8"), module.get_variable("params", f"{name}_scale")
    stacked_q, stacked_scale = _stacked(module, f"{name}_int8"), _stacked(module, f"{name}_scale")
    stack = None
    if stacked_q is not None and stacked_scale is not None:
        stack = (stacked_q[0], stacked_scale[0], stacked_q[1])
    return q, scale, stack


_PACKED = weight_layout.SUFFIX


def _packed(module: nn.Module, name: str) -> tuple[jax.Array, tuple | None] | None:
    """The packed float32 weights [strips, K, strip] that `fastgen_jax.weight_layout` put in place of
    the module's weight `name`, and (their whole stack, this layer's index) when `CausalLM` handed the
    stacks to the layers (else None); or None when it is not packed."""
    if not module.has_variable("params", f"{name}{_PACKED}"):
        return None
    return module.get_variable("params", f"{name}{_PACKED}"), _stacked(module, f"{name}{_PACKED}")


class _LayerStacks(NamedTuple):
    """The scanned layers' stacked params (each [L, ...]) and the layer being traced, while
    `DecoderLayer.__call__` runs (see `_stacked`)."""

    params: Any  # the "layers" params subtree, as CausalLM holds it
    index: jax.Array  # i32[]: this layer's position in the stacks
    depth: int  # len(path) of the DecoderLayer: a submodule's path below it indexes `params`


_STACKS: contextvars.ContextVar[_LayerStacks | None] = contextvars.ContextVar(
    "fastgen_layer_stacks", default=None
)
# i32[]: how many leading rows of the slab are real (`md.cu_q_lens[-1]`) while `DecoderLayer.__call__`
# runs. The projections hand it to `Attention.matmul` / `int8_matmul` (`rows=`): the CPU kernels then
# multiply only those rows, so a decode of 5 sequences padded to a 16-row bucket costs 5 rows there.
_REAL_ROWS: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar(
    "fastgen_real_rows", default=None
)


def logit_rows_in_use(md: AttentionMetadata, num_rows: int) -> jax.Array:
    """i32[]: how many leading logit rows of `md.logits_indices` (L = `num_rows` of them) a step uses,
    the rows the LM head's `rows=` multiplies. Used rows lead, point at distinct slab rows in
    increasing order (each slot's last row, and its verification rows before it), and padding points
    at row 0; so only the first row can be a real 0, and the count is exact. A prompt step of 512
    tokens and three sequences uses 3 of its 256 rows: on the CPU kernels that was a 256-row LM head
    (14.5 GFLOP at SmolLM2's 49k vocabulary, 100-150 ms of a 900 ms step). A plan with no sequence
    (`StepPlanner.padding`) keeps the slab's rows, so a timing plan still costs a full bucket."""
    indices = md.logits_indices
    used = jnp.sum(indices > 0, dtype=jnp.int32) + (indices[0] == 0).astype(jnp.int32)
    return jnp.where(md.num_seqs[0] > 0, used, jnp.minimum(md.cu_q_lens[-1], num_rows))


def _stacked(module: nn.Module, name: str) -> tuple[jax.Array, jax.Array] | None:
    """(the whole stack [L, ...] of the scanned weight `name` of `module`, this layer's index), when
    `CausalLM` handed the stacks to the layers (`Attention.reads_weight_stacks`), else None. A
    kernel reading its layer's weights in place from the stack saves the copy XLA makes of a scanned
    slice before a custom call."""
    stacks = _STACKS.get()
    if stacks is None:
        return None
    tree = stacks.params
    for part in module.path[stacks.depth :]:
        tree = tree.get(part) if isinstance(tree, Mapping) else None
    if not isinstance(tree, Mapping) or name not in tree:
        return None
    return tree[name], stacks.index


class MLP(nn.Module):
    """The gated MLP, down(act(x @ gate) * (x @ up)), or without `mlp_gated` down(act(x @ up)), with
    biases when `mlp_bias`; `intermediate` wide (default: the config's)."""

    config: ModelConfig
    dtype: jnp.dtype
    intermediate: int | None = None
    attention: Attention = Attention("reference")  # how its int8 weights multiply (fastgen_jax.quantize)

    @nn.compact
    def __call__(self, x):
        c = self.config
        f = self.intermediate or c.intermediate_size
        if any(self.has_variable("params", f"w_gate_up{suffix}") for suffix in ("", "_int8", _PACKED)):
            gate, up = self._gate_up_fused(x, f)
            hidden = activation(c)(gate) * up
        else:
            up = self._linear(x, "up", c.hidden_size, f)
            if c.mlp_gated:
                hidden = activation(c)(self._linear(x, "gate", c.hidden_size, f)) * up
            else:
                hidden = activation(c)(up)
        return self._linear(hidden, "down", f, c.hidden_size)

    def _gate_up_fused(self, x, f: int):
        """gate and up [T, f] from one matmul with the fused weight `parallel.fuse_projections`
        builds: w_gate_up [hidden, S, 2, f / S], S the shard count."""
        if (quantized := _quantized(self, "w_gate_up")) is not None:  # [S x 2 x f / S, hidden]
            y = self.attention.int8_matmul(x, *quantized, rows=_REAL_ROWS.get())
            y = y.reshape(x.shape[0], self.attention.shards, 2, f // self.attention.shards)
        elif (packed := _packed(self, "w_gate_up")) is not None:
            shards = self.attention.shards
            y = self.attention.packed_matmul(x, *packed, (shards, 2, f // shards), rows=_REAL_ROWS.get())
        else:
            w = self.get_variable("params", "w_gate_up")
            y = self.attention.matmul(x, w, stack=_stacked(self, "w_gate_up"), rows=_REAL_ROWS.get())
        if self.config.mlp_bias:
            y = y + self.get_variable("params", "b_gate_up")
        return y[:, :, 0].reshape(x.shape[0], f), y[:, :, 1].reshape(x.shape[0], f)

    def _linear(self, x, name: str, n_in: int, n_out: int):
        if (quantized := _quantized(self, f"w_{name}")) is not None:
            y = self.attention.int8_matmul(x, *quantized, rows=_REAL_ROWS.get())
        elif (packed := _packed(self, f"w_{name}")) is not None:
            y = self.attention.packed_matmul(x, *packed, (n_out,), rows=_REAL_ROWS.get())
        else:
            w = self.param(f"w_{name}", _init, (n_in, n_out), self.dtype)
            y = self.attention.matmul(x, w, stack=_stacked(self, f"w_{name}"), rows=_REAL_ROWS.get())
        if self.config.mlp_bias:
            y = y + self.param(f"b_{name}", nn.initializers.zeros, (n_out,), self.dtype)
        return y


# ----------------------------------------------------------------------------- the layer and the shell


class DecoderLayer(nn.Module):
    """One layer of the scanned stack, as `CausalLM` calls it: `layer((h, kv_cache), settings, md) ->
    ((h, kv_cache), None)`. It owns the attention over the paged cache; a family subclasses it and
    writes only `residual_block(h, attend)` (decorated `nn.nowrap`, so its blocks are this layer's):
    the order of its norms, attention and MLP, where `attend(x)` runs attention on `x`, writing the
    layer's keys and values, and returns its output."""

    config: ModelConfig
    attention: Attention
    dtype: jnp.dtype
    max_model_len: int

    @nn.compact
    def __call__(self, carry, layer: LayerSettings, md: AttentionMetadata, stacks=None):
        """`stacks`: the scanned params' stacks when `CausalLM` hands them over (see `_stacked`)."""
        h, kv_cache = carry
        attn = PagedAttention(self.config, self.attention, self.dtype, self.max_model_len, name="attn")
        cache = [kv_cache]

        def attend(x):
            out, cache[0] = attn(x, cache[0], layer, md)
            return out

        token = _STACKS.set(None if stacks is None else _LayerStacks(stacks, layer.index, len(self.path)))
        rows_token = _REAL_ROWS.set(md.cu_q_lens[-1])
        try:
            return (self.residual_block(h, attend), cache[0]), None
        finally:
            _REAL_ROWS.reset(rows_token)
            _STACKS.reset(token)

    @nn.nowrap
    def norm(self, name: str) -> nn.Module:
        return norm(self.config, self.dtype, name)

    @nn.nowrap
    def mlp(self, x):
        return MLP(self.config, self.dtype, attention=self.attention, name="mlp")(x)

    @nn.nowrap
    def residual_block(self, h, attend):  # h: [T, hidden]
        raise NotImplementedError


class CausalLM(nn.Module):
    """Embedding, the scanned stack of `layer_cls`, final norm and LM head. Returns (logits
    f32[R, vocab] for the rows in `md.logits_indices`, the updated KV cache).

    `layer_cls` is a `DecoderLayer`.
    """

    config: ModelConfig
    attention: Attention
    layer_cls: type
    dtype: jnp.dtype = jnp.float32
    max_model_len: int = 0  # 0: the model's max_position_embeddings

    @nn.compact
    def __call__(self, token_ids: jax.Array, kv_cache: KVCache, md: AttentionMetadata):
        c = self.config
        if self.has_variable("params", f"embed{_PACKED}"):  # tied and packed (`weight_layout`)
            embedding = None
            h = weight_layout.packed_rows(self.get_variable("params", f"embed{_PACKED}"), token_ids)
        else:
            embedding = self.param("embed", _init, (c.vocab_size, c.hidden_size), self.dtype)
            h = embedding[token_ids]  # [T, hidden]
        if c.position_embedding == "learned":  # OPT: a table of max positions (+ its offset) rows
            rows = c.max_position_embeddings + c.learned_pos_offset
            table = self.param("pos_embed", _init, (rows, c.hidden_size), self.dtype)
            h = h + table[md.positions + c.learned_pos_offset]
        if c.embed_scale:
            h = h * jnp.asarray(math.sqrt(c.hidden_size), self.dtype)
        layers = nn.scan(
            self.layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast),
            length=c.num_layers,
        )(c, self.attention, self.dtype, self.max_model_len or c.max_position_embeddings, name="layers")
        stacks = None
        if self.attention.reads_weight_stacks and not self.is_initializing():
            stacks = self.variables.get("params", {}).get("layers")
        (h, kv_cache), _ = layers((h, kv_cache), layer_settings(c), md, stacks)
        h = norm(c, self.dtype, "final_norm")(h[md.logits_indices])
        rows = logit_rows_in_use(md, h.shape[0])
        head_packed = f"{'embed' if c.tie_word_embeddings else 'lm_head'}{_PACKED}"
        if (quantized := _quantized(self, "lm_head")) is not None:
            logits = self.attention.int8_matmul(h, *quantized, preferred_element_type=jnp.float32, rows=rows)
        elif self.has_variable("params", head_packed):
            packed = self.get_variable("params", head_packed)
            logits = self.attention.packed_matmul(h, packed, None, (c.vocab_size,), rows=rows)
        else:
            unembed = embedding
            if not c.tie_word_embeddings:
                unembed = self.param("lm_head", _init, (c.vocab_size, c.hidden_size), self.dtype)
            logits = self.attention.matmul(
                h, unembed, w_nk=True, preferred_element_type=jnp.float32, rows=rows
            )
        if c.final_logit_softcap is not None:
            logits = jnp.tanh(logits / c.final_logit_softcap) * c.final_logit_softcap
        return logits, kv_cache


def init_kv_cache(config: ModelConfig, num_pages: int, page_size: int, dtype) -> KVCache:
    """Zeroed KV pages: `num_pages` per layer (page 0 of each layer is the engine's scratch page)."""
    shape = (config.num_kv_heads, config.num_layers * num_pages, page_size, config.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def kv_bytes_per_page(config: ModelConfig, page_size: int, dtype) -> int:
    """Bytes of K and V for one page in every layer."""
    itemsize = jnp.dtype(dtype).itemsize
    return 2 * config.num_layers * config.num_kv_heads * page_size * config.head_dim * itemsize
