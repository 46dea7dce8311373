"""StepPlanner: a scheduled step as a StepPlan of static-shaped arrays, checked value by value."""

import dataclasses

import numpy as np
import pytest

from fastgen_jax.config import EngineConfig
from fastgen_jax.engine import (
    PageTables,
    ScheduledSeq,
    Scheduler,
    SchedulerOutput,
    Sequence,
    SequenceStatus,
    StepPlan,
    StepPlanner,
)
from fastgen_jax.sampling_params import SamplingParams

CONFIG = EngineConfig(
    token_budget=16,
    token_buckets=(8, 16),
    max_num_seqs=4,
    page_size=4,
    num_pages=16,
    max_model_len=32,
)


def running_seq(tables, request_id, prompt, output, num_computed, page_table):
    """A sequence as the scheduler leaves it mid-generation, its pages in a row of `tables`."""
    seq = Sequence(request_id, prompt, max_tokens=8)
    for token in output:
        seq.append_token(token)
    seq.num_computed_tokens = num_computed
    seq.page_table = page_table
    seq.page_table_row = tables.add_row(page_table)
    seq.status = SequenceStatus.RUNNING
    return seq


def mixed_step():
    """Two decodes, then a prompt chunk of 3 tokens starting mid-page (positions 6..8)."""
    tables = PageTables(max_seqs=4, max_pages_per_seq=8)
    a = running_seq(tables, "a", [11, 12, 13, 14, 15], [16], num_computed=5, page_table=[3, 7])
    b = running_seq(tables, "b", [21, 22, 23, 24], [25, 26, 27, 28], 7, page_table=[5, 2])
    b.sampling_params = SamplingParams(temperature=0.5, top_k=7, top_p=0.75, seed=42, logprobs=True)
    c = running_seq(tables, "c", list(range(31, 44)), [], 6, page_table=[9, 4, 12, 6])
    return SchedulerOutput(
        page_tables=tables,
        scheduled=[
            ScheduledSeq(a, 1, 5, True, output_index=1),
            ScheduledSeq(b, 1, 7, True, output_index=4),
            ScheduledSeq(c, 3, 6, False),
        ],
        num_tokens=5,
    )


def arrays(plan: StepPlan) -> dict[str, np.ndarray]:
    """Every array of a plan by field name (attention and sampling fields flattened)."""
    md, sampling = plan.attention, plan.sampling
    fields = {"token_ids": plan.token_ids, "previous_slot": plan.previous_slot}
    for part in (md, sampling):
        fields |= {f.name: getattr(part, f.name) for f in dataclasses.fields(part)}
    return fields


def test_a_mixed_step_becomes_these_exact_arrays():
    plan = StepPlanner(CONFIG, num_pages=16, max_model_len=32).build(mixed_step())
    assert {name: value.tolist() for name, value in arrays(plan).items()} == {
        "token_ids": [16, 28, 37, 38, 39, 0, 0, 0],
        "previous_slot": [-1] * 8,  # every input token is on the host
        "positions": [5, 7, 6, 7, 8, 0, 0, 0],
        # a: page 7 offset 1; b: page 2 offset 3; c: page 4 offsets 2, 3 then page 12 offset 0;
        # padding rows: 16 pages * 4 = 64, one past the cache.
        "slot_mapping": [29, 11, 18, 19, 48, 64, 64, 64],
        "cu_q_lens": [0, 1, 2, 5, 5],
        "kv_lens": [6, 8, 9, 0],
        # c's 4th page (reserved for the rest of its prompt) is beyond its context: left out.
        "page_indices": [[3, 7, 0, 0], [5, 2, 0, 0], [9, 4, 12, 0], [0, 0, 0, 0]],
        "num_seqs": [3],
        "logits_indices": [0, 1, 4, 0],
        # a and c carry no SamplingParams (greedy); b's below. Padding: greedy, top_p 1.
        "temperature": [0.0, 0.5, 0.0, 0.0],
        "top_k": [0, 7, 0, 0],
        "top_p": [1.0, 0.75, 1.0, 1.0],
        "seed": [0, 42, 0, 0],
        "step": [1, 4, 0, 0],  # tokens generated so far
        "logprobs": [False, True, False, False],
        "draft_token_ids": [-1, -1, -1, -1],  # no speculation: one logit row per slot
        "cu_logit_rows": [0, 1, 2, 3, 4],
    }
    assert plan.shape == (8, 4) and plan.num_slots == 4


