"""Tensor parallelism on 4 CPU devices (tests/conftest.py forces them): the same greedy tokens as one
device, logits within float32 rounding, and parameters and KV pages really split over the devices."""

import dataclasses

import jax
import numpy as np
import pytest

from fastgen_jax import parallel, quantize
from fastgen_jax.attention import get_attention
from fastgen_jax.checkpoints import Checkpoint, load_checkpoint
from fastgen_jax.config import ConfigError, EngineConfig
from fastgen_jax.llm_engine import LLMEngine
from fastgen_jax.tokenizer import Tokenizer
from tests.models.test_llama_parity import TINY_MODELS, make_tiny_model
from tests.paged import paged_logits
from tests.test_llm_engine import run_all

TP_SIZES = (1, 2, 4)
LOGIT_TOL = 2e-4  # float32: only the order of the sums over the split axes differs
# int8 weights: the activations are rounded to bfloat16 before each product (`Attention.int8_matmul`),
# so one that the sums' order moves across a rounding boundary moves by a bfloat16 step (seen: 1.0e-3)
INT8_LOGIT_TOL = 5e-3
# One bucket and two page-table widths: 2 programs to compile per engine.
ENGINE = EngineConfig(
    token_budget=32, token_buckets=(32,), max_num_seqs=8, max_model_len=128, num_pages=16, page_size=64
)
# qwen2-bias replicates its one KV head, tied-embeddings pads 2 KV heads to 4 on 4 devices; the
# other shapes divide evenly and run with the slow tests.
FAST_TINY = ("qwen2-bias",)  # one KV head, biases; the others run with -m slow (CI time)

pytestmark = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices (see tests/conftest.py)")


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_checkpoint(smollm2_dir)


@pytest.fixture(
    scope="module",
    params=[n if n in FAST_TINY else pytest.param(n, marks=pytest.mark.slow) for n in sorted(TINY_MODELS)],
)
def tiny(request, tmp_path_factory, smollm2_dir):
    name, _, config, params = make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    return name, Checkpoint(config, params, Tokenizer.from_hf_dir(smollm2_dir), name)


def sharded(checkpoint: Checkpoint, tp: int, int8: bool = False):
    """(device config, params placed over the first `tp` devices, attention over that mesh); with
    `int8`, the weights quantized and split as the runner does (`quantize="int8"`)."""
    mesh = parallel.make_mesh(jax.devices()[:tp])
    params = parallel.shard_params(checkpoint.params, checkpoint.config, mesh, np.float32)
    if int8:
        params = quantize.quantize_over(params, checkpoint.config, mesh)
    return parallel.shard_config(checkpoint.config, tp), params, get_attention("reference").over(mesh)


def logits_over_tp(checkpoint: Checkpoint, ids, chunks, impl="reference", int8=False):
    out = {}
    for tp in TP_SIZES:
        config, params, attention = sharded(checkpoint, tp, int8)
        attention = dataclasses.replace(attention, impl=impl)
        out[tp] = paged_logits(config, params, ids, chunks=chunks, attention=attention)
    return out


def greedy_over_tp(checkpoint: Checkpoint, prompts, num_new, sizes=TP_SIZES, **options):
    out = {}
    for tp in sizes:
        config = dataclasses.replace(ENGINE, tensor_parallel=tp, **options)
        out[tp] = run_all(LLMEngine(checkpoint, config, "float32", progress=False), prompts, num_new)
    return out


