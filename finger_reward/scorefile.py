"""Results files: one VideoScore per JSONL line, appended as videos are scored, so a killed run resumes.

`finger-reward eval` and `finger-reward score-dir` both write them, and `finger-reward report`
reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

from finger_reward.errors import FingerError
from finger_reward.jsonl import drop_torn_tail, read_jsonl
from finger_reward.results import VideoScore, json_safe

Key = tuple[str, str]  # (video, prompt)


def load_scores(path: str | Path) -> dict[Key, VideoScore]:
    """Results by (video, prompt); a last line cut short by a killed run is skipped, any other bad line is an error."""
    scores = {}
    for where, record in read_jsonl(path, torn_tail="skip", objects=True):
        try:
            result = VideoScore.from_dict(record)
        except (TypeError, KeyError, ValueError) as err:
            raise FingerError(f"{where}: not a result record ({err}); delete the line to score its video again") from None
        scores[(result.video, result.prompt)] = result
    return scores


def pending(keys: list[Key], path: str | Path) -> tuple[dict[Key, VideoScore], list[Key]]:
    """The results already in `path` (after cutting a line a killed run left unfinished) and the keys still to score."""
    path = Path(path)
    drop_torn_tail(path)
    done = load_scores(path) if path.exists() else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    return done, [key for key in dict.fromkeys(keys) if key not in done]


def append_result(out, result: VideoScore) -> None:
    """Write one result as a strict-JSON line (NaN as null) to an open results file."""
    out.write(json.dumps(json_safe(result.to_dict()), allow_nan=False) + "\n")


def score_to_file(reward, keys: list[Key], path: str | Path, *, chunk: int = 16, desc: str = "scoring") -> dict[Key, VideoScore]:
    """Score every (video, prompt) not yet in `path`, appending each result as its chunk finishes.

    Failed videos are written too (with their error), so a rerun does not retry them; delete their
    lines to retry. Returns all results in the file, old and new. (`finger_reward.offline` does
    the same on Ray Data.)
    """
    from tqdm.auto import tqdm

    done, todo = pending(keys, path)
    with tqdm(total=len(todo), desc=desc, unit="video") as bar, Path(path).open("a", encoding="utf-8") as out:
        for batch, results in _chunks(reward, todo, chunk):
            for key, result in zip(batch, results):
                done[key] = result
                append_result(out, result)
            out.flush()
            bar.update(len(batch))
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
