"""SFT cool-off data (Q-Save Sec. 4.3, stage 3): the correct GRPO rollouts as FingER-Instruct.

Q-Save's third stage saves the rollouts the RL stage got right and runs SFT on them again, which
steadies the RL model's scores. Here: read `completions.jsonl` of a trainers/grpo.py run, keep
each completion whose accuracy reward and format reward (FingER Eq. 10-11, recomputed with
`finger_reward.rewards` from the logged text and ground truth) are both 1, and write one
reason-mode FingER-Instruct line per kept completion: the question fields, video and answer of
its record, and the completion's own reason. A preference rollout (VQ-Insight's two videos, a
`preferred` column) is judged by `preference_reward` (Eq. 7) and the A/B format instead, and
becomes a preference line (prompt, dimension, video, video_b, preferred, reason); a Q-Save rating
rollout (a `rating` column) is kept when `rating_reward` gives its full 1.5 (the right level, well
formed) and keeps its rating and MOS. The SFT trainer reads the mixed file (`preference.load_training_records`). Every correct rollout is kept, repeats included, as
the paper keeps "the correct data rolled out". Q-Save reorders its text to "Rating<think>...</think>";
this project keeps its one completion contract, reason first, which the engine scores.

    python -m finger_reward.trainers.cooloff out/grpo_coldstart --out out/grpo_coldstart/cooloff.jsonl
    python -m finger_reward.trainers.sft --config configs/sft_cooloff.yaml

A completions.jsonl from before the question fields were logged needs `--data train.jsonl` (the
GRPO run's data) to look them up by video and question.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from finger_reward.errors import FingerError
from finger_reward.instruct import InstructError, InstructRecord
from finger_reward.jsonl import JsonlError, read_jsonl
from finger_reward.preference import PreferenceRecord, load_training_records
from finger_reward.questions.record import QUESTION_FIELDS
from finger_reward.rewards import accuracy_reward, format_reward, parse_completion, preference_reward, rating_reward

logger = logging.getLogger(__name__)

COMPLETIONS_FILE = "completions.jsonl"
PAIR_FIELDS = ("prompt", "dimension", "video", "video_b", "preferred")  # a preference rollout line's record fields


def read_rollouts(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(where, row) for each line of a GRPO completions.jsonl; a last line cut short by a kill is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / COMPLETIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; point at a trainers/grpo.py output_dir or its {COMPLETIONS_FILE}")
    try:
        for where, row in read_jsonl(path, torn_tail="skip", objects=True):
            missing = [key for key in ("completion", "answer", "video", "question") if key not in row]
            if missing:
                raise InstructError(f"{where}: missing field(s) {', '.join(missing)}; not a trainers/grpo.py rollout line")
            yield where, row
    except JsonlError as err:
        raise InstructError(str(err)) from None


def correct_rollouts(path: str | Path, *, data: str | Path | None = None) -> list[InstructRecord | PreferenceRecord]:
    """The rollouts right and well formed, as reason-mode records (reason = the rollout's reason): a question
    rollout with accuracy 1 and format 1, a preference rollout with preference 1 and (A/B) format 1, a
    rating rollout with rating reward 1.5."""
    known = {} if data is None else {(os.path.abspath(r.video), r.question): r for r in load_training_records(data)
                                     if not isinstance(r, PreferenceRecord)}
    kept, total = [], 0
    for where, row in read_rollouts(path):
        total += 1
        if not is_correct(row):
            continue
        reason = parse_completion(row["completion"]).reason
        try:
            if row.get("preferred") is not None:
                kept.append(PreferenceRecord(**{k: row[k] for k in PAIR_FIELDS}, reason=reason, source=where))
            else:
                rating = {key: row.get(key) for key in ("rating", "mos")}
                kept.append(InstructRecord(**_question_fields(row, where, known), video=row["video"],
                                           answer=row["answer"], reason=reason, source=where, **rating))
        except FingerError as err:
            raise InstructError(f"{where}: {err}") from None
    logger.info("%s: %d of %d rollouts are correct and well formed", path, len(kept), total)
    return kept


def is_correct(row: dict) -> bool:
    """Whether a rollout line is right and well formed, by the rewards GRPO trained it with (recomputed)."""
    completion, preferred = [row["completion"]], row.get("preferred")
    if preferred is not None:  # a preference rollout: VQ-Insight Eq. 7 and the two-video format
        missing = [key for key in PAIR_FIELDS if key not in row]
        if missing:
            raise InstructError(f"a preference rollout line lacks field(s) {', '.join(missing)}")
        return preference_reward(completion, preferred=[preferred]) == [1.0] == format_reward(completion, preferred=[preferred])
    if row.get("rating") is not None:  # a Q-Save rating rollout: the right level, well formed
        return rating_reward(completion, rating=[row["rating"]]) == [1.5]
    return accuracy_reward(completion, answer=[row["answer"]]) == [1.0] == format_reward(completion)


def _question_fields(row: dict, where: str, known: dict) -> dict:
    if all(key in row for key in QUESTION_FIELDS):
        return {key: row[key] for key in QUESTION_FIELDS}
    record = known.get((os.path.abspath(row["video"]), row["question"]))
    if record is None:
        raise InstructError(f"{where}: the line lacks the question fields ({', '.join(QUESTION_FIELDS)}) and no "
                            "--data record has its video and question; pass the GRPO run's training JSONL as data")
    return record.as_question().to_dict()


def write_cooloff(path: str | Path, out: str | Path, *, data: str | Path | None = None) -> Path:
    """Write the correct rollouts of `path` (a GRPO output_dir or its completions.jsonl) to `out` as
    FingER-Instruct JSONL (question and preference lines) with absolute video paths, ready for
    `preference.load_training_records(out, mode="reason")` (`load_instruct` when there are no pairs)."""
    records = correct_rollouts(path, data=data)
    if not records:
        raise InstructError(f"{path} holds no correct, well-formed rollout; there is nothing to cool off on")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for record in records:
            row = {k: v for k, v in record.to_dict().items() if k != "source" and not (k in ("mos", "rating") and v is None)}
            row.update({k: os.path.abspath(row[k]) for k in ("video", "video_b") if k in row})
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    logger.info("wrote %d cool-off examples to %s", len(records), out)
    return out


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grpo_output", help=f"a trainers/grpo.py output_dir, or its {COMPLETIONS_FILE}")
    parser.add_argument("--out", required=True, help="FingER-Instruct JSONL to write (SFT data, reason mode)")
    parser.add_argument("--data", default=None, help="the GRPO run's training JSONL, for rollout lines without question fields")
    args = parser.parse_args(argv)
    return write_cooloff(args.grpo_output, args.out, data=args.data)


if __name__ == "__main__":
    main()
