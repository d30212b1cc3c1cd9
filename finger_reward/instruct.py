"""FingER-Instruct training data: records, the JSONL loader, and the video SFT collator.

A FingER-Instruct line (DESIGN.md, Contracts) holds the question fields (prompt, dimension,
entity, question, positive) plus `video`, `answer` ("Yes"/"No") and `reason`. SFT trains the
evaluator to write, after the engine's own prompt (`prompts.split_prompt`), either the answer
alone (mode "answer") or `<reason>...</reason><answer>...</answer>` (mode "reason").

A rating line (Q-Save Sec. 3.4.2, 4.2.3) also carries a numeric `mos`, or a `rating` level, or
both; its answer is then one of the five levels Bad, Poor, Fair, Good, Excellent (`rating_level`
maps a MOS to its level), `rating` holds that level (the column GRPO's `rewards.rating_reward`
reads), and the collator can mark where the level token sits for the CE + MSE rating loss of
trainers/sft.py. `rating_question` writes Q-Save's five-level prompt for such a line.

The collator renders exactly the chat the engine scores with and calls the processor exactly as
the engine does (`engine.inputs.processor_inputs`), on frames sampled by the same `load_video`, so what the
model is trained on is what it is asked at inference.
"""

from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from finger_reward import prompts
from finger_reward.engine.inputs import patch_factor, processor_inputs
from finger_reward.errors import FingerError
from finger_reward.jsonl import JsonlError, read_jsonl
from finger_reward.questions.record import Question
from finger_reward.scoring import RATING_LEVELS
from finger_reward.video import Clip, SlowFast, load_video

logger = logging.getLogger(__name__)

ANSWERS = ("Yes", "No")
_TAGS = (prompts.REASON_OPEN, prompts.REASON_CLOSE, prompts.ANSWER_OPEN, prompts.ANSWER_CLOSE)
_YES_NO_WORD = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_ASSISTANT_SENTINEL = "\x00FINGER_COMPLETION\x00"


class InstructError(FingerError):
    """A FingER-Instruct line or record is invalid; the message names the file and line."""


@dataclass(frozen=True)
class InstructRecord:
    """One training example: a question about a video, its answer and the reason for it.

    `mos` (optional): the human mean opinion score of a rating question (Q-Save); with it the
    answer is a rating level (Bad..Excellent) instead of Yes/No.
    `rating` (optional): the rating level of a rating question, the ground truth of Q-Save's
    GRPO accuracy reward; it equals the answer, and a record with `mos` gets its answer as rating.
    `source` ("file, line N") only says where the record came from, for error messages.
    """

    prompt: str
    dimension: str
    entity: str
    question: str
    positive: bool
    video: str
    answer: str
    reason: str = ""
    mos: float | None = None
    rating: str | None = None
    source: str = field(default="", compare=False)

    def __post_init__(self):
        self.as_question()  # validates the question fields (QuestionError names the field)
        if not isinstance(self.video, str) or not self.video.strip():
            raise InstructError(f"field 'video' must be a non-empty path, got {self.video!r}")
        if self.rating is not None:
            if self.rating not in RATING_LEVELS:
                raise InstructError(f"field 'rating' must be one of {', '.join(RATING_LEVELS)} (any case), got {self.rating!r}")
            if self.answer != self.rating:
                raise InstructError(f"field 'answer' ({self.answer!r}) must equal field 'rating' ({self.rating!r}): "
                                    "a rating question is answered with its level")
        if self.mos is None and self.rating is None and self.answer not in ANSWERS:
            raise InstructError(f"field 'answer' must be 'Yes' or 'No', got {self.answer!r}")
        if self.mos is not None:
            if isinstance(self.mos, bool) or not isinstance(self.mos, (int, float)) or not math.isfinite(self.mos):
                raise InstructError(f"field 'mos' must be a finite number, got {self.mos!r}")
            if self.answer not in RATING_LEVELS:
                raise InstructError(f"a record with 'mos' answers with a rating level ({', '.join(RATING_LEVELS)}), "
                                    f"got {self.answer!r}; `rating_level(mos)` gives the level of a MOS")
            if self.rating is None:
                object.__setattr__(self, "rating", self.answer)  # the level is the rating reward's ground truth
        if not isinstance(self.reason, str):
            raise InstructError(f"field 'reason' must be a string, got {type(self.reason).__name__}")
        tags = [tag for tag in _TAGS if tag in self.reason]
        if tags:
            raise InstructError(f"field 'reason' must not contain the tag(s) {', '.join(tags)}; give the bare text")

    def as_question(self) -> Question:
        return Question(self.prompt, self.dimension, self.entity, self.question, self.positive)

    @classmethod
    def from_dict(cls, row: dict, *, source: str = "") -> "InstructRecord":
        """Build from a JSON object; "answer" is matched case-insensitively and stored as "Yes"/"No"."""
        if not isinstance(row, dict):
            raise InstructError(f"expected a JSON object, got {type(row).__name__}")
        question = Question.from_dict(row)
        rating = _level(row.get("rating"))
        missing = [key for key in ("video", "answer") if key not in row and not (key == "answer" and rating is not None)]
        if missing:
            raise InstructError(f"missing field(s) {', '.join(missing)}")
        answer, mos = row.get("answer", rating), row.get("mos")
        if isinstance(answer, str):
            allowed = ANSWERS if mos is None and rating is None else RATING_LEVELS
            answer = next((a for a in allowed if a.lower() == answer.strip().lower()), answer)
        reason = row.get("reason")
        return cls(**question.to_dict(), video=row["video"], answer=answer, reason="" if reason is None else reason,
                   mos=mos, rating=rating, source=source or row.get("source", ""))

    def to_dict(self) -> dict:
        return asdict(self)


