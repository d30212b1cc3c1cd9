"""Evaluation metrics of FingER (paper Sec. 4.1.2, Tables 1-3) as pure functions.

Acc of Yes/No answers, SRCC and PLCC on FingER-test and GenAI-Bench, and pairwise accuracy
"tau" (tie-calibrated) and "diff" (human ties excluded) on MonetBench. Arrays in, floats out.
"""

from __future__ import annotations

import warnings

import numpy as np

_ANSWERS = {"yes": True, "no": False}


def _vector(values, name: str, *, min_len: int = 1) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional; got shape {array.shape}")
    if len(array) < min_len:
        raise ValueError(f"{name} needs at least {min_len} items; got {len(array)}")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"{name} contains NaN or inf at index {bad[0]}; drop or fix those items first")
    return array


def _same_length(**arrays) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"lengths must match; got {lengths}")


def _answers(values, name: str) -> np.ndarray:
    out = []
    for i, value in enumerate(values):
        if isinstance(value, (bool, np.bool_)):
            out.append(bool(value))
        elif isinstance(value, str) and value.lower() in _ANSWERS:
            out.append(_ANSWERS[value.lower()])
        else:
            raise ValueError(f"{name}[{i}] must be 'Yes'/'No' (any case) or a bool; got {value!r}")
    if not out:
        raise ValueError(f"{name} is empty; accuracy needs at least one answer")
    return np.array(out)


def answer_accuracy(predicted, truth) -> float:
    """Fraction of Yes/No answers equal to the ground truth (the "Acc" of FingER Tables 1-2).

    Answers are "Yes"/"No" strings (case-insensitive) or bools; both sequences must have the same
    non-zero length.
    """
    pred, true = _answers(predicted, "predicted"), _answers(truth, "truth")
    _same_length(predicted=pred, truth=true)
    return float(np.mean(pred == true))


def class_accuracy(correct, classes) -> dict:
    """Accuracy within each class and their mean (balanced accuracy), beside the overall one.

    `correct[i]` says whether question i was answered right, `classes[i]` which class its right
    answer belongs to (for FingER questions: "fine" when it says the video is fine, else
    "broken"). On a skewed mix the overall accuracy says little (always answering "fine" scores
    the share of "fine" questions); the balanced figure weighs each class alike. `balanced` is
    None unless every class in `classes` has at least one question.
    """
    ok = np.asarray(correct, dtype=bool)
    labels = np.asarray(classes)
    if ok.shape != labels.shape or not ok.size:
        raise ValueError(f"correct and classes must be equal, non-empty sequences; got {ok.size} and {labels.size}")
    per_class = {str(c): float(ok[labels == c].mean()) for c in sorted(set(labels.tolist()))}
    return {"per_class": per_class, "balanced": float(np.mean(list(per_class.values()))) if len(per_class) > 1 else None,
            "share": {c: float(np.mean(labels == c)) for c in per_class}}


