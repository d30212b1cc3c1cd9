"""Eq. 1 from a server's top-K log-probabilities instead of full logits.

An OpenAI-compatible server returns, at the answer position, the K most likely tokens as text
with their log-probabilities. The Yes-set T_Y and No-set T_N are the same spellings the local
engine uses (scoring.YES_SPELLINGS / NO_SPELLINGS, bare and after a space); a token in the list
is one token, so matching its text picks exactly the single-token spellings the local engine
takes from the tokenizer. Renormalising over the variants present equals Eq. 1 whenever all the
tokenizer's variants are in the top K; a variant below the K-th token is left out, and its mass
is at most that of the K-th token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from finger_reward.scoring import NO_SPELLINGS, YES_SPELLINGS

YES_TEXTS = frozenset(space + s for s in YES_SPELLINGS for space in ("", " "))
NO_TEXTS = frozenset(space + s for s in NO_SPELLINGS for space in ("", " "))
# Servers that return raw vocabulary pieces instead of decoded text write a leading space as
# "Ġ" (byte-level BPE, Qwen) or "▁" (SentencePiece).
_SPACE_MARKS = ("\u0120", "\u2581")


class NoAnswerToken(ValueError):
    """Neither a Yes nor a No spelling is among the top-K tokens, so Eq. 1 has nothing to renormalise."""


@dataclass(frozen=True)
class TopAnswer:
    """[P(Yes), P(No)] over the variants present; `missing_variant` is "yes" or "no" when that whole set was absent."""

    p_yes: float
    p_no: float
    missing_variant: str | None = None


def token_text(token: str) -> str:
    """A token as text, with a raw leading-space mark read as a space."""
    for mark in _SPACE_MARKS:
        if token.startswith(mark):
            return " " + token[len(mark):]
    return token


def answer_from_top_logprobs(top: Sequence[Mapping]) -> TopAnswer:
    """Eq. 1 over the Yes/No spellings among `top` ({"token": str, "logprob": float} entries).

    When only one set is present its probability is 1 and `missing_variant` names the other set
    (the true value differs by at most the K-th token's share); with neither, `NoAnswerToken`.
    A spelling listed twice counts once (the first, most likely entry), as a token-id set would.
    """
    seen: set[str] = set()
    yes: list[float] = []
    no: list[float] = []
    for entry in top:
        text, logprob = token_text(str(entry["token"])), float(entry["logprob"])
        if text in seen or not math.isfinite(logprob):
            continue
        seen.add(text)
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
    missing = "yes" if not yes else "no" if not no else None
    total = mass_yes + mass_no
    return TopAnswer(mass_yes / total, mass_no / total, missing)
