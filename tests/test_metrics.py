"""FingER's evaluation metrics against scipy, hand-computed values and a brute-force reference."""

import math
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats

from finger_reward.metrics import answer_accuracy, class_accuracy, pairwise_accuracy, plcc, srcc


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
    out = pairwise_accuracy(a, b, labels)
    assert out == {"tau": 0.8, "diff": 2 / 3, "epsilon": pytest.approx(0.02), "pairs": 5, "ties": 2}
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
