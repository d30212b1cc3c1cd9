"""Turn an LLM's reply into Question records, repairing what real LLM output gets wrong.

Handles JSON in code fences or surrounded by prose, trailing commas, Python literals, smart
quotes, several layouts (`{"questions": [...]}`, a bare list, a dict keyed by dimension),
dimension names spelled out ("Text-to-video alignment"), and polarity written as a word.
What cannot be repaired is dropped and described in the returned problems.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from finger_reward.errors import QuestionError
from finger_reward.questions.record import DIMENSIONS, Question

_DIMENSION_ALIASES = {
    "visual": "visual_quality", "quality": "visual_quality", "image_quality": "visual_quality",
    "temporal": "temporal_consistency", "consistency": "temporal_consistency",
    "dynamic": "dynamic_degree", "dynamics": "dynamic_degree", "motion": "dynamic_degree",
    "text_to_video_alignment": "text_alignment", "t2v_alignment": "text_alignment",
    "alignment": "text_alignment", "text_video_alignment": "text_alignment", "prompt_alignment": "text_alignment",
    "factual": "factual_consistency", "physics": "factual_consistency", "commonsense": "factual_consistency",
    "physical_consistency": "factual_consistency", "factuality": "factual_consistency",
}
_TRUE = {"true", "yes", "positive", "pos", "1", "+"}
_FALSE = {"false", "no", "negative", "neg", "0", "-"}


def parse_questions(text: str, prompt: str) -> tuple[list[Question], list[str]]:
    """Questions found in `text` for `prompt`, and a list of problems (empty when all was clean)."""
    problems: list[str] = []
    data = extract_json(text, problems)
    if data is None:
        return [], problems or ["no JSON found in the reply"]
    questions = []
    for item in _items(data, problems):
        try:
            questions.append(_question(item, prompt))
        except QuestionError as err:
            problems.append(str(err))
    if not questions and not problems:
        problems.append("the reply holds no questions")
    return questions, problems


def extract_json(text: str, problems: list[str]) -> Any | None:
    """The first JSON object or array in `text` (code fences and prose around it are skipped)."""
    if not isinstance(text, str) or not text.strip():
        problems.append("empty reply")
        return None
    fenced = re.findall(r"```(?:json|JSON)?\s*(.*?)```", text, flags=re.S)
    for candidate in fenced + [text]:
        block = _balanced_block(candidate.replace("\u201c", '"').replace("\u201d", '"'))
        if block is None:
            continue
        parsed = _loads_any(block)
        if parsed is not None:
            return parsed
        # Truncated or partly broken: keep every flat {...} object that still parses on its own.
        salvaged = [obj for obj in map(_loads_any, re.findall(r"\{[^{}]*\}", block)) if isinstance(obj, dict)]
        problems.append(f"unparseable JSON starting {block[:60]!r}" + (f"; salvaged {len(salvaged)} object(s)" if salvaged else ""))
        if salvaged:
            return salvaged
    return None


def _loads_any(block: str) -> Any | None:
    for loads in (json.loads, _loads_repaired, ast.literal_eval):
        try:
            return loads(block)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
    return None


def _balanced_block(text: str) -> str | None:
    """The first {...} or [...] span with balanced brackets, ignoring brackets inside strings."""
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        return None
    depth, quote, escaped = 0, None, False
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            escaped = ch == "\\" and not escaped
            if ch == quote and not escaped:
                quote = None
        elif ch in "\"'" and (ch == '"' or not text[i - 1].isalnum()):
            quote = ch
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return text[start:]  # truncated reply: let the repairs try


def _loads_repaired(block: str) -> Any:
    repaired = re.sub(r",\s*([}\]])", r"\1", block)
    repaired = re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", re.sub(r"\bNone\b", "null", repaired)))
    return json.loads(repaired)


def _items(data: Any, problems: list[str]) -> list[dict]:
    """Question-like dicts from any of the layouts LLMs use."""
    if isinstance(data, dict) and isinstance(data.get("questions"), list):
        data = data["questions"]
    if isinstance(data, dict):  # {"visual_quality": [...], ...}
        items = []
        for dim, entries in data.items():
            for entry in entries if isinstance(entries, list) else []:
                items.append({"dimension": dim, **entry} if isinstance(entry, dict) else {"dimension": dim, "question": entry})
        data = items
    if not isinstance(data, list):
        problems.append(f"expected a list of questions, got {type(data).__name__}")
        return []
    dicts = [item for item in data if isinstance(item, dict)]
    if len(dicts) < len(data):
        problems.append(f"{len(data) - len(dicts)} list item(s) are not objects")
    return dicts


def normalize_dimension(name: Any) -> str:
    """A dimension id from how an LLM may write it; QuestionError if it is none of the five."""
    key = re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")
    if key in DIMENSIONS:
        return key
    if key in _DIMENSION_ALIASES:
        return _DIMENSION_ALIASES[key]
    raise QuestionError(f"unknown dimension {name!r}")


def _polarity(item: dict) -> bool:
    for key in ("positive", "polarity", "is_positive", "q_stat"):
        if key in item:
            value = str(item[key]).strip().lower()
            if value in _TRUE:
                return True
            if value in _FALSE:
                return False
            raise QuestionError(f"cannot read polarity {item[key]!r}")
    raise QuestionError(f"question {str(item.get('question', ''))[:60]!r} has no polarity ('positive')")


def _question(item: dict, prompt: str) -> Question:
    text = str(item.get("question") or "").strip()
    if not text:
        raise QuestionError("a question has no text")
    return Question(
        prompt=prompt,
        dimension=normalize_dimension(item.get("dimension", "")),
        entity=str(item.get("entity") or "").strip(),
        question=text,
        positive=_polarity(item),
    )
