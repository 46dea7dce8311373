"""The results file: appended a line at a time, read back by `--resume`, reordered by `--ordered`.

Each output line is written with one `write` and flushed at once, so a killed job loses at most the
line it was writing. `--resume` reads the file back, cuts a last line left incomplete by such a kill,
and returns the keys already answered; a damaged line anywhere else stops the job instead of being
guessed at.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any

Record = dict[str, Any]


class OutputError(ValueError):
    """The output file cannot be continued as it is; the message says why."""


def input_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number from 1, text) for each non-blank line, read lazily."""
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if text.strip():
                yield number, text


def answered(path: str, key_of: Callable[[Record], str], failed: Callable[[Record], bool]) -> tuple[set, int]:
    """Keys of the output lines in `path` and how many of them failed. A last line without its
    newline (a job killed while writing it) is cut off the file; a bad line before it is an error."""
    keys, num_failed, good_end = set(), 0, 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                record = json.loads(raw) if raw.endswith(b"\n") else None
            except json.JSONDecodeError:
                record = None
            if record is None:
                if f.read(1):
                    raise OutputError(f"{path}: the line at byte {good_end} is not a complete JSON line")
                break
            keys.add(key_of(record))
            num_failed += failed(record)
            good_end += len(raw)
    size = os.path.getsize(path)
    if size > good_end:
        print(
            f"warning: {path}: cut an incomplete last line ({size - good_end} bytes) left by a killed run",
            file=sys.stderr,
        )
        os.truncate(path, good_end)
    return keys, num_failed


def write_line(out: IO[str], record: Record) -> None:
    """One output line, flushed at once."""
    out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()


def rewrite_in_order(path: str, position: Callable[[Record], int]) -> None:
    """Rewrites `path` with its lines sorted by `position` (the input line each answers); only the
    line offsets are held in memory."""
    offsets = []
    with open(path, "rb") as f:
        at = 0
        for raw in f:
            offsets.append((position(json.loads(raw)), at, len(raw)))
            at += len(raw)
    offsets.sort()
    tmp = f"{path}.ordering"
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        for _, at, length in offsets:
            src.seek(at)
            dst.write(src.read(length))
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)