def test_a_step_with_draft_tokens_becomes_these_exact_arrays():
    """a verifies two draft tokens (17, 18) after its input token 16: rows 0-2, all three logit rows."""
    output = mixed_step()
    a = output.scheduled[0]
    a.num_new_tokens, a.draft_token_ids = 3, (17, 18)
    output.num_tokens += 2
    config = dataclasses.replace(CONFIG, speculative="ngram", speculative_logit_rows=4)
    plan = StepPlanner(config, num_pages=16, max_model_len=32).build(output)
    got = {name: value.tolist() for name, value in arrays(plan).items()}
    assert {k: got[k] for k in ("token_ids", "positions", "slot_mapping", "cu_q_lens", "kv_lens")} == {
        "token_ids": [16, 17, 18, 28, 37, 38, 39, 0],
        "positions": [5, 6, 7, 7, 6, 7, 8, 0],
        "slot_mapping": [29, 30, 31, 11, 18, 19, 48, 64],
        "cu_q_lens": [0, 3, 4, 7, 7],
        "kv_lens": [8, 8, 9, 0],
    }
    # L = min(T, S + 4) = 8 logit rows: a's three, b's, c's last, padding
    assert got["logits_indices"] == [0, 1, 2, 3, 6, 0, 0, 0]
    assert got["cu_logit_rows"] == [0, 3, 4, 5, 5]  # the unused slot owns no row
    assert got["draft_token_ids"] == [17, 18, -1, -1, -1, -1, -1, -1]
    assert got["step"] == [1, 2, 3, 4, 0, 0, 0, 0]  # row j of a draws a's (1 + j)-th token
    assert got["temperature"] == [0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0]
    assert got["seed"] == [0, 0, 0, 42, 0, 0, 0, 0]
    assert plan.has_drafts and plan.num_logit_rows == 8


def test_a_decode_whose_input_is_still_on_the_device_reads_it_from_the_step_in_flight():
    output = mixed_step()
    a = output.scheduled[0]
    a.seq.num_pending_tokens, a.previous_slot = 1, 3  # slot 3 of the step in flight samples its input
    a.start_position = a.seq.num_tokens  # the position of that pending token
    plan = StepPlanner(CONFIG, num_pages=16, max_model_len=32).build(output)
    assert plan.token_ids.tolist()[:2] == [0, 28]  # a's input is not on the host: a placeholder
    assert plan.previous_slot.tolist() == [3, -1, -1, -1, -1, -1, -1, -1]
    assert plan.attention.positions.tolist()[:2] == [6, 7]


def test_plan_arrays_are_int32_except_sampling_settings():
    plan = StepPlanner(CONFIG, num_pages=16, max_model_len=32).build(mixed_step())
    dtypes = {name: value.dtype for name, value in arrays(plan).items()}
    assert (dtypes.pop("temperature"), dtypes.pop("top_p")) == (np.float32, np.float32)
    assert (dtypes.pop("seed"), dtypes.pop("logprobs")) == (np.uint32, np.bool_)
    assert set(dtypes.values()) == {np.dtype(np.int32)}


def test_the_bucket_is_the_smallest_that_holds_the_step():
    builder = StepPlanner(CONFIG, num_pages=16, max_model_len=32)
    assert [builder.bucket_for(n) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]
    with pytest.raises(ValueError, match="exceed the largest bucket 16"):
        builder.bucket_for(17)


def test_sequence_slots_are_the_sequence_limit_or_the_bucket_whichever_is_smaller():
    builder = StepPlanner(EngineConfig(token_budget=64, max_num_seqs=24), num_pages=9, max_model_len=128)
    assert [builder.num_slots_for(b) for b in (16, 32, 64)] == [16, 24, 24]


def test_page_table_widths_are_powers_of_two_capped_at_max_model_len():
    builder = StepPlanner(CONFIG, num_pages=64, max_model_len=100)  # 25 pages of 4 tokens
    assert builder.page_table_widths == (1, 2, 4, 8, 16, 25)
    assert [builder.width_for(n) for n in (1, 2, 3, 5, 16, 17, 25)] == [1, 2, 4, 8, 16, 25, 25]


def test_one_width_is_the_cap_for_every_context():
    """For an attention whose cost follows the real context: one program per bucket."""
    builder = StepPlanner(CONFIG, num_pages=16, max_model_len=32, one_width=True)  # 8 pages of 4 tokens
    assert builder.page_table_widths == (8,)
    assert [builder.width_for(n) for n in (1, 2, 5, 8)] == [8, 8, 8, 8]
    assert builder.shapes() == [(8, 8), (16, 8)]
    plan = builder.build(mixed_step())
    assert plan.page_table_width == 8
    narrow = StepPlanner(CONFIG, num_pages=16, max_model_len=32).build(mixed_step()).attention.page_indices
    used = narrow.shape[1]
    np.testing.assert_array_equal(plan.attention.page_indices[:, :used], narrow)
    assert not plan.attention.page_indices[:, used:].any()  # the extra columns point at page 0


