"""Results files: one VideoScore per JSONL line, appended as videos are scored, so a killed run resumes.

`finger-reward eval` and `finger-reward score-dir` both write them, and `finger-reward report`
reads them. A row is identified by its video's *key* and its prompt: the key is the video's path
relative to the video root (as the prompts file writes it), stored in the row as `"key"`, so a
rerun from another folder or with the root spelled another way finds the rows it wrote. A rerun
retries failed rows (replacing them, never appending a second row) and collapses duplicates.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from finger_reward.errors import FingerError
from finger_reward.jsonl import drop_torn_tail, read_jsonl
from finger_reward.results import VideoScore, json_safe

Key = tuple[str, str]  # (video, prompt)


class Interrupted(FingerError):
    """Scoring stopped by Ctrl-C; what was scored is in the file."""

    def __init__(self, saved: int, total: int, path: str | Path):
        self.saved, self.total, self.path = saved, total, Path(path)
        super().__init__(f"interrupted: {saved} of {total} saved to {path}; run the same command to resume")


def video_key(video: str, root: str | Path | None = None) -> str:
    """A video's identity in a results file: its path relative to `root` (POSIX slashes), else its
    absolute path; the same whatever the working directory and however `root` is spelled."""
    video = os.fspath(video)
    if "://" in video:
        return video
    candidates = [(os.path.abspath(video), os.path.abspath(root) if root is not None else None)]
    if root is not None:
        candidates.append((os.path.realpath(video), os.path.realpath(root)))
    for path, base in candidates:
        if base is not None and (path == base or path.startswith(base.rstrip(os.sep) + os.sep)):
            return Path(os.path.relpath(path, base)).as_posix()
    return Path(candidates[0][0]).as_posix()


@dataclass
class Progress:
    """What a run did: keys scored ok, keys that failed (first error kept per key), keys skipped as done."""

    total: int = 0
    scored: int = 0
    skipped: int = 0
    failed: dict[Key, str] = field(default_factory=dict)

    def start(self, keys: list[Key], done: dict[Key, VideoScore]) -> None:
        """Before scoring: every key counted, the done ones skipped, the failed ones kept (not retried)."""
        self.total, self.skipped = len(dict.fromkeys(keys)), sum(result.ok for result in done.values())
        self.failed.update({key: result.error for key, result in done.items() if not result.ok})

    def record(self, key: Key, result: VideoScore) -> None:
        """One new result."""
        if result.ok:
            self.scored += 1
        else:
            self.failed[key] = result.error


def _rows(path: Path) -> list[tuple[dict, VideoScore]]:
    rows = []
    for where, record in read_jsonl(path, torn_tail="skip", objects=True):
        try:
            result = VideoScore.from_dict({k: v for k, v in record.items() if k != "key"})
        except (TypeError, KeyError, ValueError) as err:
            raise FingerError(f"{where}: not a result record ({err}); delete the line to score its video again") from None
        rows.append((record, result))
    return rows


def _collapse(rows, root) -> dict[tuple[str, str], tuple[dict, VideoScore]]:
    """One row per (key, prompt) in first-seen order: the last success, else the last failure.

    A row's stored key is relative to the root it was written with, so it identifies the row only
    when a root is given now; without one, rows are matched by their video's absolute path.
    """
    kept: dict[tuple[str, str], tuple[dict, VideoScore]] = {}
    for record, result in rows:
        stored = record.get("key") if root is not None else None
        ident = (stored or video_key(result.video, root), result.prompt)
        if ident not in kept or result.ok or not kept[ident][1].ok:
            kept[ident] = (record, result)
    return kept


def load_scores(path: str | Path, root: str | Path | None = None) -> dict[Key, VideoScore]:
    """Results by (video, prompt), one per video key (the last success, else the last failure); a last
    line cut short by a killed run is skipped, any other bad line is an error."""
    return {(result.video, result.prompt): result for _, result in _collapse(_rows(Path(path)), root).values()}


def _rewrite(path: Path, rows) -> None:
    """Replace `path` with `rows` (atomically: a kill leaves the old file or the new one)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for record, _ in rows:
            out.write(json.dumps(record, allow_nan=False) + "\n")
    os.replace(tmp, path)


def pending(keys: list[Key], path: str | Path, *, root: str | Path | None = None,
            retry_failed: bool = True) -> tuple[dict[Key, VideoScore], list[Key]]:
    """The results already in `path` for `keys` and the keys still to score.

    Cuts a line a killed run left unfinished, collapses duplicate rows, and (with `retry_failed`)
    drops failed rows of `keys` so their new results take their place; the file is rewritten
    only when one of these changed it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    drop_torn_tail(path)
    rows = _rows(path) if path.exists() else []
    kept = _collapse(rows, root)
    wanted = {(video_key(video, root), prompt): (video, prompt) for video, prompt in keys}
    retry = {ident for ident, (_, result) in kept.items() if retry_failed and ident in wanted and not result.ok}
    if retry or len(kept) < len(rows):
        _rewrite(path, [row for ident, row in kept.items() if ident not in retry])
    done = {wanted[ident]: result for ident, (_, result) in kept.items() if ident in wanted and ident not in retry}
    return done, [key for key in dict.fromkeys(keys) if key not in done]


def append_result(out, result: VideoScore, key: str | None = None) -> None:
    """Write one result as a strict-JSON line (NaN as null) to an open results file, with its video key."""
    record = json_safe(result.to_dict())
    if key is not None:
        record["key"] = key
    out.write(json.dumps(record, allow_nan=False) + "\n")


def score_to_file(reward, keys: list[Key], path: str | Path, *, root: str | Path | None = None,
                  retry_failed: bool = True, chunk: int = 16, desc: str = "scoring",
                  progress: Progress | None = None) -> dict[Key, VideoScore]:
    """Score every (video, prompt) of `keys` not yet in `path`, appending each result as its chunk finishes.

    Videos are identified by `video_key(video, root)`. Failed videos are written too (with their
    error) and retried by the next run unless `retry_failed=False`. Returns the results of `keys`,
    old and new; `progress` (if given) is filled in. Ctrl-C raises `Interrupted` saying how many are
    saved. (`finger_reward.offline` does the same on Ray Data.)
    """
    from tqdm.auto import tqdm

    progress = progress if progress is not None else Progress()
    done, todo = pending(keys, path, root=root, retry_failed=retry_failed)
    progress.start(keys, done)
    try:
        with tqdm(total=len(todo), desc=desc, unit="video") as bar, Path(path).open("a", encoding="utf-8") as out:
            for batch, results in _chunks(reward, todo, chunk):
                for key, result in zip(batch, results):
                    done[key] = result
                    append_result(out, result, video_key(key[0], root))
                    progress.record(key, result)
                out.flush()
                bar.update(len(batch))
    except KeyboardInterrupt:
        raise Interrupted(len(done), progress.total, path) from None
    return done


def _chunks(reward, todo: list[Key], chunk: int):
    """(keys, results) per chunk: through `score_iter` (the next chunk decodes while the model runs)
    where the reward has it, else one `score` call per chunk (a service client)."""
    if hasattr(reward, "score_iter"):
        start = 0
        for results in reward.score_iter([v for v, _ in todo], [p for _, p in todo], chunk_size=chunk):
            yield todo[start: start + len(results)], results
            start += len(results)
        return
    for start in range(0, len(todo), chunk):
        batch = todo[start: start + chunk]
        yield batch, reward.score([video for video, _ in batch], [prompt for _, prompt in batch])