def _level(value: Any) -> Any:
    """A rating level in its canonical spelling ("good " -> "Good"); anything else unchanged, for the error."""
    if isinstance(value, str):
        return next((level for level in RATING_LEVELS if level.lower() == value.strip().lower()), value)
    return value


# Q-Save Sec. 3.4.1's chain-of-thought prompt, with this project's tags in place of <think>...</think>Rating
# (DESIGN.md, Contracts). "three questions" and the two that follow are the paper's words.
RATING_PROMPT = (
    "Judge its {dimension} based on following three criteria: {criteria}. Considering the above video standards, "
    "you need to answer the following three questions: 1. Provides quality analysis of the video in this dimension. "
    "2. How would you rate the {dimension} of this video? Your rating can only be selected from the following five "
    "levels: [{levels}]. Please integrate your answer with the following format: "
    f"{prompts.REASON_OPEN}Your analysis here{prompts.REASON_CLOSE}{prompts.ANSWER_OPEN}Rating{prompts.ANSWER_CLOSE}"
)


def rating_question(dimension: str, config=None) -> str:
    """Q-Save's five-level rating prompt for one of the five dimensions, its criteria being the
    dimension's key points in the question config (`configs/questions.yaml` when `config` is None)."""
    from finger_reward.questions.config import load_question_config

    config = config if config is not None else load_question_config()
    if dimension not in config.dimensions:
        raise ValueError(f"unknown dimension {dimension!r}; one of {', '.join(config.dimensions)}")
    spec = config.dimensions[dimension]
    criteria = "; ".join(f"{i}) {point}" for i, point in enumerate(spec.key_points, start=1))
    return RATING_PROMPT.format(dimension=spec.name.lower(), criteria=criteria, levels=", ".join(RATING_LEVELS))


def rating_level(mos: float, low: float = 1.0, high: float = 5.0) -> str:
    """Q-Save Sec. 3.4.2: the level r_i with low + (i-1)/5 (high-low) < mos <= low + i/5 (high-low).

    `low`/`high` bound the MOS scale (Q-Save: 1 and 5); `mos == low` reads as Bad."""
    if not low < high:
        raise ValueError(f"need low < high, got low={low}, high={high}")
    if not low <= mos <= high:
        raise ValueError(f"mos={mos} is outside the scale [{low}, {high}]")
    n = len(RATING_LEVELS)
    return next(level for i, level in enumerate(RATING_LEVELS, start=1) if mos <= low + i * (high - low) / n or i == n)


def normalised_mos(mos: float, low: float = 1.0, high: float = 5.0) -> float:
    """A MOS on [low, high] moved to [0, 1], the scale of the rating expectation r_hat (Q-Save Sec. 4.2.2)."""
    if not low <= mos <= high:
        raise ValueError(f"mos={mos} is outside the scale [{low}, {high}]; set the MOS range to the data's")
    return (mos - low) / (high - low)