def test_shapes_pair_every_bucket_with_every_width():
    builder = StepPlanner(CONFIG, num_pages=16, max_model_len=32)  # 8 pages of 4 tokens
    assert builder.shapes() == [(8, 1), (8, 2), (8, 4), (8, 8), (16, 1), (16, 2), (16, 4), (16, 8)]


def test_a_padding_plan_has_the_shapes_of_a_real_one_and_no_sequence():
    planner = StepPlanner(CONFIG, num_pages=16, max_model_len=32)
    padding = planner.padding(bucket=8, width=4)
    real = planner.build(mixed_step())
    assert {k: v.shape for k, v in arrays(padding).items()} == {k: v.shape for k, v in arrays(real).items()}
    assert {k: v.dtype for k, v in arrays(padding).items()} == {k: v.dtype for k, v in arrays(real).items()}
    assert padding.attention.num_seqs.tolist() == [0] and (padding.attention.slot_mapping == 64).all()


def test_a_timing_plan_holds_no_sequence_but_counts_every_row_as_real():
    """`padding(full_rows=True)` times a bucket (`LLMEngine._empty_step_seconds`): no sequence in use
    (attention and sampling see padding), while cu_q_lens[-1], the rows the projections multiply
    (the CPU kernels skip the rest), is the whole bucket; a plain padding plan's is 0."""
    planner = StepPlanner(CONFIG, num_pages=16, max_model_len=32)
    plain, timing = planner.padding(bucket=8, width=4), planner.padding(bucket=8, width=4, full_rows=True)
    assert plain.attention.cu_q_lens[-1] == 0 and timing.attention.cu_q_lens[-1] == 8
    assert timing.attention.num_seqs.tolist() == [0] and not timing.attention.cu_q_lens[:-1].any()
    for name, value in arrays(timing).items():
        if name != "cu_q_lens":
            np.testing.assert_array_equal(value, arrays(plain)[name])


def test_a_plan_built_from_the_scheduler_covers_its_whole_step():
    scheduler = Scheduler(CONFIG)
    for request_id, first, prompt_len in (("a", 1, 10), ("b", 21, 9)):  # no shared prefix
        scheduler.add(Sequence(request_id, range(first, first + prompt_len), max_tokens=4))
    plan = StepPlanner(CONFIG, num_pages=16, max_model_len=32).build(scheduler.schedule())
    assert plan.attention.cu_q_lens.tolist() == [0, 10, 16, 16, 16]  # b is cut after 6 tokens
    assert plan.token_ids.tolist() == [*range(1, 11), *range(21, 27)]
    assert plan.attention.page_indices[:2].tolist() == [[1, 2, 3, 0], [4, 5, 0, 0]]


def test_a_plan_is_frozen():
    plan = StepPlanner(CONFIG, num_pages=16, max_model_len=32).build(mixed_step())
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.token_ids = np.zeros(8, np.int32)


def test_a_sequence_without_pages_for_its_tokens_is_refused():
    tables = PageTables(max_seqs=4, max_pages_per_seq=8)
    seq = running_seq(tables, "a", [1, 2, 3, 4, 5], [], num_computed=0, page_table=[3])
    output = SchedulerOutput([ScheduledSeq(seq, 5, 0, True)], num_tokens=5, page_tables=tables)
    with pytest.raises(ValueError, match="lacks pages"):
        StepPlanner(CONFIG, num_pages=16, max_model_len=32).build(output)


def test_an_empty_step_has_no_plan():
    with pytest.raises(ValueError, match="empty step"):
        StepPlanner(CONFIG, num_pages=16, max_model_len=32).build(SchedulerOutput())


def test_request_limits_are_checked_in_one_place():
    from fastgen_jax.engine import EngineLimits, RequestError, check_request

    limits = EngineLimits(num_pages=9, page_size=4, max_model_len=32, vocab_size=100, kv_cache_bytes=0)
    check_request(limits, [1] * 31, 1)
    cases = [
        ([], 1, "prompt", "empty"),
        ([1] * 32, 1, "prompt", "32 tokens"),
        ([1] * 30, 3, "max_tokens", r"max_tokens \(3\) exceeds the context of 32"),
    ]
    cases.append(([100], 1, "prompt", r"\[0, 100\)"))
    for ids, max_tokens, param, message in cases:
        with pytest.raises(RequestError, match=message) as error:
            check_request(limits, ids, max_tokens)
        assert error.value.param == param


def test_limits_that_cannot_hold_one_sequence_are_refused():
    from fastgen_jax.config import ConfigError
    from fastgen_jax.engine import EngineLimits

    with pytest.raises(ConfigError, match="num_pages=8 .* max_model_len=32"):
        EngineLimits(num_pages=8, page_size=4, max_model_len=32, vocab_size=100, kv_cache_bytes=0)
