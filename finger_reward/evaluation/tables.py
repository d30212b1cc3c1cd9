"""Rows of a local benchmark file (JSONL, JSON list, CSV or Parquet), each with where it came from.

Locations read "file, line N" (1-based, JSONL and CSV), "file[i]" (0-based, JSON list) or
"file, row i" (0-based, Parquet), so an error can point at the exact record.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

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


@dataclass(frozen=True)
class VideoPaths:
    """Where a benchmark's video references are on this machine: through `mapping` (a URL or file
    name -> a local path, `load_video_map`), else relative to `root` (absolute paths stay).

    Videos are scored from local files only, so a URL with no mapping is an error that says how
    to supply the files, rather than one "file not found" per video later.
    """

    root: Path
    mapping: dict[str, str] | None = None

    def __call__(self, value: str, where: str, field: str | None = None) -> str:
        if self.mapping:
            local = self.mapping.get(value) or self.mapping.get(_file_name(value))
            if local:
                return local
        if "://" in value:
            how = ("the --video-map file has no entry for it or for its file name " + repr(_file_name(value))
                   if self.mapping else
                   "download the videos and pass --video-map FILE (a JSON object, or CSV/JSONL rows with "
                   "'url' and 'path', mapping each URL or file name to a local path), or write local paths in the data")
            raise BenchmarkError(where, field, f"{value!r} is a URL; videos are scored from local files: {how}")
        return str(self.root / value)


def video_paths(data: Path, video_root: str | Path | None, video_map: dict[str, str] | None = None) -> VideoPaths:
    """The `VideoPaths` of a data file: relative to `video_root`, default the data file's folder."""
    return VideoPaths(Path(video_root) if video_root is not None else Path(data).parent, video_map)


def _file_name(value: str) -> str:
    return PurePosixPath(urlparse(value).path if "://" in value else value).name


def load_video_map(path: str | Path) -> dict[str, str]:
    """{URL or file name: local path} from a JSON object, or from rows (CSV, JSONL, JSON list, Parquet)
    with a `url` (or `name`) and a `path` column; relative paths resolve against the map's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video map not found: {path}")
    data = load_json(path) if path.suffix == ".json" else None
    pairs = data.items() if isinstance(data, dict) else (
        (text(row, ("url", "name"), where), text(row, "path", where)) for where, row in read_rows(path))
    mapping = {}
    for key, local in pairs:
        if not isinstance(local, str) or not local.strip():
            raise BenchmarkError(str(path), key, f"expected a local path, got {local!r}")
        mapping[key] = str(path.parent / local.strip())
    return mapping
