"""GGUF files of every family llama.cpp's format and our loader share, against transformers: tiny
random Hugging Face models converted as llama.cpp converts them (tests/gguf_model.py), loaded by
`load_gguf`, logits through the paged cache in one pass and in chunks (float32, max |diff| < 1e-4)."""

import dataclasses

import gguf
import numpy as np
import pytest

from fastgen_jax.checkpoints import CheckpointError, load_gguf
from tests.gguf_model import write_gguf_from_hf
from tests.models import test_family_parity, test_llama_parity
from tests.models.tiny_hf import chunked_prefill_diff, hf_logits
from tests.paged import paged_logits

TOL = 1e-4
# name -> (module whose TINY_MODELS holds it, Hugging Face architecture we expect back)
GGUF_MODELS = {
    "llama2": (test_llama_parity, "LlamaForCausalLM"),
    "qwen2-bias": (test_llama_parity, "Qwen2ForCausalLM"),
    "qwen3": (test_family_parity, "Qwen3ForCausalLM"),
    "mixtral": (test_family_parity, "MixtralForCausalLM"),
    "qwen2-moe-shared": (test_family_parity, "Qwen2MoeForCausalLM"),
    "qwen3-moe": (test_family_parity, "Qwen3MoeForCausalLM"),
}


@pytest.fixture(scope="module", params=sorted(GGUF_MODELS))
def gguf_model(request, tmp_path_factory):
    name = request.param
    module, architecture = GGUF_MODELS[name]
    hf_dir = tmp_path_factory.mktemp(name)
    _, hf_model, hf_config, _ = module.make_tiny_model(name, hf_dir)
    config, params, tokenizer = load_gguf(write_gguf_from_hf(hf_dir, hf_dir / "model.gguf"))
    assert config.architecture == architecture
    return name, hf_model, hf_config, config, params


def test_gguf_config_equals_the_hugging_face_one(gguf_model):
    """All of it, but the token ids (the GGUF vocabulary's own) and the float32-rounded epsilon."""
    _, _, hf_config, config, _ = gguf_model
    assert config.rms_norm_eps == pytest.approx(hf_config.rms_norm_eps, rel=1e-6)
    ids = dict(bos_token_id=hf_config.bos_token_id, eos_token_ids=hf_config.eos_token_ids)
    assert dataclasses.replace(config, rms_norm_eps=hf_config.rms_norm_eps, **ids) == hf_config


@pytest.mark.parametrize("length", [1, 17])
def test_gguf_logits_match_transformers(gguf_model, length):
    name, hf_model, _, config, params = gguf_model
    ids = np.random.default_rng(length).integers(3, config.vocab_size, length).tolist()
    diff = np.abs(paged_logits(config, params, ids) - hf_logits(hf_model, ids)).max()
    print(f"gguf {name} length={length} max|diff|={diff:.2e}")
    assert diff < TOL


def test_gguf_chunked_prefill_matches_transformers(gguf_model):
    name, hf_model, _, config, params = gguf_model
    diff = chunked_prefill_diff(hf_model, config, params)
    print(f"gguf {name} chunked length=37 max|diff|={diff:.2e}")
    assert diff < TOL


def test_early_mixtral_files_with_one_tensor_per_expert_load(tmp_path):
    _, hf_model, _, _ = test_family_parity.make_tiny_model("mixtral", tmp_path)
    path = write_gguf_from_hf(tmp_path, tmp_path / "old.gguf", per_expert_tensors=True)
    assert any(".ffn_gate.3." in t.name for t in gguf.GGUFReader(path).tensors)
    config, params, _ = load_gguf(path)
    ids = np.random.default_rng(5).integers(3, config.vocab_size, 12).tolist()
    assert np.abs(paged_logits(config, params, ids) - hf_logits(hf_model, ids)).max() < TOL


def test_an_unsupported_gguf_architecture_names_the_supported_ones(tmp_path):
    path = tmp_path / "gemma.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        CheckpointError, match=r"unsupported GGUF architecture 'gemma2' \(supported: llama, qwen2, qwen3, "
    ):
        load_gguf(path)
