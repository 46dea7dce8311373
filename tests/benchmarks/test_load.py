"""`fastgen_jax.benchmarks.load.start_server`: a server that exits before listening is reported with
its own last words (its stderr), not only its exit code."""

from __future__ import annotations

import pytest

from fastgen_jax.benchmarks.load import start_server


def test_a_server_that_exits_before_listening_is_reported_with_its_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(RuntimeError, match=r"exited \(1\) before listening") as raised:
        start_server([f"--model={missing}"])
    assert f"no checkpoint at {missing}" in str(raised.value)