def load_instruct(path: str | Path, *, mode: str | None = None, video_root: str | Path | None = None) -> list[InstructRecord]:
    """Read FingER-Instruct JSONL; a bad line raises `InstructError` naming the file and line.

    Relative video paths are resolved against `video_root` (default: the JSONL's folder) and
    must exist. With `mode="reason"` every line needs a non-empty reason.
    """
    return read_records(path, _parse_row, mode=mode, video_root=video_root)


def read_records(path: str | Path, parse_row, *, mode: str | None = None, video_root: str | Path | None = None,
                 what: str = "FingER-Instruct file") -> list:
    """Every line of a training JSONL as `parse_row(row, where, root, mode)` makes it a record; a bad line raises
    `InstructError` naming the file and line (and the parser's field). Questions' reasons holding the word
    Yes or No are counted into one warning, since FingER's format reward gives such completions 0."""
    path = Path(path)
    if mode is not None:
        prompts.check_mode(mode)
    if not path.is_file():
        raise InstructError(f"{what} {path} not found")
    root = Path(video_root) if video_root is not None else path.parent
    records, with_yes_no, where = [], [], str(path)
    try:
        for where, row in read_jsonl(path):
            record = parse_row(row, where, root, mode)
            if mode == "reason" and isinstance(record, InstructRecord) and _YES_NO_WORD.search(record.reason):
                with_yes_no.append(where)
            records.append(record)
    except JsonlError as err:
        raise InstructError(str(err)) from None
    except FingerError as err:
        raise InstructError(f"{where}: {err}") from None
    if not records:
        raise InstructError(f"{path} holds no records")
    if with_yes_no:
        logger.warning(
            "%d reason(s) contain the word Yes or No (first: %s); FingER's format reward gives such "
            "completions 0, so SFT on them teaches a format that GRPO then penalises", len(with_yes_no), with_yes_no[0],
        )
    return records


def _parse_row(row, where: str, root: Path, mode: str | None) -> InstructRecord:
    record = InstructRecord.from_dict(row, source=where)
    video = resolve_video(record.video, root)
    check_reason(record.reason, mode)
    return InstructRecord(**{**record.to_dict(), "video": video, "source": where})


def resolve_video(video: str, root: Path, field: str | None = None) -> str:
    """A training line's video path, resolved against `root` when relative; the file must exist."""
    path = Path(video)
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise InstructError((f"field {field!r}: " if field else "") + f"video {path} not found")
    return str(path)


def check_reason(reason: str, mode: str | None) -> None:
    """Reason-mode SFT learns the reason: a line without one is refused."""
    if mode == "reason" and not reason.strip():
        raise InstructError("field 'reason' is empty; reason SFT needs a reason on every line")


def completion_text(record: InstructRecord, mode: str) -> str:
    """What the model learns to write: "Yes"/"No", or `<reason>...</reason><answer>...</answer>`."""
    if prompts.check_mode(mode) == "answer":
        return record.answer
    if not record.reason.strip():
        raise InstructError(f"{record.source or 'record'}: reason SFT needs a non-empty 'reason'")
    return (f"{prompts.REASON_OPEN}{record.reason.strip()}{prompts.REASON_CLOSE}"
            f"{prompts.ANSWER_OPEN}{record.answer}{prompts.ANSWER_CLOSE}")


# ---- the collator -------------------------------------------------------------------------------


