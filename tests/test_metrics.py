"""FingER's evaluation metrics against scipy, hand-computed values and a brute-force reference."""

import math
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats

from finger_reward.metrics import (
    ARENA_VOTES,
    answer_accuracy,
    arena_accuracy,
    class_accuracy,
    pairwise_accuracy,
    plcc,
    srcc,
    tau_videoalign,
)


def naive_tau(a, b, labels):
    """Every candidate epsilon, accuracy computed directly: O(n^2). Returns (tau, smallest best epsilon)."""
    gaps = np.abs(np.asarray(a, float) - np.asarray(b, float))
    best_tau, best_eps = -1.0, None
    for eps in sorted({0.0, *gaps.tolist()}):
        pred = [0 if abs(x - z) <= eps else (1 if x > z else -1) for x, z in zip(a, b)]
        tau = float(np.mean(np.array(pred) == np.asarray(labels)))
        if tau > best_tau:
            best_tau, best_eps = tau, eps
    return best_tau, best_eps


@pytest.mark.parametrize("fn, ref", [(srcc, stats.spearmanr), (plcc, stats.pearsonr)])
@pytest.mark.parametrize("ties", [False, True])
def test_correlations_equal_scipy(fn, ref, ties):
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.normal(size=40), rng.normal(size=40)
        if ties:
            x, y = np.round(x), np.round(y * 0.5)
        assert fn(x, y) == pytest.approx(ref(x, y).statistic, abs=1e-12)
    assert isinstance(fn([1, 2, 3], [1, 3, 2]), float)


