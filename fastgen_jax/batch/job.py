"""A batch job: stream the input file through one engine, write each result as it finishes.

`run_batch` reads the input lazily and keeps at most `max_in_flight` sequences in the engine (by
default twice `max_num_seqs`, so that a waiting queue is always there to fill the token budget when
sequences finish), tops the engine up before every step, and appends each line's output the moment
its last sequence finishes (completion order). Memory therefore stays flat in the file's length:
what grows is one key per input line (to skip answered lines and spot repeated `custom_id`s).

Where the pending requests could be reordered (e.g. to group shared prefixes for a prefix cache),
`_admit` is the place: it decides which parsed line enters the engine next.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Iterator
from typing import IO

from fastgen_jax.batch import output
from fastgen_jax.batch.formats import Job, OpenAIBatchFormat, SimpleFormat
from fastgen_jax.llm_engine import LLMEngine
from fastgen_jax.server.openai_format import Choice

Format = OpenAIBatchFormat | SimpleFormat


@dataclasses.dataclass
class Summary:
    """What a job did; `earlier_*` counts lines answered by the run(s) `--resume` continues."""

    ok: int = 0
    failed: int = 0
    earlier_ok: int = 0
    earlier_failed: int = 0
    prompt_tokens: int = 0  # of every sequence started (a prompt with n choices counts n times)
    generated_tokens: int = 0
    seconds: float = 0.0

    @property
    def any_failed(self) -> bool:
        return bool(self.failed or self.earlier_failed)

    def line(self) -> str:
        tokens = self.prompt_tokens + self.generated_tokens
        earlier = (
            f" (and {self.earlier_ok} ok, {self.earlier_failed} failed before resuming)"
            if self.earlier_ok or self.earlier_failed
            else ""
        )
        return (
            f"batch: {self.ok} ok, {self.failed} failed{earlier}; {self.prompt_tokens} prompt + "
            f"{self.generated_tokens} generated tokens in {self.seconds:.1f} s: "
            f"{self.generated_tokens / max(self.seconds, 1e-9):.1f} generated tok/s, "
            f"{tokens / max(self.seconds, 1e-9):.1f} total tok/s"
        )


@dataclasses.dataclass
class _Running:
    """A line whose sequences are in the engine."""

    job: Job
    choices: list[Choice]
    remaining: int


class _Runner:
    """Steps one engine over a stream of jobs, writing each line's output as it completes."""

    def __init__(self, engine: LLMEngine, out: IO[str], max_in_flight: int, summary: Summary, bar):
        self.engine, self.out, self.max_in_flight = engine, out, max_in_flight
        self.summary, self.bar = summary, bar
        self.running: dict[str, tuple[_Running, int]] = {}  # engine request id -> (line, choice index)
        self.start = time.perf_counter()

    def run(self, jobs: Iterator[Job]) -> None:
        exhausted = False
        while True:
            exhausted = exhausted or self._admit(jobs)
            if not self.running:
                return
            for out in self.engine.step():
                self._collect(out)
            elapsed = time.perf_counter() - self.start
            self.bar.set_postfix(tok_s=f"{self.summary.generated_tokens / elapsed:.1f}", refresh=False)

    def _admit(self, jobs: Iterator[Job]) -> bool:
        """Adds lines until `max_in_flight` sequences run; True once the input is used up."""
        while len(self.running) < self.max_in_flight:
            job = next(jobs, None)
            if job is None:
                return True
            if job.error is not None:
                self._finish(job.error, failed=True)
                continue
            line = _Running(job, [Choice() for _ in job.requests], len(job.requests))
            for index, r in enumerate(job.requests):
                self.engine.add_request(
                    sampling_params=r.params,
                    request_id=r.request_id,
                    prompt_token_ids=r.prompt_token_ids,
                    cache_salt=r.cache_salt,
                )
                self.running[r.request_id] = (line, index)
                self.summary.prompt_tokens += len(r.prompt_token_ids)
        return False

    def _collect(self, out) -> None:
        line, index = self.running[out.request_id]
        line.choices[index].add(out)
        self.summary.generated_tokens += len(out.new_token_ids)
        if out.finished:
            del self.running[out.request_id]
            line.remaining -= 1
            if not line.remaining:
                self._finish(line.job.render(line.choices), failed=False)

    def _finish(self, record: dict, failed: bool) -> None:
        output.write_line(self.out, record)
        if failed:
            self.summary.failed += 1
            print(f"error: {_describe(record)}", file=sys.stderr)
        else:
            self.summary.ok += 1
        self.bar.update(1)


def _describe(failure: dict) -> str:
    if isinstance(failure["error"], str):  # the simple format
        return f"input line {failure['line']}: {failure['error']}"
    where = f"custom_id {failure['custom_id']!r}: " if failure["custom_id"] and "line" not in failure else ""
    return f"{where}{failure['error']['message']}"


def _jobs(fmt: Format, path: str, done: set[str]) -> Iterator[Job]:
    """Jobs for the input lines whose keys are not in `done`."""
    for line, text in output.input_lines(path):
        key, parsed = fmt.read(line, text)
        if key not in done:
            yield fmt.prepare(line, key, parsed)


def run_batch(
    engine: LLMEngine,
    fmt: Format,
    input_path: str,
    out: IO[str],
    *,
    output_path: str | None = None,
    resume: bool = False,
    ordered: bool = False,
    max_in_flight: int | None = None,
    progress: bool = True,
) -> Summary:
    """Answers every line of `input_path` not yet answered in `out` (see the module docstring)."""
    from tqdm.auto import tqdm

    summary, done = Summary(), set()
    if resume:
        done, summary.earlier_failed = output.answered(output_path, fmt.key_of, fmt.failed)
        summary.earlier_ok = len(done) - summary.earlier_failed
    total = sum(1 for _ in output.input_lines(input_path))
    limit = max_in_flight or 2 * engine.engine_config.max_num_seqs
    with tqdm(total=total, initial=len(done), desc="batch", unit="req", disable=not progress) as bar:
        runner = _Runner(engine, out, limit, summary, bar)
        runner.run(_jobs(fmt, input_path, done))
    summary.seconds = time.perf_counter() - runner.start
    if ordered:
        out.flush()
        output.rewrite_in_order(output_path, _positions(fmt, input_path))
    return summary


def _positions(fmt: Format, input_path: str):
    """Maps an output line to the number of the input line it answers (answers to lines no longer
    in the input go last)."""
    fmt.restart()
    lines = {fmt.read(line, text)[0]: line for line, text in output.input_lines(input_path)}
    return lambda record: lines.get(fmt.key_of(record), math.inf)
