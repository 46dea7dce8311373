"""The Flax Llama family against Hugging Face transformers (torch, CPU, float32) on tiny random models."""

import numpy as np
import pytest
import transformers

from tests.models import tiny_hf
from tests.models.tiny_hf import hf_logits
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
)

TINY_MODELS = {
    "llama3-rope-scaling": (
        transformers.LlamaConfig,
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        ),
    ),
    "llama2": (transformers.LlamaConfig, dict(num_key_value_heads=4)),
    "mistral-sliding-window": (transformers.MistralConfig, dict(sliding_window=7)),
    "qwen2-bias": (transformers.Qwen2Config, dict(num_key_value_heads=1)),
    "tied-embeddings": (
        transformers.LlamaConfig,
        dict(tie_word_embeddings=True, hidden_size=96, num_attention_heads=6, num_key_value_heads=2),
    ),
}


@pytest.fixture(scope="module", params=sorted(TINY_MODELS))
def tiny_model(request, tmp_path_factory):
    return make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


def make_tiny_model(name, path):
    """A random-weight transformers model saved as safetensors, and our conversion of it."""
    return tiny_hf.make_tiny_model(TINY_MODELS, COMMON, name, path)


@pytest.mark.parametrize("length", [1, 5, 17, 40])
def test_logits_match_transformers(tiny_model, length):
    name, hf_model, config, params = tiny_model
    ids = np.random.default_rng(length).integers(0, config.vocab_size, length).tolist()
    ours = paged_logits(config, params, ids)
    diff = np.abs(ours - hf_logits(hf_model, ids)).max()
    print(f"{name} length={length} max|diff|={diff:.2e}")
    assert diff < TOL


def test_chunked_prefill_matches_one_pass(tiny_model):
    _, _, config, params = tiny_model
    ids = np.random.default_rng(7).integers(0, config.vocab_size, 37).tolist()
    one_pass = paged_logits(config, params, ids, page_size=8)
    # Chunks that start and end mid-page, a one-token chunk, and a padded slab.
    chunked = paged_logits(config, params, ids, chunks=[5, 11, 1, 13, 7], page_size=8, slab=16)
    np.testing.assert_allclose(chunked, one_pass, atol=1e-5, rtol=0)


def test_config_fields_are_read(tiny_model):
    name, hf_model, config, _ = tiny_model
    assert config.num_layers == hf_model.config.num_hidden_layers
    assert config.num_kv_heads == hf_model.config.num_key_value_heads
    assert config.tie_word_embeddings == bool(hf_model.config.tie_word_embeddings)
    assert config.attention_bias == (name == "qwen2-bias")
    assert config.sliding_window == (7 if name == "mistral-sliding-window" else None)
    assert (config.rope_scaling is not None) == (name == "llama3-rope-scaling")


def test_sliding_window_changes_the_result(tmp_path):
    """Guards the Mistral case above: with the window removed, logits past the window differ."""
    import dataclasses

    _, hf_model, config, params = make_tiny_model("mistral-sliding-window", tmp_path)
    ids = np.random.default_rng(3).integers(0, config.vocab_size, 20).tolist()
    windowless = paged_logits(dataclasses.replace(config, sliding_window=None), params, ids)
    assert np.abs(windowless[10:] - hf_logits(hf_model, ids)[10:]).max() > 1e-2