@pytest.mark.parametrize("fn", [srcc, plcc])
def test_correlations_of_constant_input_are_nan_without_warning(fn, recwarn):
    assert math.isnan(fn([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert not recwarn.list


@pytest.mark.parametrize("fn", [srcc, plcc])
def test_correlations_validate(fn):
    with pytest.raises(ValueError, match="lengths must match"):
        fn([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="x needs at least 2"):
        fn([1], [2])
    with pytest.raises(ValueError, match="y contains NaN"):
        fn([1, 2, 3], [1, float("nan"), 3])


def test_class_accuracy_weighs_each_class_alike():
    # 5 "fine" questions all right, 1 "broken" one wrong: 0.83 overall, yet no better than a constant answer.
    result = class_accuracy([True] * 5 + [False], ["fine"] * 5 + ["broken"])
    assert result["per_class"] == {"broken": 0.0, "fine": 1.0}
    assert result["balanced"] == 0.5 and result["share"]["fine"] == pytest.approx(5 / 6)
    assert class_accuracy([True, False], ["fine", "fine"])["balanced"] is None  # one class: no balanced figure
    with pytest.raises(ValueError, match="equal, non-empty"):
        class_accuracy([True], ["fine", "broken"])


def test_answer_accuracy_hand_example():
    assert answer_accuracy(["Yes", "no", "YES", "No"], ["yes", "No", "No", "Yes"]) == 0.5
    assert answer_accuracy([True, False, True], ["Yes", "No", "no"]) == pytest.approx(2 / 3)
    assert answer_accuracy(np.array([True, False]), [True, False]) == 1.0


def test_answer_accuracy_validates():
    with pytest.raises(ValueError, match=r"predicted\[1\].*'maybe'"):
        answer_accuracy(["Yes", "maybe"], ["Yes", "No"])
    with pytest.raises(ValueError, match=r"truth\[0\].*1"):
        answer_accuracy(["Yes"], [1])
    with pytest.raises(ValueError, match="lengths must match"):
        answer_accuracy(["Yes", "No"], ["Yes"])
    with pytest.raises(ValueError, match="predicted is empty"):
        answer_accuracy([], [])


def test_tau_matches_brute_force_with_ties_in_scores_and_labels():
    for seed in range(200):
        rng = np.random.default_rng(seed)
        a, b = np.round(rng.normal(size=50), 1), np.round(rng.normal(size=50), 1)
        labels = rng.choice([-1, 0, 1], size=50, p=[0.35, 0.3, 0.35])
        labels = np.where(rng.random(50) < 0.6, np.sign(a - b), labels).astype(int)  # informative scores
        out = pairwise_accuracy(a, b, labels)
        tau, eps = naive_tau(a, b, labels)
        assert (out["tau"], out["epsilon"]) == (tau, eps), seed
        untied = labels != 0
        assert out["diff"] == np.mean(np.sign(a - b)[untied] == labels[untied])
        assert (out["pairs"], out["ties"]) == (50, int((~untied).sum()))


def test_pairwise_hand_example():
    a = [0.9, 0.5, 0.52, 0.1, 0.3]
    b = [0.1, 0.5, 0.50, 0.4, 0.2]
    labels = [1, 0, 0, -1, -1]
    # gaps 0.8, 0, 0.02, 0.3, 0.1; eps=0: pairs 0, 1, 3 right (3/5); eps=0.02: pair 2 also right (4/5);
    # eps=0.1: pair 4 predicted tie, still wrong (4/5, larger eps); eps=0.3: pair 3 lost (3/5).
    # VideoAlign's way reaches 4/5 too: after the pairs with gaps 0 and 0.02 become ties.
    out = pairwise_accuracy(a, b, labels)
    assert out == {"tau": 0.8, "tau_videoalign": 0.8, "diff": 2 / 3, "epsilon": pytest.approx(0.02), "pairs": 5,
                   "ties": 2}
    assert out["epsilon"] == abs(0.52 - 0.50)


def test_diff_counts_equal_scores_as_wrong():
    out = pairwise_accuracy([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [1, 1, -1])
    assert out["diff"] == pytest.approx(1 / 3)  # pair 0 scored equal: wrong, not skipped, not half


def test_given_epsilon_is_used_as_is():
    a, b, labels = [0.9, 0.5, 0.52, 0.1, 0.3], [0.1, 0.5, 0.50, 0.4, 0.2], [1, 0, 0, -1, -1]
    assert pairwise_accuracy(a, b, labels, epsilon=0.0)["tau"] == 0.6
    out = pairwise_accuracy(a, b, labels, epsilon=0.5)  # pairs 1 and 2 tied correctly, 3 and 4 tied wrongly
    assert (out["tau"], out["epsilon"]) == (0.6, 0.5)
    assert pairwise_accuracy(a, b, labels, epsilon=10)["tau"] == 0.4  # everything predicted a tie
    assert pairwise_accuracy([1.5, 3.0], [1.0, 1.0], [0, 1], epsilon=0.5)["tau"] == 1.0  # |a-b| == eps is a tie
    with pytest.raises(ValueError, match="epsilon must be"):
        pairwise_accuracy(a, b, labels, epsilon=-0.1)


def test_all_tied_labels_give_nan_diff():
    out = pairwise_accuracy([1.0, 2.0], [2.0, 2.0], [0, 0])
    assert math.isnan(out["diff"])
    assert (out["tau"], out["ties"]) == (1.0, 2)


def test_pairwise_validates_with_argument_names():
    with pytest.raises(ValueError, match="lengths must match.*scores_b"):
        pairwise_accuracy([1, 2, 3], [1, 2], [1, 0, -1])
    with pytest.raises(ValueError, match="labels must be -1, 0 or 1; got 2 at index 1"):
        pairwise_accuracy([1, 2], [2, 1], [1, 2])
    with pytest.raises(ValueError, match="scores_a contains NaN"):
        pairwise_accuracy([1, float("nan")], [2, 1], [1, -1])
    with pytest.raises(ValueError, match="labels contains NaN"):
        pairwise_accuracy([1, 2], [2, 1], [1, float("nan")])


def test_pairwise_100k_pairs_is_fast():
    rng = np.random.default_rng(0)
    n = 100_000
    a, b = np.round(rng.normal(size=n), 3), np.round(rng.normal(size=n), 3)
    labels = rng.integers(-1, 2, size=n)
    start = time.perf_counter()
    out = pairwise_accuracy(a, b, labels)
    assert time.perf_counter() - start < 0.5
    assert out["pairs"] == n and 0 <= out["tau"] <= 1


def test_module_imports_without_scipy():
    code = (
        "import sys; sys.modules['scipy'] = None; import finger_reward.metrics as m; "
        "print(m.pairwise_accuracy([1, 2], [2, 1], [-1, 1])['tau'])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "1.0"


# ---- tau as VideoAlign computes it ---------------------------------------------------------------------


def _videoalign_by_hand(h, m):
    """VideoAlign calc_accuracy.py's procedure re-derived from its description: counts over all pairs start
    with no model tie; pairs are visited by ascending |m| (stable), each one moved into the model's ties and
    tau = (C + Thm) / n recorded after it; the best recorded tau wins."""
    def kind(hi, mi, tie):
        if hi == 0:
            return "Thm" if tie else "Th"
        if tie:
            return "Tm"
        return "C" if hi * mi > 0 else "D"

    counts = {"C": 0, "D": 0, "Th": 0, "Tm": 0, "Thm": 0}
    for hi, mi in zip(h, m):
        counts[kind(hi, mi, False)] += 1
    best = float("-inf")
    for hi, mi in sorted(zip(h, m), key=lambda pair: abs(pair[1])):
        counts[kind(hi, mi, False)] -= 1
        counts[kind(hi, mi, True)] += 1
        best = max(best, (counts["C"] + counts["Thm"]) / len(h))
    return best


def test_tau_videoalign_never_tries_no_model_tie():
    # humans prefer A twice; the model does too by gaps 1 and 2: exact tau 1.0 (epsilon 0), VideoAlign 0.5.
    result = pairwise_accuracy([1, 2], [0, 0], [1, 1])
    assert (result["tau"], result["tau_videoalign"]) == (1.0, 0.5)
    assert tau_videoalign([1, 2], [1, 1]) == 0.5 == _videoalign_by_hand([1, 1], [1, 2])


def test_tau_videoalign_splits_equal_gaps_one_pair_at_a_time():
    # Two pairs with the same gap, a human tie first in the stable order: after it alone is a model tie,
    # tau is (1 + 1) / 3; making both ties at once (the exact method) can only reach 2/3 too, but by
    # another split: the two methods agree here on the value, not on which pairs are ties.
    h, m = [0, -1, 1], [0.5, 0.5, 0.9]
    assert tau_videoalign(m, h) == pytest.approx(_videoalign_by_hand(h, m)) == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", range(300))
def test_tau_videoalign_agrees_with_the_procedure_re_derived(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    h = rng.integers(-1, 2, n).tolist()
    m = (rng.integers(-3, 4, n) / 2).tolist()  # small integer grid: equal gaps and zero gaps are common
    assert tau_videoalign(m, h) == pytest.approx(_videoalign_by_hand(h, m))
    assert pairwise_accuracy(m, [0.0] * n, h)["tau_videoalign"] == tau_videoalign(m, h)


# ---- GenAI-Bench's four-way arena accuracy ----------------------------------------------------------------


def _genai_bench_right(model_vote, human_vote):
    """TIGER-AI-Lab/GenAI-Bench inference.py parse_response, for the four verdicts a scoring model gives."""
    return {"leftvote": ("A>B",), "rightvote": ("B>A",), "tievote": ("A=B=Good",),
            "bothbad_vote": ("A=B=Bad",)}[human_vote].count(model_vote) == 1


def test_arena_accuracy_counts_as_genai_bench_does():
    a, b = [0.9, 0.2, 0.6, 0.1, 0.8], [0.1, 0.8, 0.6, 0.1, 0.7]
    votes = ["leftvote", "rightvote", "tievote", "bothbad_vote", "tievote"]
    fixed = arena_accuracy(a, b, votes, epsilon=0.0, bad_threshold=0.5)
    model = ["A>B", "B>A", "A=B=Good", "A=B=Bad", "A>B"]  # by hand: gap > 0, < 0, 0 (mean 0.6), 0 (mean 0.1), 0.1
    assert fixed["accuracy"] == sum(map(_genai_bench_right, model, votes)) / 5 == 0.8
    assert fixed["per_vote"] == {"leftvote": 1.0, "rightvote": 1.0, "tievote": 0.5, "bothbad_vote": 1.0}
    assert fixed["majority_baseline"] == 0.4  # "tievote" every time
    calibrated = arena_accuracy(a, b, votes)  # epsilon 0.1 makes the last pair a tie as well
    assert calibrated["accuracy"] == 1.0 and calibrated["epsilon"] == pytest.approx(0.1)


@pytest.mark.parametrize("seed", range(100))
def test_arena_calibration_is_the_exact_optimum(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 10))
    a, b = rng.integers(0, 4, n) / 4, rng.integers(0, 4, n) / 4
    votes = rng.choice(ARENA_VOTES, n).tolist()
    best = arena_accuracy(a, b, votes)
    gaps, means = np.abs(a - b), (a + b) / 2
    brute = max(arena_accuracy(a, b, votes, epsilon=e, bad_threshold=t)["accuracy"]
                for e in np.unique(np.append(gaps, 0.0)) for t in [*np.unique(means), np.inf])
    assert best["accuracy"] == pytest.approx(brute)
    again = arena_accuracy(a, b, votes, epsilon=best["epsilon"], bad_threshold=best["bad_threshold"])
    assert again["accuracy"] == pytest.approx(best["accuracy"])


def test_arena_accuracy_refuses_other_votes():
    with pytest.raises(ValueError, match="votes must be one of leftvote, rightvote, tievote, bothbad_vote; got 'upvote'"):
        arena_accuracy([1.0], [0.0], ["upvote"])
