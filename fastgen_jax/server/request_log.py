"""The request log (`serve --request_log=path`): one JSON line per finished request, for trace replay.

Each line describes one generated sequence (a request with `n` > 1 writes n lines):

    {"arrival": 1767000000.123, "prompt_tokens": 512, "output_tokens": 32, "finish_reason": "length",
     "ttft": 0.81, "latency": 4.2, "sla_prompt": true, "sla_generation": true,
     "sla": {"prompt_rate": 512.0, "token_rate": 4.0, "priority": 0}, "admission_slack": 0.42}

`arrival` is wall-clock seconds since the epoch (so logs of several runs can be told apart); `ttft`
and `latency` are seconds from arrival; the `sla_*` fields are the server's verdict (null for aborted
requests, which are not judged) by the request's own SLA when it set one (`sla`, null otherwise);
`admission_slack` (under `--policy=sla`, else null) is the seconds its first-token deadline was
ahead of its predicted prefill when it was admitted (negative: it was already late). Lines are
written in finishing order, by the engine thread, one `write` each, line-buffered, so a log can be
read while the server runs.
`python -m fastgen_jax.benchmarks.trace` turns a log into a replayable trace.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time

from fastgen_jax.engine.sla_policy import RequestSLA
from fastgen_jax.output_processor import RequestOutput
from fastgen_jax.sla import Verdict


class RequestLog:
    def __init__(self, path: str):
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the server
        self._lock = threading.Lock()

    def write(
        self, out: RequestOutput, now: float, verdict: Verdict | None, own_sla: RequestSLA | None = None
    ) -> None:
        """Logs a finished request (`out.timing`: when it arrived and got its tokens, time.monotonic)
        that finished at `now`."""
        timing = out.timing
        arrival, token_times = timing.arrival, timing.token_times
        entry = {
            "arrival": round(time.time() - (time.monotonic() - arrival), 6),
            "prompt_tokens": out.prompt_length,
            "output_tokens": out.generated_length,
            "finish_reason": out.finish_reason or "abort",
            "ttft": round(token_times[0] - arrival, 6) if token_times else None,
            "latency": round(now - arrival, 6),
            "sla_prompt": verdict.prompt if verdict else None,
            "sla_generation": verdict.generation if verdict else None,
            "sla": dataclasses.asdict(own_sla) if own_sla else None,
            "admission_slack": None if timing.admission_slack is None else round(timing.admission_slack, 6),
        }
        with self._lock:
            self._file.write(json.dumps(entry) + "\n")

    def close(self) -> None:
        with self._lock:
            self._file.close()
