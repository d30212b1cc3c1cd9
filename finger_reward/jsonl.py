"""JSON Lines files: the one reader every JSONL input goes through, and the repair before appending.

Each value comes with where it stands ("PATH, line N", 1-based, blank lines counted), so every
caller's error can point at the exact line. Lines are decoded one at a time, so a file of any size
streams and a non-UTF-8 line is named like a JSON error. Results, pairs and rollouts files are
appended to as work finishes; a killed writer can leave a last line without its newline, which
`read_jsonl(torn_tail="skip")` passes over and `drop_torn_tail` cuts before a resumed run appends.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finger_reward.errors import FingerError

logger = logging.getLogger(__name__)

TORN_TAIL = ("error", "skip")
_BLOCK = 1 << 16  # bytes read at a time while looking back for the last line break


class JsonlError(FingerError):
    """A JSONL line that is not UTF-8, not JSON, or not the kind of value asked for."""

    def __init__(self, where: str, reason: str):
        self.where, self.reason = where, reason
        super().__init__(f"{where}: {reason}")


def read_jsonl(path: str | Path, *, torn_tail: str = "error", objects: bool = False) -> Iterator[tuple[str, Any]]:
    """Yield (where, value) for each non-blank line of `path`, where = "PATH, line N".

    A line that is not UTF-8 or not JSON raises `JsonlError` naming it. With `torn_tail="skip"` a
    last line that has no newline and does not parse (a killed writer's) is skipped with a warning
    instead. With `objects=True` every value must be a JSON object.
    """
    if torn_tail not in TORN_TAIL:
        raise ValueError(f"torn_tail={torn_tail!r}; expected one of {', '.join(TORN_TAIL)}")
    return _read(Path(path), torn_tail == "skip", objects)


def _read(path: Path, skip_torn_tail: bool, objects: bool) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                value = _loads(line)
            except ValueError as err:  # UnicodeDecodeError or JSONDecodeError
                if skip_torn_tail and not line.endswith(b"\n"):
                    logger.warning("%s: skipping an unfinished last line left by an interrupted run", where)
                    return
                raise JsonlError(where, _reason(err)) from None
            if objects and not isinstance(value, dict):
                raise JsonlError(where, f"expected a JSON object, got {type(value).__name__}")
            yield where, value


def _reason(err: ValueError) -> str:
    if isinstance(err, UnicodeDecodeError):
        return (f"not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start} of the line); "
                "save the file as utf-8")
    return f"not valid JSON ({err.msg} at column {err.pos + 1})"


def drop_torn_tail(path: str | Path) -> None:
    """Make `path` end with a line break, so appending starts on a fresh line.

    A last line without its newline that does not parse was cut short by a killed writer and is
    removed (with a warning); one that parses only lacked the newline, which is added. A missing
    file is left alone.
    """
    path = Path(path)
    if not path.is_file():
        return
    with path.open("r+b") as f:
        end = f.seek(0, os.SEEK_END)
        start = _last_line_start(f, end)
        f.seek(start)
        tail = f.read()
        if not tail or tail.endswith(b"\n"):
            return
        if _parses(tail):
            f.write(b"\n")
            return
        logger.warning("%s: dropping an unfinished last line (%d bytes) left by an interrupted run", path, end - start)
        f.truncate(start)


def _last_line_start(f, end: int) -> int:
    """The offset just after the last line break before the final byte (0 when there is none)."""
    stop = end - 1
    while stop > 0:
        begin = max(0, stop - _BLOCK)
        f.seek(begin)
        found = f.read(stop - begin).rfind(b"\n")
        if found >= 0:
            return begin + found + 1
        stop = begin
    return 0


def _loads(line: bytes) -> Any:
    # "-sig": a byte-order mark some editors write is not an error; without the line break, an error's
    # position is the column in this line
    return json.loads(line.decode("utf-8-sig").rstrip("\r\n"))


def _parses(line: bytes) -> bool:
    try:
        _loads(line)
    except ValueError:
        return False
    return True
