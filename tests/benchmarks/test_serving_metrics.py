"""The serving metrics on hand-made timelines: SLA checks, the EMA, percentiles, the summary."""

import pytest

from fastgen_jax.benchmarks.load import Workload
from fastgen_jax.benchmarks.serving_metrics import SLA, RequestRecord, ema_series, percentile, summarize


def record(send, chunks, prompt=100, output=None, error=None):
    return RequestRecord(send, list(chunks), prompt, len(chunks) if output is None else output, error=error)


def test_ema_is_seeded_with_the_first_value_and_uses_alpha_2_over_span_plus_1():
    assert ema_series([], 16) == []
    assert ema_series([1.0, 1.0, 1.0], 16) == [1.0, 1.0, 1.0]
    alpha = 2 / 17
    assert ema_series([0.0, 1.0, 1.0], 16) == pytest.approx([0.0, alpha, alpha + (1 - alpha) * alpha])


def test_percentiles_interpolate_linearly():
    assert percentile([], 50) is None
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10, 20], 90) == pytest.approx(19.0)
    assert percentile(list(range(101)), 99) == 99


def test_record_derives_ttft_latency_itl_and_tpot():
    r = record(10.0, [10.5, 10.7, 11.0, 11.1], output=4)
    r.end_time = 11.2
    assert r.ttft == pytest.approx(0.5)
    assert r.latency == pytest.approx(1.2)
    assert r.itls == pytest.approx([0.2, 0.3, 0.1])
    assert r.tpot == pytest.approx(0.6 / 3)
    assert record(0.0, [1.0]).tpot is None  # one token has no gaps


SLA_4 = SLA(prompt_rate=100.0, token_rate=4.0)  # TTFT <= prompt / 100 s; EMA of gaps <= 0.25 s


def test_sla_needs_first_token_within_prompt_over_rate():
    steady = [0.2 * i for i in range(10)]
    assert SLA_4.met(record(0.0, [0.8 + t for t in steady], prompt=100))  # TTFT 0.8 <= 1.0
    assert not SLA_4.met(record(0.0, [1.5 + t for t in steady], prompt=100))  # TTFT 1.5 > 1.0
    assert SLA_4.met(record(0.0, [1.5 + t for t in steady], prompt=200))  # allowed 2.0 s


def test_sla_tolerates_one_slow_gap_but_not_a_stall():
    fast = [0.1 * i for i in range(20)]
    one_hiccup = fast[:10] + [t + 0.6 for t in fast[10:]]  # one 0.7 s gap: EMA peaks at ~0.17
    stall = fast[:10] + [t + 3.0 for t in fast[10:]]  # one 3.1 s gap: EMA jumps to ~0.45
    assert SLA_4.met(record(0.0, [0.5 + t for t in one_hiccup]))
    assert not SLA_4.met(record(0.0, [0.5 + t for t in stall]))
    assert not SLA_4.met(record(0.0, [0.5 + 0.3 * i for i in range(10)]))  # steadily too slow


def test_failed_requests_miss_the_sla_and_count_as_failed():
    assert not SLA_4.met(record(0.0, [0.1, 0.2], error="HTTP 500"))
    assert not SLA_4.met(record(0.0, []))


def test_summary_of_a_hand_made_point():
    records = [
        record(0.0, [0.5, 0.7, 0.9], prompt=100, output=3),  # meets the SLA
        record(1.0, [3.0, 3.2], prompt=100, output=2),  # TTFT 2.0 > 1.0
        record(2.0, [2.2, 2.4, 5.0], prompt=100, output=3),  # a 2.6 s gap: EMA 0.51 > 0.25
        record(3.0, [], prompt=100, output=0, error="HTTP 503"),
    ]
    s = summarize(records, wall_seconds=10.0, sla=SLA_4)
    assert s["requests"] == 4 and s["failed"] == 1
    assert s["throughput_rps"] == pytest.approx(0.3)
    assert s["output_tokens_per_s"] == pytest.approx(0.8)
    assert s["sla_fraction"] == pytest.approx(0.25)
    assert s["effective_throughput_rps"] == pytest.approx(0.1)
    assert s["ttft_mean"] == pytest.approx((0.5 + 2.0 + 0.2) / 3)
    assert s["latency_mean"] == pytest.approx((0.9 + 2.2 + 3.0) / 3)
    assert s["itl_p50"] == pytest.approx(0.2)
    assert s["tpot_mean"] == pytest.approx((0.2 + 0.2 + 1.4) / 3)


def test_workload_lengths_are_normal_clipped_and_reproducible():
    w = Workload(prompt_mean=100, gen_mean=20, prompt_max=130, gen_max=40)
    a, b = w.requests(2000, seed=3), w.requests(2000, seed=3)
    assert a == b
    prompts = [len(p) for p, _ in a]
    gens = [g for _, g in a]
    assert min(prompts) >= 1 and max(prompts) == 130 and min(gens) >= 1 and max(gens) <= 40
    assert 95 < sum(prompts) / len(prompts) < 101  # the clip at 130 pulls the mean down a little
    assert all(w.token_low <= t < w.token_high for p, _ in a[:50] for t in p)
