"""FingER's hierarchical scores (paper Sec. 3.1, Eq. 1-4) as pure functions.

Evaluation and the RL reward both call these, so the reported metric and the optimised
reward cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from finger_reward.questions.record import DIMENSIONS

YES_SPELLINGS = ("Yes", "yes", "YES")
NO_SPELLINGS = ("No", "no", "NO")
CHOICE_SPELLINGS = (("A",), ("B",))  # the answers of a two-video comparison; lower-case "a" is a word
AGGREGATES = ("mean", "sum")
RATING_LEVELS = ("Bad", "Poor", "Fair", "Good", "Excellent")
RATING_VALUES = (0.0, 0.25, 0.5, 0.75, 1.0)


def single_token_ids(tokenizer, spellings: Sequence[str]) -> list[int]:
    """Ids of the spellings (bare and after a space) that the tokenizer encodes as one token."""
    ids = []
    for text in (prefix + s for s in spellings for prefix in ("", " ")):
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


def answer_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The Yes-token set T_Y and No-token set T_N of Eq. 1, derived from the tokenizer."""
    yes_ids, no_ids = single_token_ids(tokenizer, YES_SPELLINGS), single_token_ids(tokenizer, NO_SPELLINGS)
    if not yes_ids or not no_ids:
        raise ValueError("the tokenizer has no single-token spelling of Yes or of No; FingER scoring needs both")
    return yes_ids, no_ids


def choice_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Eq. 1's two token sets for a comparison of Video A and Video B: the single-token spellings of "A" and of "B"."""
    a_ids, b_ids = single_token_ids(tokenizer, CHOICE_SPELLINGS[0]), single_token_ids(tokenizer, CHOICE_SPELLINGS[1])
    if not a_ids or not b_ids:
        raise ValueError("the tokenizer has no single-token spelling of A or of B; a pairwise comparison reads both")
    return a_ids, b_ids


def answer_probs(logits: torch.Tensor, yes_ids: Sequence[int], no_ids: Sequence[int]) -> torch.Tensor:
    """Eq. 1: softmax over T_Y u T_N only; returns (..., 2) holding [P(Yes), P(No)], which sum to 1."""
    restricted = logits[..., list(yes_ids) + list(no_ids)].float().softmax(dim=-1)
    n_yes = len(yes_ids)
    return torch.stack([restricted[..., :n_yes].sum(-1), restricted[..., n_yes:].sum(-1)], dim=-1)


def hard_answers(probs: torch.Tensor) -> torch.Tensor:
    """The "w/o prob" variant: one-hot [Yes, No] of the more likely answer (a tie reads as Yes)."""
    yes = (probs[..., 0] >= probs[..., 1]).to(probs.dtype)
    return torch.stack([yes, 1 - yes], dim=-1)


def entity_scores(probs: torch.Tensor, positive: Sequence[bool] | torch.Tensor) -> torch.Tensor:
    """Eq. 2: P(Yes|q) for a positive question, P(No|q) for a negative one; `probs` is (Q, 2)."""
    positive = torch.as_tensor(positive, dtype=torch.bool, device=probs.device)
    return torch.where(positive, probs[..., 0], probs[..., 1])


def dimension_scores(
    scores: torch.Tensor | Sequence[float], dimensions: Sequence[str], aggregate: str = "mean"
) -> dict[str, float]:
    """Eq. 3: per dimension, the sum (paper) or mean (default) of its entity scores.

    The mean keeps prompts with different question counts on one scale, which a reward needs.
    Only dimensions that have questions appear in the result.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate={aggregate!r} is not one of {AGGREGATES}")
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if len(scores) != len(dimensions):
        raise ValueError(f"{len(scores)} entity scores but {len(dimensions)} dimensions")
    result = {}
    for dim in DIMENSIONS:
        members = scores[[i for i, d in enumerate(dimensions) if d == dim]]
        if len(members):
            result[dim] = float(members.sum() if aggregate == "sum" else members.mean())
    return result


def normalize_weights(weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Eq. 4 weights over the five dimensions, summing to 1; None means equal weights.

    A dimension left out of `weights` gets weight 0.
    """
    if weights is None:
        return {dim: 1.0 / len(DIMENSIONS) for dim in DIMENSIONS}
    unknown = sorted(set(weights) - set(DIMENSIONS))
    if unknown:
        raise ValueError(f"unknown dimension(s) in weights: {', '.join(unknown)}; expected {', '.join(DIMENSIONS)}")
    negative = {d: w for d, w in weights.items() if w < 0}
    if negative:
        raise ValueError(f"weights must be non-negative, got {negative}")
    total = float(sum(weights.values()))
    if total <= 0:
        raise ValueError("weights must not all be zero")
    return {dim: float(weights.get(dim, 0.0)) / total for dim in DIMENSIONS}


def overall_score(dim_scores: Mapping[str, float], weights: Mapping[str, float] | None = None) -> float:
    """Eq. 4: weighted sum of the dimension scores.

    When a prompt has no question in some dimension, the weights of the dimensions it does
    have are renormalised, so a missing dimension neither counts as 0 nor as perfect.
    """
    norm = normalize_weights(weights)
    present = {dim: norm[dim] for dim in dim_scores}
    total = sum(present.values())
    if total <= 0:
        return float("nan")
    return sum(w * dim_scores[dim] for dim, w in present.items()) / total


def rating_expectation(logits: torch.Tensor, level_ids: Sequence[int]) -> torch.Tensor:
    """Q-Save / Q-Align 5-level score: softmax over Bad..Excellent tokens, expectation of 0..1."""
    if len(level_ids) != len(RATING_VALUES):
        raise ValueError(f"need {len(RATING_VALUES)} level token ids, got {len(level_ids)}")
    probs = logits[..., list(level_ids)].float().softmax(dim=-1)
    return probs @ torch.tensor(RATING_VALUES, dtype=probs.dtype, device=probs.device)
