"""Traces from request logs: arrival order, offsets from the first request, exact token counts."""

import json

import numpy as np
import pytest

from fastgen_jax.benchmarks.trace import (
    TraceEntry,
    fastgen_shaped,
    from_request_log,
    main,
    read_trace,
    trace_requests,
    write_trace,
)


def log_line(arrival, prompt, output, reason="length"):
    return json.dumps(
        {"arrival": arrival, "prompt_tokens": prompt, "output_tokens": output, "finish_reason": reason}
    )


def test_a_log_becomes_a_trace_in_arrival_order_from_zero():
    lines = [log_line(1000.5, 30, 4), log_line(1000.0, 10, 2), "", log_line(1002.25, 7, 1, "stop")]
    assert from_request_log(lines) == [
        TraceEntry(0.0, 10, 2),
        TraceEntry(0.5, 30, 4),
        TraceEntry(2.25, 7, 1),
    ]


def test_requests_aborted_before_their_first_token_are_left_out_and_since_filters():
    lines = [log_line(10.0, 5, 0, "abort"), log_line(11.0, 6, 3, "abort"), log_line(12.0, 7, 2)]
    assert from_request_log(lines) == [TraceEntry(0.0, 6, 3), TraceEntry(1.0, 7, 2)]
    assert from_request_log(lines, since=11.5) == [TraceEntry(0.0, 7, 2)]
    assert from_request_log([]) == []


def test_trace_files_round_trip_and_the_cli_writes_one(tmp_path, capsys):
    log = tmp_path / "requests.jsonl"
    log.write_text("\n".join([log_line(5.0, 3, 2), log_line(6.5, 4, 1)]) + "\n")
    main([str(log), str(tmp_path / "trace.jsonl")])
    assert read_trace(str(tmp_path / "trace.jsonl")) == [TraceEntry(0.0, 3, 2), TraceEntry(1.5, 4, 1)]
    assert "wrote 2 requests over 1.5 s" in capsys.readouterr().out
    write_trace([TraceEntry(1.0, 2, 3), TraceEntry(0.5, 2, 3)], str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="ascending"):
        read_trace(str(tmp_path / "bad.jsonl"))


def test_replayed_prompts_have_exactly_the_traced_lengths():
    requests = trace_requests([TraceEntry(0.0, 3, 2), TraceEntry(1.0, 17, 5)], seed=1)
    assert [(len(p), g) for p, g in requests] == [(3, 2), (17, 5)]
    assert all(100 <= t < 10000 for p, _ in requests for t in p)


def test_a_fastgen_shaped_trace_has_poisson_arrivals_and_bounded_normal_lengths(tmp_path):
    entries = fastgen_shaped(2000, rate=0.5, seed=1)
    arrivals = np.array([e.arrival for e in entries])
    assert arrivals[0] == 0.0 and (np.diff(arrivals) >= 0).all()
    assert np.mean(np.diff(arrivals)) == pytest.approx(2.0, rel=0.1)  # 1 / rate
    prompts, gens = np.array([e.prompt_tokens for e in entries]), np.array([e.output_tokens for e in entries])
    assert prompts.min() >= 1 and prompts.max() <= 900 and gens.min() >= 1 and gens.max() <= 64
    assert np.mean(prompts) == pytest.approx(512, rel=0.05) and np.std(gens) == pytest.approx(9.6, rel=0.1)
    main(["--fastgen_shaped=5", "--rate=2", str(tmp_path / "t.jsonl")])
    assert len(read_trace(str(tmp_path / "t.jsonl"))) == 5
    with pytest.raises(SystemExit):
        main(["log.jsonl", "--fastgen_shaped=5", str(tmp_path / "t.jsonl")])
