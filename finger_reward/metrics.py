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

    Returns {"tau", "diff", "epsilon", "pairs", "ties"} (ties = number of human ties).
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
    return {"tau": correct / n, "diff": diff, "epsilon": float(epsilon), "pairs": n, "ties": int(n - untied.sum())}


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
