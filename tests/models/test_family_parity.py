"""Every family beyond Llama against Hugging Face transformers (torch, CPU, float32, eager) on tiny
random models: logits through the paged cache in one pass and in chunks, and config round trips."""

import dataclasses

import numpy as np
import pytest
import transformers

from fastgen_jax.config import ConfigError, ModelConfig
from tests.models import tiny_hf
from tests.models.tiny_hf import DROP, hf_logits
from tests.paged import paged_logits

TOL = 1e-4
COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.1,  # logits of order 1 and attention far from uniform
)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
_rng = np.random.default_rng(0)
_NOT_LLAMA_NAMED = dict(head_dim=DROP, intermediate_size=DROP, num_key_value_heads=DROP)

TINY_MODELS = {
    "qwen3": (transformers.Qwen3Config, dict()),
    "phi3-longrope": (
        transformers.Phi3Config,
        dict(
            original_max_position_embeddings=16,
            rope_scaling={
                "rope_type": "longrope",
                "short_factor": (1 + _rng.random(8)).tolist(),
                "long_factor": (1 + 4 * _rng.random(8)).tolist(),
            },
        ),
    ),
    "phi3-partial-rotary": (transformers.Phi3Config, dict(partial_rotary_factor=0.5)),
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2-moe-shared": (
        transformers.Qwen2MoeConfig,
        dict(num_experts=4, shared_expert_intermediate_size=48, **_MOE),
    ),
    "qwen3-moe": (transformers.Qwen3MoeConfig, dict(num_experts=6, norm_topk_prob=True, **_MOE)),
    "gemma2": (
        transformers.Gemma2Config,
        dict(
            sliding_window=5,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "falcon-7b-layout": (
        transformers.FalconConfig,
        dict(
            multi_query=True,
            parallel_attn=True,
            new_decoder_architecture=False,
            alibi=False,
            bias=False,
            **_NOT_LLAMA_NAMED,
        ),
    ),
    "falcon-new-decoder": (
        transformers.FalconConfig,
        dict(
            new_decoder_architecture=True,
            num_kv_heads=2,
            alibi=False,
            bias=True,
            ffn_hidden_size=96,
            **_NOT_LLAMA_NAMED,
        ),
    ),
    "opt": (
        transformers.OPTConfig,
        dict(ffn_dim=96, word_embed_proj_dim=64, enable_bias=True, **_NOT_LLAMA_NAMED),
    ),
    "gemma3": (
        transformers.Gemma3TextConfig,
        dict(
            num_hidden_layers=4,
            sliding_window=5,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
    ),
}


@pytest.fixture(scope="module", params=sorted(TINY_MODELS))
def tiny_model(request, tmp_path_factory):
    return make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


def make_tiny_model(name, path, **overrides):
    """A random-weight transformers model saved as safetensors, and our conversion of it."""
    return tiny_hf.make_tiny_model(TINY_MODELS, COMMON, name, path, **overrides)


@pytest.mark.parametrize("length", [1, 6, 17, 40])
def test_logits_match_transformers(tiny_model, length):
    name, hf_model, config, params = tiny_model
    ids = np.random.default_rng(length).integers(3, config.vocab_size, length).tolist()
    # LongRoPE: transformers picks the factors by this forward's length, we by max_model_len.
    ours = paged_logits(config, params, ids, max_model_len=length)
    theirs = hf_logits(hf_model, ids)
    diff = np.abs(ours - theirs).max()
    print(f"{name} length={length} max|diff|={diff:.2e} (max|logit|={np.abs(theirs).max():.1f})")
    assert diff < TOL


def test_chunked_prefill_matches_transformers(tiny_model):
    name, hf_model, config, params = tiny_model
    diff = tiny_hf.chunked_prefill_diff(hf_model, config, params)
    print(f"{name} chunked length=37 max|diff|={diff:.2e}")
    assert diff < TOL


def test_config_round_trips_through_config_json(tiny_model):
    _, _, config, _ = tiny_model
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config


def test_family_switches_are_read(tiny_model):
    name, hf_model, config, _ = tiny_model
    hf = hf_model.config
    assert config.qk_norm == (name in ("qwen3", "qwen3-moe", "gemma3"))
    assert config.num_experts == (getattr(hf, "num_local_experts", None) or getattr(hf, "num_experts", 0))
    assert config.shared_expert_intermediate_size == (48 if name == "qwen2-moe-shared" else 0)
    assert config.post_norms == config.norm_plus_one == config.embed_scale == name.startswith("gemma")
    if name == "gemma3":
        assert config.layer_windows() == (5, 5, None, 5)
        assert config.rope_local_theta == 10000.0 and config.rope_scaling.kind == "linear"
    if name == "gemma2":
        assert config.layer_windows() == (5, None, 5)
        assert (config.attn_logit_softcap, config.final_logit_softcap) == (2.0, 3.0)
    if name == "phi3-longrope":
        assert config.rope_scaling.kind == "longrope"
        assert config.rope_scaling.attention_factor == pytest.approx(np.sqrt(1 + np.log(16) / np.log(16)))


def test_soft_capping_and_windows_change_the_result(tmp_path):
    """Guards the Gemma 2 case: with a tight cap we still match, and without the cap or the window
    the logits move, so the parity above could not hold by accident."""
    _, hf_model, config, params = make_tiny_model("gemma2", tmp_path, attn_logit_softcapping=0.5)
    ids = np.random.default_rng(3).integers(3, config.vocab_size, 20).tolist()
    expected = hf_logits(hf_model, ids)
    assert np.abs(paged_logits(config, params, ids) - expected).max() < TOL
    for change in (dict(attn_logit_softcap=None), dict(sliding_window=None, layer_types=None)):
        changed = paged_logits(dataclasses.replace(config, **change), params, ids)
        assert np.abs(changed - expected).max() > 1e-2, change


def test_longrope_factors_follow_max_model_len(tmp_path):
    """Short factors up to original_max_position_embeddings (16), long ones beyond, chosen once."""
    _, hf_model, config, params = make_tiny_model("phi3-longrope", tmp_path)
    ids = np.random.default_rng(4).integers(3, config.vocab_size, 10).tolist()
    expected = hf_logits(hf_model, ids)  # 10 tokens: transformers uses the short factors
    assert np.abs(paged_logits(config, params, ids, max_model_len=16) - expected).max() < TOL
    assert np.abs(paged_logits(config, params, ids, max_model_len=256) - expected).max() > 1e-3


def test_unsupported_features_are_named():
    base = transformers.Qwen2MoeConfig(**COMMON, num_experts=4, **_MOE).to_dict()
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        ModelConfig.from_hf_dict({**base, "mlp_only_layers": [1]})
    with pytest.raises(ConfigError, match="'yarn'"):
        ModelConfig.from_hf_dict({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match="'BloomForCausalLM'.*serves .*Qwen3MoeForCausalLM"):
        ModelConfig.from_hf_dict({**base, "architectures": ["BloomForCausalLM"]})
    falcon = transformers.FalconConfig(vocab_size=97, hidden_size=64, num_attention_heads=4).to_dict()
    with pytest.raises(ConfigError, match="alibi"):
        ModelConfig.from_hf_dict({**falcon, "alibi": True})
    opt = transformers.OPTConfig(vocab_size=97, hidden_size=64, word_embed_proj_dim=32).to_dict()
    with pytest.raises(ConfigError, match="word_embed_proj_dim"):
        ModelConfig.from_hf_dict(opt)
