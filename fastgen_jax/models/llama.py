"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2) as a functional Flax model over a paged KV cache.

One call processes a flat token slab: T rows of token ids from any number of sequences, each row with
its position and the KV slot it writes. Every layer writes the rows' keys and values into the shared
page pool first, then attends through the pages, so prompt chunks and decode tokens of many sequences
share one pass. Only the rows listed in `logits_indices` reach the vocabulary projection.

Layers are stacked along a leading axis and run under `nn.scan`, so compile time does not grow with
depth. The KV cache is carried through the scan and updated in place (the caller donates it).

KV cache layout: a pair (k_pages, v_pages), each [num_kv_heads, num_layers * num_pages, page_size,
head_dim]. Layer l owns pages l * num_pages .. (l + 1) * num_pages - 1, so attention sees one flat page
pool and a layer only offsets its page table; the heads axis comes first so it can be sharded.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fastgen_jax.attention import Attention
from fastgen_jax.config import ModelConfig
from fastgen_jax.models.metadata import AttentionMetadata

KVCache = tuple[jax.Array, jax.Array]


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies, f32[head_dim // 2], with Llama 3 scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32)
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


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates x [T, heads, head_dim] by position, in the rotate-half layout Hugging Face uses."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos = jnp.cos(angles)[:, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[:, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * scale


class PagedAttention(nn.Module):
    config: ModelConfig
    attention: Attention
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, kv_cache: KVCache, layer: jax.Array, md: AttentionMetadata):
        c = self.config
        init = nn.initializers.normal(0.02)
        wq = self.param("wq", init, (c.hidden_size, c.num_heads, c.head_dim), self.dtype)
        wk = self.param("wk", init, (c.hidden_size, c.num_kv_heads, c.head_dim), self.dtype)
        wv = self.param("wv", init, (c.hidden_size, c.num_kv_heads, c.head_dim), self.dtype)
        wo = self.param("wo", init, (c.num_heads, c.head_dim, c.hidden_size), self.dtype)
        q = jnp.einsum("td,dhk->thk", x, wq)  # [T, H, D]
        k = jnp.einsum("td,dhk->thk", x, wk)  # [T, KVH, D]
        v = jnp.einsum("td,dhk->thk", x, wv)  # [T, KVH, D]
        if c.attention_bias:
            zeros = nn.initializers.zeros
            q = q + self.param("bq", zeros, (c.num_heads, c.head_dim), self.dtype)
            k = k + self.param("bk", zeros, (c.num_kv_heads, c.head_dim), self.dtype)
            v = v + self.param("bv", zeros, (c.num_kv_heads, c.head_dim), self.dtype)
        inv_freq = rope_inv_freq(c)
        q = apply_rope(q, md.positions, inv_freq)
        k = apply_rope(k, md.positions, inv_freq)

        k_pages, v_pages = kv_cache
        page_size = k_pages.shape[2]
        pages_per_layer = k_pages.shape[1] // c.num_layers
        # Padding rows carry an out-of-range slot; keep it out of range after the layer offset.
        in_range = md.slot_mapping < pages_per_layer * page_size
        slots = jnp.where(
            in_range,
            md.slot_mapping + layer * pages_per_layer * page_size,
            k_pages.shape[1] * page_size,
        )
        k_pages, v_pages = self.attention.write_kv(k_pages, v_pages, k, v, slots)
        out = self.attention.paged_attention(
            q,
            k_pages,
            v_pages,
            md.kv_lens,
            md.page_indices + layer * pages_per_layer,
            md.cu_q_lens,
            md.num_seqs,
            sm_scale=1.0 / math.sqrt(c.head_dim),
            sliding_window=c.sliding_window,
        )
        return jnp.einsum("thk,hkd->td", out, wo), (k_pages, v_pages)


class MLP(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        c = self.config
        init = nn.initializers.normal(0.02)
        w_gate = self.param("w_gate", init, (c.hidden_size, c.intermediate_size), self.dtype)
        w_up = self.param("w_up", init, (c.hidden_size, c.intermediate_size), self.dtype)
        w_down = self.param("w_down", init, (c.intermediate_size, c.hidden_size), self.dtype)
        return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


class DecoderLayer(nn.Module):
    config: ModelConfig
    attention: Attention
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, carry, layer: jax.Array, md: AttentionMetadata):
        h, kv_cache = carry
        eps = self.config.rms_norm_eps
        attn_out, kv_cache = PagedAttention(self.config, self.attention, self.dtype, name="attn")(
            RMSNorm(eps, self.dtype, name="attn_norm")(h), kv_cache, layer, md
        )
        h = h + attn_out
        h = h + MLP(self.config, self.dtype, name="mlp")(RMSNorm(eps, self.dtype, name="mlp_norm")(h))
        return (h, kv_cache), None


class LlamaForCausalLM(nn.Module):
    """Returns (logits f32[R, vocab] for the rows in `md.logits_indices`, the updated KV cache)."""

    config: ModelConfig
    attention: Attention
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, token_ids: jax.Array, kv_cache: KVCache, md: AttentionMetadata):
        c = self.config
        embedding = self.param(
            "embed", nn.initializers.normal(0.02), (c.vocab_size, c.hidden_size), self.dtype
        )
        h = embedding[token_ids]  # [T, hidden]
        layers = nn.scan(
            DecoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast),
            length=c.num_layers,
        )(c, self.attention, self.dtype, name="layers")
        (h, kv_cache), _ = layers((h, kv_cache), jnp.arange(c.num_layers, dtype=jnp.int32), md)
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="final_norm")(h[md.logits_indices])
        if c.tie_word_embeddings:
            unembed = embedding
        else:
            unembed = self.param(
                "lm_head", nn.initializers.normal(0.02), (c.vocab_size, c.hidden_size), self.dtype
            )
        logits = jnp.einsum("rd,vd->rv", h, unembed, preferred_element_type=jnp.float32)
        return logits, kv_cache


def init_kv_cache(config: ModelConfig, num_pages: int, page_size: int, dtype) -> KVCache:
    """Zeroed KV pages: `num_pages` per layer (page 0 of each layer is the engine's scratch page)."""
    shape = (config.num_kv_heads, config.num_layers * num_pages, page_size, config.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def kv_bytes_per_page(config: ModelConfig, page_size: int, dtype) -> int:
    """Bytes of K and V for one page in every layer."""
    itemsize = jnp.dtype(dtype).itemsize
    return 2 * config.num_layers * config.num_kv_heads * page_size * config.head_dim * itemsize
