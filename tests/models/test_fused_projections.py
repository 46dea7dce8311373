"""Fused q/k/v and gate/up projections (`parallel.fuse_projections`, as `shard_params` applies them)
against transformers on tiny random models of each layout the fusion meets (grouped and replicated
KV heads, attention biases, GeGLU, Falcon's non-gated MLP, OPT's MLP biases), and the per-shard
layout of the fused weights on 2 devices: each device holds exactly its own q, k, v heads and its
own gate and up columns."""

import jax
import numpy as np
import pytest

from fastgen_jax import parallel
from tests.models import test_family_parity, test_llama_parity
from tests.models.tiny_hf import hf_logits
from tests.paged import paged_logits

TOL = 1e-4
FUSED_MODELS = {
    "llama2": test_llama_parity,
    "qwen2-bias": test_llama_parity,
    "tied-embeddings": test_llama_parity,
    "gemma2": test_family_parity,
    "falcon-7b-layout": test_family_parity,
    "opt": test_family_parity,
}


@pytest.mark.parametrize("name", sorted(FUSED_MODELS))
def test_fused_projections_match_transformers(name, tmp_path):
    _, hf_model, config, params = FUSED_MODELS[name].make_tiny_model(name, tmp_path)
    fused = parallel.fuse_projections(params, 1)
    attn = fused["params"]["layers"]["attn"]
    assert "wqkv" in attn and not {"wq", "wk", "wv"} & set(attn)
    assert ("w_gate_up" in fused["params"]["layers"]["mlp"]) == config.mlp_gated
    ids = np.random.default_rng(3).integers(0, config.vocab_size, 21).tolist()
    ours = paged_logits(config, fused, ids, chunks=[13, 1, 7], slab=16)
    assert np.abs(ours - hf_logits(hf_model, ids)).max() < TOL
    unfused = paged_logits(config, params, ids, chunks=[13, 1, 7], slab=16)
    assert np.abs(ours - unfused).max() < 1e-5


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (see tests/conftest.py)")
def test_each_device_holds_its_own_heads_and_columns_of_the_fused_weights(tmp_path):
    # 6 query heads and 2 KV heads over 2 devices: 3 query heads and 1 KV head each, no padding.
    _, _, config, params = test_llama_parity.make_tiny_model("tied-embeddings", tmp_path)
    mesh = parallel.make_mesh(jax.devices()[:2])
    sharded = parallel.shard_params(params, config, mesh, np.float32)["params"]["layers"]
    attn, mlp = params["params"]["layers"]["attn"], params["params"]["layers"]["mlp"]
    hq, hkv, f = config.num_heads // 2, config.num_kv_heads // 2, config.intermediate_size // 2
    for shard in sharded["attn"]["wqkv"].addressable_shards:
        d = mesh.devices.tolist().index(shard.device)
        got = np.asarray(shard.data)[:, :, 0]  # [layers, hidden, heads of this shard, head_dim]
        want = np.concatenate(
            [
                attn["wq"][:, :, d * hq : (d + 1) * hq],
                attn["wk"][:, :, d * hkv : (d + 1) * hkv],
                attn["wv"][:, :, d * hkv : (d + 1) * hkv],
            ],
            axis=2,
        )
        np.testing.assert_array_equal(got, want)
    for shard in sharded["mlp"]["w_gate_up"].addressable_shards:
        d = mesh.devices.tolist().index(shard.device)
        got = np.asarray(shard.data)[:, :, 0]  # [layers, hidden, 2, f / 2]
        np.testing.assert_array_equal(got[:, :, 0], mlp["w_gate"][:, :, d * f : (d + 1) * f])
        np.testing.assert_array_equal(got[:, :, 1], mlp["w_up"][:, :, d * f : (d + 1) * f])
