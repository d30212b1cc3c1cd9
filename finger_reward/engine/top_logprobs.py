"""Eq. 1 from a server's top-K log-probabilities instead of full logits.

An OpenAI-compatible server returns, at the answer position, the K most likely tokens as text
with their log-probabilities. The Yes-set T_Y and No-set T_N are the same spellings the local
engine uses (scoring.YES_SPELLINGS / NO_SPELLINGS, bare and after a space); a token in the list
is one token, so matching its text picks exactly the single-token spellings the local engine
takes from the tokenizer. Renormalising over the variants present equals Eq. 1 whenever all the
tokenizer's variants are in the top K; a variant below the K-th token is left out, and its mass
is at most that of the K-th token, so such a question is flagged (`missing_variant`).

In reason mode the answer is read from the generation that wrote the reason: `reason_span` finds
where in the generated tokens the local engine would have stopped the reason, and whether the
model itself then wrote exactly the closing tags the local engine feeds, so that the next token is
the answer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from typing import NamedTuple

from finger_reward.engine.reasoning import closing_tags, ends_with_stop_tag
from finger_reward.scoring import NO_SPELLINGS, YES_SPELLINGS

YES_TEXTS = frozenset(space + s for s in YES_SPELLINGS for space in ("", " "))
NO_TEXTS = frozenset(space + s for s in NO_SPELLINGS for space in ("", " "))
# Servers that return raw vocabulary pieces instead of decoded text write a leading space as
# "Ġ" (byte-level BPE, Qwen) or "▁" (SentencePiece).
_SPACE_MARKS = ("\u0120", "\u2581")
END_OF_TURN = frozenset({"<|im_end|>", "<|endoftext|>"})  # Qwen's end tokens, as a server may list them


class NoAnswerToken(ValueError):
    """Neither a Yes nor a No spelling is among the top-K tokens, so Eq. 1 has nothing to renormalise."""


@dataclass(frozen=True)
class TopAnswer:
    """[P(Yes), P(No)] over the variants present, and what was absent from the top K.

    `missing_variant` is "yes" or "no" when that whole set was absent, "partial" when both sets
    are present but some expected spelling is not, else None; `absent` lists the absent spellings.
    """

    p_yes: float
    p_no: float
    missing_variant: str | None = None
    absent: tuple[str, ...] = ()


def token_text(token: str) -> str:
    """A token as text, with a raw leading-space mark read as a space."""
    for mark in _SPACE_MARKS:
        if token.startswith(mark):
            return " " + token[len(mark):]
    return token


def answer_from_top_logprobs(top: Sequence[Mapping], expected: Set[str] | None = None) -> TopAnswer:
    """Eq. 1 over the Yes/No spellings among `top` ({"token": str, "logprob": float} entries).

    `expected` holds the spellings the model's tokenizer has as single tokens (`expected_spellings`;
    default: every spelling). When only one set is present its probability is 1 and
    `missing_variant` names the other set (the true value differs by at most the K-th token's
    share); when an expected spelling is absent it is "partial"; with neither set, `NoAnswerToken`.
    A spelling listed twice counts once (the first, most likely entry), as a token-id set would.
    """
    seen: set[str] = set()
    yes: list[float] = []
    no: list[float] = []
    for entry in top:
        text, logprob = token_text(str(entry["token"])), float(entry["logprob"])
        if text in seen:
            continue
        seen.add(text)  # listed, even at -inf: its share is known
        if not math.isfinite(logprob):
            continue
        if text in YES_TEXTS:
            yes.append(logprob)
        elif text in NO_TEXTS:
            no.append(logprob)
    if not yes and not no:
        shown = [str(e["token"]) for e in top[:8]]
        raise NoAnswerToken(f"no Yes/No spelling among the top {len(top)} tokens (most likely: {shown})")
    peak = max(yes + no)
    mass_yes = sum(math.exp(lp - peak) for lp in yes)
    mass_no = sum(math.exp(lp - peak) for lp in no)
    absent = tuple(sorted((YES_TEXTS | NO_TEXTS if expected is None else expected) - seen))
    missing = "yes" if not yes else "no" if not no else "partial" if absent else None
    total = mass_yes + mass_no
    return TopAnswer(mass_yes / total, mass_no / total, missing, absent)


def expected_spellings(tokenizer) -> frozenset[str]:
    """The Yes/No spellings a tokenizer has as single tokens, as text: the ones a full top-K must list."""
    from finger_reward.scoring import answer_token_ids

    yes_ids, no_ids = answer_token_ids(tokenizer)
    return frozenset(tokenizer.decode([i]) for i in yes_ids + no_ids)


class ReasonSpan(NamedTuple):
    """Where a generation's reason ends as the local engine ends it, and its answer token if the model wrote one.

    `end`: the reason's tokens are `tokens[:end]` (up to a stop tag, an end of turn or
    `max_new_tokens`). `answer`: the index of the answer token, when the tokens after the reason
    spell exactly the closing tags the local engine would feed (`reasoning.closing_tags`); None when
    the generation stopped without them (out of tokens, end of turn, anything else in between).
    """

    end: int
    answer: int | None


def reason_span(tokens: Sequence[str], max_new_tokens: int) -> ReasonSpan:
    """`ReasonSpan` of generated token texts, given the local engine's `max_new_tokens` for the reason."""
    text, end = "", None
    for i, token in enumerate(tokens[:max_new_tokens]):
        if token in END_OF_TURN:  # the local engine drops it and adds the tags the text lacks
            return ReasonSpan(i, None)
        text += token
        if ends_with_stop_tag(text):
            end = i + 1
            break
    if end is None:
        return ReasonSpan(min(len(tokens), max_new_tokens), None)
    missing, written = closing_tags(text), ""
    for j in range(end, len(tokens) + 1):
        if written == missing:
            return ReasonSpan(end, j if j < len(tokens) else None)
        if j == len(tokens) or not missing.startswith(written + tokens[j]):
            return ReasonSpan(end, None)
        written += tokens[j]
    return ReasonSpan(end, None)
