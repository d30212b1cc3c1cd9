"""Reason mode's decoding: generate `<reason>...</reason>`, stop at a tag, close it, read the answer.

Every unfinished question gains one token per step (greedy, or sampled at a temperature); a
question stops at an end-of-turn token, at `</reason>` or at `<answer>` (the stops of the plain
loop's `generate`), or after `max_new_tokens`. Then whatever is missing of `</reason><answer>`
is fed, so that the next token is the answer, whose P(Yes)/P(No) Eq. 1 reads. The tag checks
work on decoded text, since a model may spell a tag with any split of tokens. How the tokens
are fed (the engine's packed cache) is the caller's `advance`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from finger_reward import prompts
from finger_reward.engine.inputs import placeholder_token_ids
from finger_reward.engine.packing import Pieces

TAIL_TOKENS = 8  # the last tokens decoded to look for a tag: enough for either tag however it is split


def extract_reason(text: str) -> str:
    """The text inside <reason>...</reason>, or everything before <answer> when tags are missing."""
    start = text.find(prompts.REASON_OPEN)
    body = text[start + len(prompts.REASON_OPEN) :] if start >= 0 else text
    for tag in (prompts.REASON_CLOSE, prompts.ANSWER_OPEN):
        if tag in body:
            body = body[: body.index(tag)]
    return body.strip()


def ends_with_stop_tag(text: str) -> bool:
    """Whether generated text ends at a stop: `</reason>` or `<answer>`."""
    return text.endswith(prompts.REASON_CLOSE) or text.endswith(prompts.ANSWER_OPEN)


def closing_tags(text: str) -> str:
    """What must follow generated text so that the next token is the answer: "", `<answer>` or both tags."""
    if text.endswith(prompts.ANSWER_OPEN):
        return ""
    return prompts.ANSWER_OPEN if text.endswith(prompts.REASON_CLOSE) else prompts.REASON_CLOSE + prompts.ANSWER_OPEN


def pick(logits: torch.Tensor, suppressed: list[int], temperature: float) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else a sample; `suppressed` ids are never chosen."""
    logits = logits.index_fill(-1, torch.tensor(suppressed, dtype=torch.long, device=logits.device), -math.inf)
    if temperature <= 0:
        return logits.argmax(-1)
    return torch.multinomial((logits.float() / temperature).softmax(-1), 1)[:, 0]


def stop_token_ids(generation_config, tokenizer) -> set[int]:
    """End-of-turn ids: the generation config's `eos_token_id` (one or several) and the tokenizer's."""
    value = getattr(generation_config, "eos_token_id", None)
    ids = set([] if value is None else list(value) if isinstance(value, (list, tuple)) else [value])
    return ids | ({tokenizer.eos_token_id} - {None})


@dataclass
class ReasonTokens:
    """The tokenizer-derived ids reason decoding needs, built once per engine (`from_model`)."""

    tokenizer: object
    eos_ids: set[int]
    suppressed: list[int]  # vision placeholders: a generated one would break the full forward's video count
    _ends_with_gt: dict[int, bool] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_model(cls, model, processor) -> ReasonTokens:
        tokenizer = processor.tokenizer
        return cls(tokenizer, stop_token_ids(model.generation_config, tokenizer), placeholder_token_ids(processor))

    def tail(self, ids: list[int]) -> str:
        """The last `TAIL_TOKENS` tokens as text, special tokens included."""
        return self.tokenizer.decode(ids[-TAIL_TOKENS:], skip_special_tokens=False)

    def stopped(self, ids: list[int]) -> bool:
        """Whether a reason ends with its last token: end of turn, `</reason>` or `<answer>`."""
        if ids[-1] in self.eos_ids:
            return True
        if not self._ends_tag(ids[-1]):  # both stop tags end in ">": skip decoding the tail otherwise
            return False
        return ends_with_stop_tag(self.tail(ids))

    def _ends_tag(self, token: int) -> bool:
        if token not in self._ends_with_gt:
            self._ends_with_gt[token] = self.tokenizer.decode([token], skip_special_tokens=False).endswith(">")
        return self._ends_with_gt[token]

    def closing(self, generated: list[int]) -> tuple[int, list[int]]:
        """How a generated reason continues so that the next token is the answer: (keep, ids).

        Of the reason's tokens already fed (all but the last generated one), the first `keep` stay
        and `ids` follow. A reason the model closed itself keeps its own tokens. Otherwise the
        missing tags are added to the reason's text (an end of turn dropped) and that text is
        tokenized as a whole, as an OpenAI-compatible server re-reading the same text does: the
        model then sees the tokens it would have written itself ("><" rather than ">" then "<").
        """
        text_ids = generated[:-1] if generated[-1] in self.eos_ids else generated
        text = self.tokenizer.decode(text_ids, skip_special_tokens=False)
        tags = closing_tags(text)
        if not tags:
            return len(generated) - 1, generated[-1:]
        target = self.tokenizer.encode(text + tags, add_special_tokens=False)
        fed = generated[:-1]
        keep = next((i for i, (a, b) in enumerate(zip(target, fed)) if a != b), min(len(target), len(fed)))
        return keep, target[keep:]

    def reason(self, generated: list[int]) -> str:
        """The reason text of generated ids, tags and special tokens removed."""
        return extract_reason(self.tokenizer.decode(generated, skip_special_tokens=True))


def decode_reasons(
    tokens: ReasonTokens,
    questions: list[tuple[int, int, int]],
    logits: torch.Tensor,
    advance: Callable[[Pieces], torch.Tensor],
    *,
    videos: int,
    max_new_tokens: int,
    temperature: float,
) -> tuple[list[list[int]], torch.Tensor]:
    """Reasons for all questions at once, each stopping on its own; (generated ids, answer-position logits).

    `questions` holds (video row, question index, suffix length) in video order, `logits` the
    next-token logits after each suffix, and `advance(pieces)` feeds `pieces` (of `videos` rows)
    and returns the next-token logits at each piece's end, in piece order. Each step feeds one
    token per unfinished question; a question that has stopped is left out, so the others cannot
    change it. A last step feeds each question's closing ids (`ReasonTokens.closing`); a piece that
    starts before its question's next offset replaces that question's tokens from there on.
    """
    generated: list[list[int]] = [[] for _ in questions]
    offset = [length for _, _, length in questions]  # where each question's next token goes
    live = [True] * len(questions)
    chosen = pick(logits, tokens.suppressed, temperature).tolist()
    for step in range(max_new_tokens):
        for r in range(len(questions)):
            if live[r]:
                generated[r].append(chosen[r])
                live[r] = not (tokens.stopped(generated[r]) or step == max_new_tokens - 1)
        running = [r for r in range(len(questions)) if live[r]]
        if not running:
            break
        pieces: Pieces = [[] for _ in range(videos)]
        for r in running:  # video-major, as `questions`: `advance` returns them in this order
            v, q, _ = questions[r]
            pieces[v].append((q, generated[r][-1:], offset[r]))
            offset[r] += 1
        for r, token in zip(running, pick(advance(pieces), tokens.suppressed, temperature).tolist()):
            chosen[r] = token
    pieces = [[] for _ in range(videos)]
    for r, (v, q, length) in enumerate(questions):
        keep, closing = tokens.closing(generated[r])
        pieces[v].append((q, closing, length + keep))
    return generated, advance(pieces)