def workload(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = [70, 5, 33, 1, 12]  # 70 and 33 are split under the budget of 32
    return [rng.integers(3, vocab, n).tolist() for n in lengths], [12, 20, 8, 16, 10]


def assert_logits_agree(name: str, logits: dict[int, np.ndarray], tol: float = LOGIT_TOL) -> None:
    for tp in TP_SIZES[1:]:
        diff = float(np.abs(logits[tp] - logits[1]).max())
        print(f"{name} tp={tp}: max |logit - one device| = {diff:.2e}")
        assert diff < tol, (name, tp, diff)
        assert (logits[tp].argmax(-1) == logits[1].argmax(-1)).all()


def test_tiny_models_give_the_same_logits_and_greedy_tokens_on_1_2_and_4_devices(tiny):
    name, checkpoint = tiny
    ids = np.random.default_rng(1).integers(0, checkpoint.config.vocab_size, 40).tolist()
    assert_logits_agree(name, logits_over_tp(checkpoint, ids, chunks=[17, 1, 22]))
    prompts, num_new = workload(checkpoint.config.vocab_size)
    tokens = greedy_over_tp(checkpoint, prompts, num_new)
    assert tokens[2] == tokens[1] and tokens[4] == tokens[1]
    assert [len(t) for t in tokens[1]] == num_new


@pytest.mark.slow  # 29 s (CI time); the int8 split layout and one-device int8 parity run by default
def test_int8_weights_split_over_1_2_and_4_devices_give_the_same_logits_and_greedy_tokens(tiny):
    """The int8 rows and scales split by the float weights' rules (one KV head replicated, biases; with
    -m slow padded heads and a tied head too): each device holds what one device would for its heads,
    so only the order of the float32 sums differs (and the bfloat16 rounding of the activations it
    feeds)."""
    name, checkpoint = tiny
    ids = np.random.default_rng(1).integers(0, checkpoint.config.vocab_size, 40).tolist()
    logits = logits_over_tp(checkpoint, ids, chunks=[17, 1, 22], int8=True)
    assert_logits_agree(f"{name} int8", logits, INT8_LOGIT_TOL)
    float32 = paged_logits(checkpoint.config, checkpoint.params, ids, chunks=[17, 1, 22])
    assert np.abs(logits[1] - float32).max() > 10 * LOGIT_TOL  # int8 weights really multiplied
    prompts, num_new = workload(checkpoint.config.vocab_size, seed=1)
    tokens = greedy_over_tp(checkpoint, prompts, num_new, sizes=(1, 4), quantize="int8")
    assert tokens[4] == tokens[1]


@pytest.mark.slow  # 45 s (CI time); the tiny models run by default, this with -m slow
def test_smollm2_gives_the_same_logits_and_greedy_tokens_on_1_2_and_4_devices(smollm2):
    # 3 KV heads: 2 and 4 devices pad them to 4 (and the 9 query heads to 12).
    assert parallel.shard_config(smollm2.config, 2).num_kv_heads == 4
    ids = smollm2.tokenizer.encode("The capital of France is Paris. The capital of Italy is")
    assert_logits_agree("smollm2", logits_over_tp(smollm2, ids, chunks=[len(ids) - 4, 4]))
    prompts = [
        smollm2.tokenizer.encode(p)
        for p in ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,")
    ]
    tokens = greedy_over_tp(smollm2, prompts, [10, 10, 10])
    assert tokens[2] == tokens[1] and tokens[4] == tokens[1]
    assert smollm2.tokenizer.decode(tokens[4][0]).startswith(" Paris")


def test_the_pallas_kernel_runs_per_shard_like_the_reference(smollm2_dir, tmp_path):
    _, _, config, params = make_tiny_model("llama2", tmp_path)
    checkpoint = Checkpoint(config, params, Tokenizer.from_hf_dir(smollm2_dir), "llama2")
    ids = np.random.default_rng(2).integers(0, config.vocab_size, 24).tolist()
    reference = paged_logits(config, params, ids, chunks=[20, 4], attention=get_attention("reference"))
    config, params, attention = sharded(checkpoint, 4)
    attention = dataclasses.replace(attention, impl="pallas_interpret")
    kernel = paged_logits(config, params, ids, chunks=[20, 4], attention=attention)
    assert np.abs(kernel - reference).max() < LOGIT_TOL


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the C++ kernel runs on the CPU backend")
def test_the_cpu_kernel_runs_per_shard_like_the_reference(smollm2_dir, tmp_path):
    """2 KV heads split over 2 devices and padded to 4 on 4 (and 6 query heads to 12), each device's
    kernel on its own pages. (A tiny model: SmolLM2 took 27 s of the default suite here.)"""
    _, _, config, params = make_tiny_model("tied-embeddings", tmp_path)
    assert parallel.shard_config(config, 4).num_kv_heads == 4
    checkpoint = Checkpoint(config, params, Tokenizer.from_hf_dir(smollm2_dir), "tied-embeddings")
    ids = np.random.default_rng(3).integers(0, config.vocab_size, 21).tolist()
    chunks = [17, 1, 3]
    reference = paged_logits(config, params, ids, chunks=chunks, attention=get_attention("reference"))
    kernel = logits_over_tp(checkpoint, ids, chunks, impl="cpu")
    for tp in TP_SIZES:
        assert np.abs(kernel[tp] - reference).max() < LOGIT_TOL, tp


@pytest.mark.parametrize("weights", ["none", "int8"])
def test_parameters_and_kv_pages_are_split_not_replicated(smollm2, weights):
    whole = sum(x.nbytes for x in jax.tree.leaves(smollm2.params))
    if weights == "int8":
        whole = quantize.quantized_nbytes(smollm2.params, smollm2.config.tie_word_embeddings)
    for tp in (2, 4):
        config = dataclasses.replace(ENGINE, tensor_parallel=tp, quantize=weights)
        engine = LLMEngine(smollm2, config, "float32", warmup=False)
        params, kv = engine.runner.params, engine.runner.kv_cache
        per_device = parallel.bytes_per_device(params)
        assert len(per_device) == tp and len(set(per_device.values())) == 1
        padded = sum(x.nbytes for x in jax.tree.leaves(params))  # the global (padded) arrays
        replicated = sum(x.nbytes for x in jax.tree.leaves(params) if x.sharding.is_fully_replicated)
        assert per_device["cpu:0"] == (padded - replicated) // tp + replicated
        # only the norm scales (int8: and the scales of wo, w_down and the head, whose outputs are whole)
        assert replicated < (0.001 if weights == "none" else 0.003) * whole
        print(f"tp={tp}: {per_device['cpu:0'] / whole:.3f} of the unsharded weights per device")
        assert per_device["cpu:0"] < 1.15 * whole / tp  # heads padded from 3 to 4 KV heads
        kv_per_device = parallel.bytes_per_device(kv)
        assert set(kv_per_device.values()) == {sum(x.nbytes for x in kv) // tp}


def test_device_groups_split_devices_and_name_what_is_missing():
    devices = jax.devices()
    assert parallel.device_groups(2, 2) == [devices[0:2], devices[2:4]]
    assert parallel.device_groups(1, 4)[3] == [devices[3]]
    with pytest.raises(ConfigError, match="needs 8 devices"):
        parallel.device_groups(4, 2)
    with pytest.raises(ConfigError, match="tensor_parallel must be positive"):
        EngineConfig(tensor_parallel=0)