def _correlation(x, y, fn_name: str) -> float:
    try:
        from scipy import stats
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("srcc/plcc need scipy: pip install 'finger-reward[eval]'") from err
    x, y = _vector(x, "x", min_len=2), _vector(y, "y", min_len=2)
    _same_length(x=x, y=y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(getattr(stats, fn_name)(x, y).statistic)


def srcc(x, y) -> float:
    """Spearman rank correlation coefficient (FingER Sec. 4.1.2, Tables 1-3), tied ranks averaged.

    Equals `scipy.stats.spearmanr(x, y).statistic`; NaN (no warning) when either input is constant.
    """
    return _correlation(x, y, "spearmanr")


def plcc(x, y) -> float:
    """Pearson linear correlation coefficient (FingER Sec. 4.1.2, Tables 1-3).

    Equals `scipy.stats.pearsonr(x, y).statistic`; NaN (no warning) when either input is constant.
    """
    return _correlation(x, y, "pearsonr")


def pairwise_accuracy(scores_a, scores_b, labels, *, epsilon: float | None = None) -> dict:
    """Pairwise preference accuracy "tau" and "diff" (FingER Sec. 4.1.2 and Table 3 on MonetBench).

    `labels[i]` is 1 when humans prefer A, -1 when they prefer B, 0 for a human tie.

    tau: tie-calibrated pairwise accuracy over all pairs (Deutsch, Foster and Freitag, EMNLP 2023,
    as reported by VisionReward / VideoGen-RewardBench / VQ-Insight). The metric predicts a tie when
    |a - b| <= epsilon, else sign(a - b); tau = mean(prediction == label), human ties included.
    With `epsilon=None` the epsilon maximising tau is searched over {0} U {|a_i - b_i|} (the optimum
    is always one of them) in O(n log n), and the smallest among equal best is reported; a given
    epsilon (e.g. calibrated on another split) is used as is.

    diff: accuracy of sign(a - b) on the pairs humans did not tie ("w/o ties"); a pair scored exactly
    equal counts as wrong. NaN when every pair is a human tie.

    tau_videoalign: tau as KwaiVGI/VideoAlign's `calc_accuracy.py` computes it (`tau_videoalign`),
    for comparison with tables made with that script.

    Returns {"tau", "tau_videoalign", "diff", "epsilon", "pairs", "ties"} (ties = number of human ties).
    """
    a, b = _vector(scores_a, "scores_a"), _vector(scores_b, "scores_b")
    y = _vector(labels, "labels")
    _same_length(scores_a=a, scores_b=b, labels=y)
    bad = np.flatnonzero(~np.isin(y, (-1, 0, 1)))
    if bad.size:
        raise ValueError(f"labels must be -1, 0 or 1; got {y[bad[0]]:g} at index {bad[0]}")
    sign, gap, n = np.sign(a - b), np.abs(a - b), len(y)
    untied = y != 0
    diff = float(np.mean(sign[untied] == y[untied])) if untied.any() else float("nan")
    if epsilon is None:
        epsilon, correct = _calibrate(gap, sign, y)
    else:
        if not np.isfinite(epsilon) or epsilon < 0:
            raise ValueError(f"epsilon must be a finite number >= 0 or None; got {epsilon!r}")
        correct = int(np.sum(np.where(gap <= epsilon, 0.0, sign) == y))
    return {"tau": correct / n, "tau_videoalign": tau_videoalign(a - b, y), "diff": diff, "epsilon": float(epsilon),
            "pairs": n, "ties": int(n - untied.sum())}


ARENA_VOTES = ("leftvote", "rightvote", "tievote", "bothbad_vote")


def arena_accuracy(scores_a, scores_b, votes, *, epsilon: float | None = None,
                   bad_threshold: float | None = None) -> dict:
    """GenAI-Bench's four-way arena accuracy (left, right, tie, both bad) for a scoring model.

    The model votes A>B when a - b > epsilon, B>A when b - a > epsilon, and otherwise a tie: both
    bad when the pair's mean score is below `bad_threshold`, both good otherwise. It is right as
    TIGER-AI-Lab/GenAI-Bench `inference.py` counts a judge right: A>B for "leftvote", B>A for
    "rightvote", A=B=Good for "tievote", A=B=Bad for "bothbad_vote". With None, epsilon and the
    threshold are calibrated like tau's epsilon: the pair with the most right votes (epsilon over
    {0} and every gap, the threshold over every tied pair's mean and +inf; the smallest of equals).

    Returns {"accuracy", "per_vote" (accuracy within each human vote), "epsilon", "bad_threshold",
    "majority_baseline" (always giving the most common human vote), "pairs"}.
    """
    a, b = _vector(scores_a, "scores_a"), _vector(scores_b, "scores_b")
    vote = np.array([str(v).lower() for v in votes])
    _same_length(scores_a=a, scores_b=b, votes=vote)
    bad = [str(v) for v in vote if v not in ARENA_VOTES]
    if bad:
        raise ValueError(f"votes must be one of {', '.join(ARENA_VOTES)}; got {bad[0]!r}")
    gap, mean = a - b, (a + b) / 2
    if epsilon is None or bad_threshold is None:
        epsilon, bad_threshold = _calibrate_arena(gap, mean, vote, epsilon, bad_threshold)
    right = _arena_right_mask(gap, mean, vote, epsilon, bad_threshold)
    share = {v: float(np.mean(vote == v)) for v in ARENA_VOTES}
    return {"accuracy": float(right.mean()), "epsilon": float(epsilon), "bad_threshold": float(bad_threshold),
            "per_vote": {v: float(right[vote == v].mean()) for v in ARENA_VOTES if (vote == v).any()},
            "majority_baseline": max(share.values()), "pairs": len(vote)}


def _calibrate_arena(gap, mean, vote, epsilon, bad_threshold) -> tuple[float, float]:
    """(epsilon, bad_threshold) with the most right votes, the smallest of equals; a given one stays fixed.

    Pairs join the model's ties in ascending |gap|; each keeps, per candidate threshold, how many
    tied pairs it gets right, so every epsilon costs one vector update per joining pair.
    """
    order = np.argsort(np.abs(gap), kind="stable")
    size, vote = np.abs(gap)[order], vote[order]
    untied_right = np.where(gap[order] > 0, vote == "leftvote", vote == "rightvote")
    right_from = np.concatenate([np.cumsum(untied_right[::-1])[::-1], [0]])  # untied right among pairs k..n-1
    thresholds = np.array([bad_threshold]) if bad_threshold is not None else np.append(np.unique(mean), np.inf)
    # a "both bad" tie is right for thresholds above its mean, a "tie" vote for thresholds at or below it
    above = np.searchsorted(thresholds, mean[order], side="right")
    tied_right = np.zeros(len(thresholds), dtype=np.int64)
    best, k = (-1, 0.0, 0.0), 0
    for eps in [epsilon] if epsilon is not None else np.unique(np.append(size, 0.0)):
        while k < len(size) and size[k] <= eps:
            if vote[k] == "bothbad_vote":
                tied_right[above[k]:] += 1
            elif vote[k] == "tievote":
                tied_right[:above[k]] += 1
            k += 1
        j = int(np.argmax(tied_right))
        if right_from[k] + tied_right[j] > best[0]:
            best = (right_from[k] + tied_right[j], float(eps), float(thresholds[j]))
    return best[1], best[2]


def _arena_right_mask(gap, mean, vote, epsilon, bad_threshold) -> np.ndarray:
    tie = np.abs(gap) <= epsilon
    return np.where(tie, np.where(mean < bad_threshold, vote == "bothbad_vote", vote == "tievote"),
                    np.where(gap > 0, vote == "leftvote", vote == "rightvote"))


def tau_videoalign(model_gap, labels) -> float:
    """Tie-calibrated accuracy as VideoAlign's `calc_accuracy_with_ties` computes it.

    `model_gap[i]` is score_A - score_B, `labels[i]` 1 / -1 / 0 (human tie). Pairs are visited in
    ascending |gap| (stable order); after visiting the k-th, the first k pairs count as model ties
    and the rest keep sign(gap) (a gap of exactly 0 counts as a wrong preference); tau is the best
    of these n accuracies. It differs from `pairwise_accuracy`'s exact optimum in two ways: the
    threshold below the smallest gap (no model tie) is never tried, and pairs with equal gaps
    become ties one at a time rather than together (so it can also be above the exact optimum,
    which makes equal gaps ties together).
    """
    gap, y = _vector(model_gap, "model_gap"), _vector(labels, "labels")
    _same_length(model_gap=gap, labels=y)
    order = np.argsort(np.abs(gap), kind="stable")
    gap, y = gap[order], y[order]
    untied_right = (y != 0) & (y * gap > 0)  # counted right while still untied
    tied_right = np.cumsum(y == 0)  # human ties among the first k, right once they are model ties
    right_after = np.concatenate([np.cumsum(untied_right[::-1])[::-1][1:], [0]])  # untied-right among pairs k+1..n
    return float(np.max((tied_right + right_after) / len(y)))


def _calibrate(gap: np.ndarray, sign: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """The epsilon in {0} U gap with the most correct predictions (smallest on a tie), and that count.

    Correct(eps) = #(sign == y) + sum over gap_i <= eps of [(y_i == 0) - (sign_i == y_i)]:
    one sort, one cumulative sum, one binary search per distinct candidate.
    """
    order = np.argsort(gap, kind="stable")
    gain = np.cumsum((y[order] == 0).astype(np.int64) - (sign[order] == y[order]))
    candidates = np.unique(np.concatenate([[0.0], gap]))
    covered = np.searchsorted(gap[order], candidates, side="right")
    correct = int(np.sum(sign == y)) + np.where(covered > 0, gain[np.maximum(covered - 1, 0)], 0)
    best = int(np.argmax(correct))
    return float(candidates[best]), int(correct[best])