class VideoSFTCollator:
    """Records (or dataset rows) -> a right-padded batch for a video VLM, loss on the completion only.

    Each row is the engine's prompt for the record's question (system turn, video, question,
    assistant header), then the completion and the chat template's end-of-turn token. Labels are
    -100 on the prompt and on padding. Video tensors (`pixel_values_videos`, `video_grid_thw`,
    `second_per_grid_ts`, ...) are the processor's, concatenated over the batch.

    `clip_cache=N` keeps the last N decoded videos in memory: a small data set seen for many
    epochs (the tiny evaluator's) then decodes each video once. `slowfast=SlowFast(...)` samples
    Q-Save's SlowFast frames, as `FingerReward(slowfast=...)` does, markers and both pathways included.

    With `mos_range=(low, high)` the batch also holds, for the Q-Save rating loss,
    `rating_positions` (index in input_ids of each row's rating-level token, -1 for a record
    without `mos`) and `rating_targets` (the MOS moved to [0, 1], NaN without `mos`);
    `rating_ids` are the level tokens in `RATING_LEVELS` order (Bad..Excellent).
    """

    def __init__(self, processor, mode: str = "answer", *, fps: float = 2.0, max_frames: int = 48,
                 max_pixels: int = 448 * 448, slowfast: SlowFast | None = None,
                 mos_range: tuple[float, float] | None = None, clip_cache: int = 0):
        self.processor, self.tokenizer = processor, processor.tokenizer
        if clip_cache < 0:
            raise ValueError(f"clip_cache must be >= 0 (videos kept decoded), got {clip_cache}")
        if slowfast is not None and not isinstance(slowfast, SlowFast):
            raise ValueError(f"slowfast must be a SlowFast(...) or None, got {type(slowfast).__name__}")
        self.clip_cache, self._clips = clip_cache, OrderedDict()
        self.mode = prompts.check_mode(mode)
        self.video_options = dict(fps=fps, max_frames=max_frames, max_pixels=max_pixels, slowfast=slowfast,
                                  patch_factor=patch_factor(processor))
        self.split = prompts.split_prompt(processor, mode)
        self.pair_split = prompts.split_prompt(processor, mode, pair=True)  # preference records: two videos
        self.rating_split = prompts.split_prompt(processor, mode, rating=True)  # rating records: five levels
        self.end_of_turn = _end_of_turn(processor, mode)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.mos_range = None if mos_range is None else tuple(float(v) for v in mos_range)
        if self.mos_range is not None and not self.mos_range[0] < self.mos_range[1]:
            raise ValueError(f"mos_range must be (low, high) with low < high, got {mos_range}")
        self.rating_ids = rating_token_ids(self.tokenizer) if self.mos_range is not None else None

    def prompt_text(self, record: InstructRecord) -> str:
        """The engine's prompt for this question (`split.prefix + question + split.suffix`); for a
        `preference.PreferenceRecord`, the two-video prompt `FingerReward.compare` asks; for a rating
        record, the same chat with Q-Save's five-level system turn (`prompts.RATING_SYSTEM_PROMPTS`)."""
        split = self.pair_split if _is_pair(record) else self.rating_split if getattr(record, "rating", None) else self.split
        return split.prefix + split.text_after_video(record.question)

    def load_clip(self, record: InstructRecord) -> Clip | tuple[Clip, Clip]:
        """The record's video, sampled as the engine samples it, or a preference record's two videos sampled
        as `FingerReward.compare` samples them (at most max_frames // 2 frames each); the last `clip_cache`
        videos stay decoded."""
        if not _is_pair(record):
            return self._load(record.video, record.source, self.video_options["max_frames"])
        from finger_reward.preference import pair_max_frames

        frames = pair_max_frames(self.video_options["max_frames"])
        return tuple(self._load(video, record.source, frames) for video in (record.video, record.video_b))

    def _load(self, video: str, source: str, max_frames: int) -> Clip:
        key = video if max_frames == self.video_options["max_frames"] else (video, max_frames)  # a pair's videos have fewer frames
        clip = self._clips.get(key)
        if clip is not None:
            self._clips.move_to_end(key)
            return clip
        name = f"{video} ({source})" if source else video
        clip = load_video(video, name=name, **{**self.video_options, "max_frames": max_frames})
        if self.clip_cache:
            self._clips[key] = clip
            if len(self._clips) > self.clip_cache:
                self._clips.popitem(last=False)
        return clip

    def __call__(self, examples: list[InstructRecord | dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        rows = [self._row(ex if isinstance(ex, InstructRecord) else _record(ex, i)) for i, ex in enumerate(examples)]
        return self._pad(rows)

    def _row(self, record: InstructRecord) -> dict:
        inputs = processor_inputs(self.processor, self.prompt_text(record), self.load_clip(record))
        completion = self.tokenizer.encode(completion_text(record, self.mode) + self.end_of_turn,
                                           add_special_tokens=False)
        completion = torch.tensor(completion, dtype=inputs["input_ids"].dtype)
        prompt = inputs["input_ids"][0]
        row = {
            "input_ids": torch.cat([prompt, completion]),
            "labels": torch.cat([torch.full_like(prompt, -100), completion]),
            "attention_mask": torch.ones(len(prompt) + len(completion), dtype=torch.long),
        }
        if "mm_token_type_ids" in inputs:
            row["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"][0], torch.zeros_like(completion)])
        row["video"] = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        if self.mos_range is not None:
            has_mos = getattr(record, "mos", None) is not None  # a preference record has none
            row["rating_position"] = len(prompt) + self._rating_offset(record, completion.tolist()) if has_mos else -1
            row["rating_target"] = normalised_mos(record.mos, *self.mos_range) if has_mos else math.nan
        return row

    def _rating_offset(self, record: InstructRecord, completion: list[int]) -> int:
        """Index in the completion tokens of the rating level: the first token of the answer (answer
        mode) or the one right after `<answer>` (reason mode); it must be the level's single token."""
        text = completion_text(record, self.mode)
        start = 0 if self.mode == "answer" else text.index(prompts.ANSWER_OPEN) + len(prompts.ANSWER_OPEN)
        before = self.tokenizer.encode(text[:start], add_special_tokens=False) if start else []
        level = self.rating_ids[RATING_LEVELS.index(record.answer)]
        if completion[: len(before)] != before or len(completion) <= len(before) or completion[len(before)] != level:
            raise InstructError(f"{record.source or 'record'}: the rating {record.answer!r} is not one token at the "
                                "answer position of the completion, so its probability cannot be read there")
        return len(before)

    def _pad(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        batch = {}
        for key, fill in (("input_ids", self.pad_id), ("attention_mask", 0), ("labels", -100), ("mm_token_type_ids", 0)):
            if key in rows[0]:
                batch[key] = torch.stack([torch.nn.functional.pad(r[key], (0, width - len(r[key])), value=fill)
                                          for r in rows])
        for key in rows[0]["video"]:
            batch[key] = torch.cat([r["video"][key] for r in rows])
        if self.mos_range is not None:
            batch["rating_positions"] = torch.tensor([r["rating_position"] for r in rows], dtype=torch.long)
            batch["rating_targets"] = torch.tensor([r["rating_target"] for r in rows], dtype=torch.float32)
        return batch


def rating_token_ids(tokenizer) -> list[int]:
    """The single-token ids of the five rating levels, Bad..Excellent (`scoring.RATING_LEVELS` order),
    as written in a completion (no leading space); an error when a level is not one token."""
    ids = [tokenizer.encode(level, add_special_tokens=False) for level in RATING_LEVELS]
    split = [level for level, encoded in zip(RATING_LEVELS, ids) if len(encoded) != 1]
    if split:
        raise ValueError(f"the tokenizer splits the rating level(s) {', '.join(split)} into several tokens; "
                         "the rating loss reads one token per level (Q-Save Sec. 4.2.2)")
    return [encoded[0] for encoded in ids]


def _is_pair(record) -> bool:
    from finger_reward.preference import PreferenceRecord

    return isinstance(record, PreferenceRecord)


def _record(row: Any, index: int) -> InstructRecord:
    """A batch item as a record: a `PreferenceRecord` as it is, a dict row as a question or (with `video_b`) a preference."""
    if _is_pair(row):
        return row
    if not isinstance(row, dict):
        raise TypeError(f"batch item {index} is {type(row).__name__}; expected an InstructRecord, a PreferenceRecord or a dict row")
    if row.get("video_b") is not None:  # a datasets.Dataset of mixed rows fills a question row's video_b with None
        from finger_reward.preference import PreferenceRecord

        return PreferenceRecord.from_dict(row)
    return InstructRecord.from_dict(row)


def _end_of_turn(processor, mode: str) -> str:
    """What the chat template writes after an assistant message (`<|im_end|>` for Qwen), trailing whitespace cut.

    Training on it teaches the model to stop; it is read from the template rather than assumed.
    """
    messages = prompts.build_messages("question", mode)
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = processor.apply_chat_template(
        messages + [{"role": "assistant", "content": _ASSISTANT_SENTINEL}], tokenize=False
    )
    if not full.startswith(prompt + _ASSISTANT_SENTINEL):
        raise ValueError(
            "the chat template renders an assistant turn differently from its generation prompt "
            "(add_generation_prompt=True); SFT would train on a prompt the engine never sends"
        )
    end = full[len(prompt) + len(_ASSISTANT_SENTINEL):].rstrip()
    return end or processor.tokenizer.eos_token
