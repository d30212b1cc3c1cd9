"""Eq. 1-4 against hand-computed values, and the Yes/No token sets of the offline tokenizer."""

import math

import pytest
import torch

from finger_reward import scoring
from finger_reward.questions import DIMENSIONS
from finger_reward.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_token_sets_hold_every_single_token_spelling(tokenizer):
    yes_ids, no_ids = scoring.answer_token_ids(tokenizer)
    decoded_yes = sorted(tokenizer.decode([i]) for i in yes_ids)
    decoded_no = sorted(tokenizer.decode([i]) for i in no_ids)
    assert decoded_yes == sorted(["Yes", "yes", "YES", " Yes", " yes", " YES"])
    assert decoded_no == sorted(["No", "no", "NO", " No", " no", " NO"])
    assert not set(yes_ids) & set(no_ids)


def test_token_sets_skip_multi_token_spellings(tokenizer):
    ids = scoring.single_token_ids(tokenizer, ["Yes", "Yesterdayish"])
    assert [tokenizer.decode([i]) for i in ids] == ["Yes", " Yes"]


def test_token_sets_need_both_answers(tokenizer):
    class NoYes:
        def encode(self, text, add_special_tokens=False):
            return [1, 2] if "es" in text or "ES" in text else [3]

    with pytest.raises(ValueError, match="single-token spelling"):
        scoring.answer_token_ids(NoYes())


def test_eq1_restricted_softmax_by_hand():
    logits = torch.full((1, 10), -50.0)
    logits[0, [1, 2]] = torch.tensor([2.0, 0.0])  # T_Y
    logits[0, [5]] = torch.tensor([1.0])  # T_N
    logits[0, 7] = 30.0  # a token outside T_Y u T_N must not matter
    probs = scoring.answer_probs(logits, [1, 2], [5])
    z = math.exp(2) + math.exp(0) + math.exp(1)
    assert probs[0, 0].item() == pytest.approx((math.exp(2) + 1) / z, abs=1e-6)
    assert probs[0, 1].item() == pytest.approx(math.exp(1) / z, abs=1e-6)


def test_eq1_probabilities_sum_to_one():
    logits = torch.randn(7, 3, 50, generator=torch.Generator().manual_seed(0)) * 5
    probs = scoring.answer_probs(logits, [3, 4, 9], [11, 20])
    assert probs.shape == (7, 3, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(7, 3))


def test_eq2_polarity():
    probs = torch.tensor([[0.8, 0.2], [0.8, 0.2], [0.3, 0.7]])
    scores = scoring.entity_scores(probs, [True, False, False])
    torch.testing.assert_close(scores, torch.tensor([0.8, 0.2, 0.7]))
    flipped = scoring.entity_scores(probs, [False, True, True])
    torch.testing.assert_close(flipped, 1 - scores)


def test_eq3_mean_and_sum():
    scores = [0.2, 0.4, 0.9, 1.0]
    dims = ["visual_quality", "visual_quality", "text_alignment", "visual_quality"]
    assert scoring.dimension_scores(scores, dims, "sum") == pytest.approx({"visual_quality": 1.6, "text_alignment": 0.9})
    assert scoring.dimension_scores(scores, dims) == pytest.approx({"visual_quality": 1.6 / 3, "text_alignment": 0.9})
    with pytest.raises(ValueError, match="aggregate"):
        scoring.dimension_scores(scores, dims, "max")
    with pytest.raises(ValueError, match="4 entity scores but 3"):
        scoring.dimension_scores(scores, dims[:3])


def test_eq4_weights_normalised_and_checked():
    assert scoring.normalize_weights(None) == pytest.approx({d: 0.2 for d in DIMENSIONS})
    weights = scoring.normalize_weights({"visual_quality": 3, "text_alignment": 1})
    assert weights["visual_quality"] == pytest.approx(0.75) and weights["dynamic_degree"] == 0
    with pytest.raises(ValueError, match="non-negative"):
        scoring.normalize_weights({"visual_quality": -1, "text_alignment": 2})
    with pytest.raises(ValueError, match="unknown dimension.*colour"):
        scoring.normalize_weights({"colour": 1})
    with pytest.raises(ValueError, match="all be zero"):
        scoring.normalize_weights({"visual_quality": 0})


def test_eq4_overall_by_hand():
    dims = {d: s for d, s in zip(DIMENSIONS, [0.1, 0.2, 0.3, 0.4, 0.5])}
    assert scoring.overall_score(dims) == pytest.approx(0.3)
    w = {"visual_quality": 1, "temporal_consistency": 1, "dynamic_degree": 2, "text_alignment": 0, "factual_consistency": 0}
    assert scoring.overall_score(dims, w) == pytest.approx((0.1 + 0.2 + 2 * 0.3) / 4)
    # A dimension without questions is left out, the remaining weights renormalised.
    assert scoring.overall_score({"visual_quality": 0.4, "text_alignment": 1.0}) == pytest.approx(0.7)
    assert math.isnan(scoring.overall_score({"dynamic_degree": 0.5}, {"visual_quality": 1}))


def test_hard_answers_without_prob():
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.5, 0.5]])
    torch.testing.assert_close(scoring.hard_answers(probs), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    hard = scoring.entity_scores(scoring.hard_answers(probs), [True, True, False])
    torch.testing.assert_close(hard, torch.tensor([1.0, 0.0, 0.0]))


def test_rating_expectation():
    logits = torch.full((2, 8), -1e4)
    levels = [1, 2, 3, 4, 5]
    logits[0, 5] = 0.0  # all mass on Excellent
    logits[1, [1, 3]] = 0.0  # half Bad, half Fair
    torch.testing.assert_close(scoring.rating_expectation(logits, levels), torch.tensor([1.0, 0.25]))
    with pytest.raises(ValueError, match="5 level token ids"):
        scoring.rating_expectation(logits, levels[:4])
