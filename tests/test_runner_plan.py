"""A step plan crosses to the device as one int32 array (`runner.pack_plan`) and is unpacked inside
the step (`runner.unpack_plan`): every field must come back with its shape, dtype and bits."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import fastgen_jax.models.metadata  # noqa: F401  (registers the plan's classes as pytrees)
from fastgen_jax.config import EngineConfig
from fastgen_jax.engine.batch import StepPlanner
from fastgen_jax.runner import pack_plan, unpack_plan


def _random_plan(bucket: int, seed: int):
    planner = StepPlanner(EngineConfig(token_budget=64, max_num_seqs=8, max_model_len=256), 64, 256)
    plan = planner.padding(bucket, planner.page_table_widths[-1])
    rng = np.random.default_rng(seed)

    def fill(a: np.ndarray) -> np.ndarray:
        if a.dtype == np.bool_:
            return rng.random(a.shape) < 0.5
        bits = rng.integers(-(2**31), 2**31, a.shape, dtype=np.int64).astype(np.int32)
        if a.dtype == np.float32:
            bits.reshape(-1)[:1] = np.float32(np.nan).view(np.int32)  # any bit pattern, NaN too
        return bits.view(a.dtype)

    return jax.tree.map(fill, plan)


@pytest.mark.parametrize("bucket", [16, 64])
def test_a_packed_plan_unpacks_to_the_same_arrays_and_bits(bucket):
    plan = _random_plan(bucket, seed=bucket)
    words, layout = pack_plan(plan)
    assert words.dtype == np.int32 and words.ndim == 1
    got = jax.jit(unpack_plan, static_argnums=1)(words, layout)
    for want, have in zip(jax.tree.leaves(plan), jax.tree.leaves(got), strict=True):
        have = np.asarray(have)
        assert have.shape == want.shape and have.dtype == want.dtype
        if want.dtype == np.bool_:
            np.testing.assert_array_equal(have, want)
        else:
            np.testing.assert_array_equal(have.view(np.int32), want.view(np.int32))
    assert pack_plan(_random_plan(bucket, seed=1))[1] == layout  # the layout is the shape's, not the data's


def test_a_plan_field_that_does_not_pack_is_named():
    plan = _random_plan(16, seed=0)
    wide = dataclasses.replace(plan, token_ids=plan.token_ids.astype(np.int64))
    with pytest.raises(TypeError, match="int64"):
        pack_plan(wide)


def _rows_in_use(plan) -> int:
    from fastgen_jax.models.layers import logit_rows_in_use

    md = jax.tree.map(jax.numpy.asarray, plan.attention)
    return int(jax.jit(logit_rows_in_use, static_argnums=1)(md, plan.num_logit_rows))


def test_the_lm_head_multiplies_exactly_the_logit_rows_a_plan_uses():
    """`logit_rows_in_use` (the LM head's `rows=`) against the planner's own count,
    `sampling.cu_logit_rows[num_seqs]`: a mixed step (three slots of four), the same step verifying
    two draft tokens (slot 0's first logit row is slab row 0, a real 0 among the padding's 0s), a
    prompt chunk alone (1 of its rows), and padding plans (no row used; a timing plan keeps its
    bucket's rows, so timing a bucket still costs a full LM head)."""
    from tests.engine.test_batch import CONFIG, mixed_step

    planner = StepPlanner(CONFIG, num_pages=16, max_model_len=32)
    mixed = planner.build(mixed_step())
    drafting = mixed_step()
    drafting.scheduled[0].num_new_tokens, drafting.scheduled[0].draft_token_ids = 3, (17, 18)
    drafting.num_tokens += 2
    config = dataclasses.replace(CONFIG, speculative="ngram", speculative_logit_rows=4)
    drafts = StepPlanner(config, num_pages=16, max_model_len=32).build(drafting)
    prompt_only = mixed_step()
    prompt_only.scheduled = prompt_only.scheduled[2:]
    prompt = planner.build(prompt_only)
    for plan, used in ((mixed, 3), (drafts, 5), (prompt, 1)):
        n = int(plan.attention.num_seqs[0])
        assert plan.sampling.cu_logit_rows[n] == used < plan.num_logit_rows
        assert _rows_in_use(plan) == used
    assert _rows_in_use(planner.padding(bucket=8, width=4)) == 0
    assert _rows_in_use(planner.padding(bucket=16, width=4, full_rows=True)) == 4  # L = min(T, S) = 4
