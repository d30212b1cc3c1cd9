"""Rows of a local benchmark file (JSONL, JSON list, CSV or Parquet), each with where it came from.

Locations read "file, line N" (1-based, JSONL and CSV), "file[i]" (0-based, JSON list) or
"file, row i" (0-based, Parquet), so an error can point at the exact record.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

from finger_reward.evaluation.records import BenchmarkError
from finger_reward.jsonl import JsonlError, read_jsonl

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def read_rows(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield (location, row) for each record of a .jsonl, .json (a list of objects), .csv or .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    readers = {".jsonl": _jsonl, ".json": _json_list, ".csv": _csv, ".parquet": _parquet}
    if path.suffix not in readers:
        raise BenchmarkError(str(path), None, f"unsupported file type {path.suffix!r}; expected {', '.join(SUFFIXES)}")
    yield from readers[path.suffix](path)


def _jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        yield from read_jsonl(path, objects=True)
    except JsonlError as err:
        raise BenchmarkError(err.where, None, err.reason) from None


def load_json(path: Path):
    """A whole .json file; invalid JSON is a `BenchmarkError` naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BenchmarkError(str(path), None, f"not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None


def _json_list(path: Path) -> Iterator[tuple[str, dict]]:
    data = load_json(path)
    if not isinstance(data, list):
        raise BenchmarkError(str(path), None, f"expected a JSON list of objects, got {type(data).__name__}")
    for index, row in enumerate(data):
        yield f"{path}[{index}]", _as_dict(row, f"{path}[{index}]")


def _csv(path: Path) -> Iterator[tuple[str, dict]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            yield f"{path}, line {reader.line_num}", {k: v for k, v in row.items() if k is not None}


def _parquet(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        hint = "pip install pyarrow (or export the split to JSONL)"
        raise ImportError(f"reading {path.name} needs pyarrow: {hint}") from None
    for index, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path}, row {index}", row


def _as_dict(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise BenchmarkError(where, None, f"expected a JSON object, got {type(row).__name__}")
    return row


def is_missing(value) -> bool:
    """None, an empty string or NaN (how CSV, JSON and Parquet spell an empty cell)."""
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value)
    )


def text(row: dict, names: str | Sequence[str], where: str) -> str:
    """The first of `names` present in the row, as a non-empty string; else an error naming the field."""
    names = (names,) if isinstance(names, str) else tuple(names)
    for name in names:
        if name in row and not is_missing(row[name]):
            value = row[name]
            if not isinstance(value, str):
                raise BenchmarkError(where, name, f"expected a string, got {value!r}")
            return value.strip()
    shown = names[0] if len(names) == 1 else " or ".join(names)
    raise BenchmarkError(where, shown, "missing or empty")


def resolve_video(value: str, root: Path) -> str:
    """A video reference resolved against `root`; absolute paths and URLs are kept as they are."""
    if "://" in value:
        return value
    return str(root / value)
