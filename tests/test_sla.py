"""The SLA verdict by part, on hand-made token times (the same judge the benchmark and /metrics use)."""

import pytest

from fastgen_jax.sla import SLA, Verdict

SLA_2 = SLA(prompt_rate=100.0, token_rate=2.0)  # first token within prompt / 100 s; EMA of gaps <= 0.5 s


def test_a_verdict_names_each_part():
    assert SLA_2.judge(0.0, 100, [0.9, 1.2, 1.5]) == Verdict(prompt=True, generation=True)
    assert SLA_2.judge(0.0, 100, [1.1, 1.2, 1.5]) == Verdict(prompt=False, generation=True)
    assert SLA_2.judge(0.0, 100, [0.9, 1.6]) == Verdict(prompt=True, generation=False)  # first gap 0.7 s
    assert Verdict(True, False).parts() == {"prompt": True, "generation": False, "both": False}


def test_a_single_token_has_no_gaps_to_judge():
    assert SLA_2.judge(10.0, 1000, [15.0]) == Verdict(prompt=True, generation=True)


def test_no_token_cannot_be_judged_and_rates_must_be_positive():
    with pytest.raises(ValueError, match="no token"):
        SLA_2.judge(0.0, 10, [])
    with pytest.raises(ValueError, match="positive"):
        SLA(prompt_rate=0.0)
