"""Tensor parallelism for a mixture-of-experts and the Gemma families on 4 CPU devices: the same greedy
tokens on 1, 2 and 4 devices, logits within float32 rounding, and expert weights really split."""

import dataclasses

import jax
import numpy as np
import pytest

from fastgen_jax import parallel
from fastgen_jax.checkpoints import Checkpoint
from fastgen_jax.llm_engine import LLMEngine
from fastgen_jax.tokenizer import Tokenizer
from tests.models.test_family_parity import make_tiny_model
from tests.test_tensor_parallel import (
    ENGINE,
    INT8_LOGIT_TOL,
    assert_logits_agree,
    greedy_over_tp,
    logits_over_tp,
    workload,
)

pytestmark = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices (see tests/conftest.py)")


@pytest.fixture(
    scope="module",
    params=[
        "qwen2-moe-shared",
        "gemma3",
        pytest.param("gemma2", marks=pytest.mark.slow),
        pytest.param("falcon-7b-layout", marks=pytest.mark.slow),  # unfused, ungated MLP (w_up)
    ],
)
def tiny(request, tmp_path_factory, smollm2_dir):
    name, _, config, params = make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    return name, Checkpoint(config, params, Tokenizer.from_hf_dir(smollm2_dir), name)


@pytest.mark.slow
def test_same_logits_and_greedy_tokens_on_1_2_and_4_devices(tiny):
    name, checkpoint = tiny
    ids = np.random.default_rng(1).integers(0, checkpoint.config.vocab_size, 40).tolist()
    assert_logits_agree(name, logits_over_tp(checkpoint, ids, chunks=[17, 1, 22]))
    prompts, num_new = workload(checkpoint.config.vocab_size)
    tokens = greedy_over_tp(checkpoint, prompts, num_new)
    assert tokens[2] == tokens[1] and tokens[4] == tokens[1]


@pytest.mark.slow
def test_int8_weights_give_the_same_logits_and_greedy_tokens_on_1_2_and_4_devices(tiny):
    """int8 projections next to float experts (MoE), a tied head with Gemma's scaled embedding, and an
    unfused MLP (Falcon): split by the rules the Llama-like models' int8 test checks."""
    name, checkpoint = tiny
    ids = np.random.default_rng(1).integers(0, checkpoint.config.vocab_size, 40).tolist()
    assert_logits_agree(
        f"{name} int8", logits_over_tp(checkpoint, ids, [17, 1, 22], int8=True), INT8_LOGIT_TOL
    )
    prompts, num_new = workload(checkpoint.config.vocab_size, seed=1)
    tokens = greedy_over_tp(checkpoint, prompts, num_new, sizes=(1, 4), quantize="int8")
    assert tokens[4] == tokens[1]


def test_experts_are_split_over_the_devices(tmp_path, smollm2_dir):
    _, _, config, params = make_tiny_model("qwen2-moe-shared", tmp_path)
    checkpoint = Checkpoint(config, params, Tokenizer.from_hf_dir(smollm2_dir), "moe")
    whole = sum(x.nbytes for x in jax.tree.leaves(params))
    for tp in (2, 4):
        engine = LLMEngine(
            checkpoint, dataclasses.replace(ENGINE, tensor_parallel=tp), "float32", warmup=False
        )
        layers = engine.runner.params["params"]["layers"]["moe"]
        for name in ("w_gate", "w_up", "w_down"):
            assert not layers[name].sharding.is_fully_replicated, name
            assert not layers["shared"][name].sharding.is_fully_replicated, name
        per_device = parallel.bytes_per_device(engine.runner.params)["cpu:0"]
        print(f"moe tp={tp}: {per_device / whole:.3f} of the unsharded weights per device")
        assert per_device < 1.25 * whole / tp  # the router and the norms are replicated
