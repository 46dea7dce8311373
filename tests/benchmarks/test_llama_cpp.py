"""The F32 GGUF written for llama.cpp's server holds exactly the weights our loader reads from the
quantized original: a tiny random Llama converted to GGUF, its matrices quantized (Q8_0, Q4_1) as
llama.cpp quantizes them, then rewritten by `write_f32_gguf`."""

import gguf
import jax
import numpy as np
import pytest

from fastgen_jax.benchmarks.llama_cpp import LlamaServerConfig, write_f32_gguf
from fastgen_jax.checkpoints import load_gguf
from tests.gguf_model import write_gguf_from_hf
from tests.models import test_llama_parity

Q = gguf.GGMLQuantizationType


def _quantize_gguf(src, dst) -> None:
    """Copies `src` with its 2-D tensors quantized: Q4_1 for the layers' matrices, Q8_0 for the rest."""
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        w = np.asarray(t.data, np.float32)
        if w.ndim == 2:
            qtype = (
                gguf.GGMLQuantizationType.Q4_1
                if t.name.startswith("blk.")
                else gguf.GGMLQuantizationType.Q8_0
            )
            writer.add_tensor(t.name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def quantized_and_f32(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama_cpp")
    test_llama_parity.make_tiny_model("llama2", d)
    f32_src = write_gguf_from_hf(d, d / "model.gguf")
    _quantize_gguf(f32_src, d / "model.q.gguf")
    return d / "model.q.gguf", write_f32_gguf(d / "model.q.gguf", d / "model.f32.gguf")


def test_f32_gguf_holds_the_dequantized_weights_our_loader_reads(quantized_and_f32):
    quantized, f32 = quantized_and_f32
    types = {t.tensor_type for t in gguf.GGUFReader(str(quantized)).tensors}
    assert gguf.GGMLQuantizationType.Q4_1 in types and gguf.GGMLQuantizationType.Q8_0 in types
    assert {t.tensor_type for t in gguf.GGUFReader(str(f32)).tensors} == {gguf.GGMLQuantizationType.F32}
    config_q, params_q, _ = load_gguf(quantized)
    config_f, params_f, _ = load_gguf(f32)
    assert config_q == config_f
    leaves_q, leaves_f = jax.tree.leaves(params_q), jax.tree.leaves(params_f)
    assert len(leaves_q) == len(leaves_f)
    for a, b in zip(leaves_q, leaves_f, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_f32_gguf_keeps_the_metadata_but_the_file_type(quantized_and_f32):
    quantized, f32 = quantized_and_f32
    q, f = gguf.GGUFReader(str(quantized)).fields, gguf.GGUFReader(str(f32)).fields
    assert f["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    keys = set(q) - {"general.file_type"}
    assert keys <= set(f)
    for key in keys - {"GGUF.kv_count"}:
        assert q[key].contents() == f[key].contents(), key


def test_llama_server_config_names_a_missing_binary(tmp_path):
    with pytest.raises(ValueError, match="not an executable llama-server"):
        LlamaServerConfig(binary=str(tmp_path / "nope"), model="m.gguf", parallel=2, slot_context=64)
