"""The evaluator's training rewards: the completion contract, hand values, and TRL's call shape."""

import inspect
import pickle

import pytest

from finger_reward.rewards import (
    accuracy_reward,
    format_reward,
    length_reward,
    multi_dimension_reward,
    parse_completion,
    preference_reward,
    rating_reward,
    temporal_reward,
)

GOOD = "<reason>The hand has five fingers throughout the clip.</reason><answer>Yes</answer>"

# (completion, ground truth, accuracy, format)
CASES = {
    "exact": (GOOD, "Yes", 1.0, 1.0),
    "wrong answer": (GOOD, "No", 0.0, 1.0),
    "whitespace around and between": ("\n <reason> fine </reason>\n\n<answer> No </answer>\n", "No", 1.0, 1.0),
    "lowercase yes": ("<reason>The hand looks right.</reason><answer>yes</answer>", "YES", 1.0, 1.0),
    "answer outside the tag": ("<reason>The hand looks right.</reason> Yes", "Yes", 0.0, 0.0),
    "bare answer": ("Yes", "Yes", 0.0, 0.0),
    "two answers": ("<reason>ok</reason><answer>Yes</answer><answer>No</answer>", "Yes", 0.0, 0.0),
    "two words in one tag": ("<reason>ok</reason><answer>Yes No</answer>", "Yes", 0.0, 0.0),
    "missing reason tags": ("The hand looks right.<answer>Yes</answer>", "Yes", 1.0, 0.0),
    "missing answer close": ("<reason>ok</reason><answer>Yes", "Yes", 0.0, 0.0),
    "empty reason": ("<reason> </reason><answer>Yes</answer>", "Yes", 1.0, 0.0),
    "Yes in the reason": ("<reason>Yes, the hand is fine.</reason><answer>Yes</answer>", "Yes", 1.0, 0.0),
    "no in the reason": ("<reason>There is no blur.</reason><answer>Yes</answer>", "Yes", 1.0, 0.0),
    "Yes inside another word": ("<reason>Yesterday's scene, nothing odd.</reason><answer>Yes</answer>", "Yes", 1.0, 1.0),
    "extra text after the answer": (GOOD + " Hope this helps.", "Yes", 1.0, 0.0),
    "extra text before the reason": ("Sure! " + GOOD, "Yes", 1.0, 0.0),
    "answer before reason": ("<answer>Yes</answer><reason>ok</reason>", "Yes", 1.0, 0.0),
    "nested reason": ("<reason>a <reason>b</reason></reason><answer>Yes</answer>", "Yes", 1.0, 0.0),
    "nested answer": ("<reason>ok</reason><answer><answer>Yes</answer></answer>", "Yes", 0.0, 0.0),
    "duplicated reason": ("<reason>a</reason><reason>b</reason><answer>No</answer>", "No", 1.0, 0.0),
    "answer not Yes/No": ("<reason>ok</reason><answer>Maybe</answer>", "Yes", 0.0, 0.0),
    "empty completion": ("", "No", 0.0, 0.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_accuracy_and_format_on_tricky_completions(name):
    completion, truth, accuracy, fmt = CASES[name]
    assert accuracy_reward([completion], answer=[truth]) == [accuracy]
    assert format_reward([completion]) == [fmt]
    assert parse_completion(completion).exact == bool(fmt)


def test_parse_completion_fields():
    parsed = parse_completion("  <reason> it moves </reason> <answer> No </answer> ")
    assert (parsed.reason, parsed.answer, parsed.well_formed, parsed.exact) == ("it moves", "No", True, True)
    broken = parse_completion("<answer>Yes</answer><answer>No</answer>")
    assert (broken.reason, broken.answer, broken.well_formed, broken.exact) == (None, None, False, False)
    assert parse_completion("<reason>x</reason><answer>Good</answer>").well_formed
    assert not parse_completion("<reason>x</reason><answer>Good</answer>").exact


def test_chat_message_completions_join_assistant_contents():
    chat = [{"role": "assistant", "content": "<reason>The ball bounces.</reason>"},
            {"role": "tool", "content": "No"},
            {"role": "assistant", "content": [{"type": "text", "text": "<answer>"}, {"type": "text", "text": "No</answer>"}]}]
    assert accuracy_reward([chat], answer=["No"]) == [1.0]
    assert format_reward([chat, [{"content": GOOD}], []]) == [1.0, 1.0, 0.0]
    assert preference_reward([[{"role": "assistant", "content": "<reason>x</reason><answer>B</answer>"}]], preferred=["B"]) == [1.0]
    with pytest.raises(TypeError, match="string or a list of chat messages"):
        format_reward([42])


def test_bad_ground_truth_raises_instead_of_scoring_zero():
    with pytest.raises(ValueError, match="'answer' must hold one of Yes, No.*'maybe'"):
        accuracy_reward([GOOD], answer=["maybe"])
    with pytest.raises(ValueError, match="2 completions but 1 values in column 'answer'"):
        accuracy_reward([GOOD, GOOD], answer=["Yes"])


@pytest.mark.parametrize(("n", "expected"), [(320, 0.0), (321, 0.1), (400, 0.1), (511, 0.1), (512, 0.0), (0, 0.0), (900, 0.0)])
def test_length_window_edges_from_completion_ids(n, expected):
    assert length_reward(["whatever"], completion_ids=[[7] * n]) == pytest.approx([expected])


def test_length_without_ids_counts_whitespace_words_and_options():
    words = lambda n: " ".join(["w"] * n)  # noqa: E731
    assert length_reward([words(3), words(4), words(5)], low=3, high=5, gamma=0.5) == [0.0, 0.5, 0.0]
    assert length_reward([words(400)]) == [pytest.approx(0.1)]
    assert length_reward([""]) == [0.0]
    tagged = "<reason>a b</reason>\n<answer>Yes</answer>"  # 3 whitespace words: the whole completion counts
    assert length_reward([tagged], low=2, high=4) == [pytest.approx(0.1)]
    with pytest.raises(ValueError, match="low < high"):
        length_reward(["x"], low=5, high=5)


def test_temporal_reward_at_the_mu_boundary():
    # w_seq > mu * w_rand, strictly: 0.4 vs 0.8 * 0.5 = 0.4 is not greater.
    four = [GOOD] * 4
    assert temporal_reward(four, w_seq=[0.4, 0.41, 0.9, 0.0], w_rand=[0.5, 0.5, 0.2, 0.0]) == pytest.approx([0.0, 0.3, 0.3, 0.0])
    assert temporal_reward([GOOD], w_seq=[0.5], w_rand=[0.5], alpha=1.0, mu=1.0) == [0.0]
    assert temporal_reward([GOOD], w_seq=[0.5], w_rand=[0.5], alpha=1.0, mu=0.99) == [1.0]
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        temporal_reward([GOOD], w_seq=[float("nan")], w_rand=[0.1])
    with pytest.raises(ValueError, match="2 completions but 1 values in column 'w_rand'"):
        temporal_reward([GOOD] * 2, w_seq=[0.1, 0.2], w_rand=[0.1])
    with pytest.raises(KeyError, match="needs the dataset column 'w_rand'"):
        temporal_reward([GOOD], w_seq=[0.1])


def _scores(text: str) -> str:
    return f"<reason>Sharp, smooth motion.</reason><answer>{text}</answer>"


def test_multi_dimension_reward_hand_values():
    truth = {"spatial": 0.8, "temporal": 0.5, "alignment": 1.0}
    completions = [
        _scores("spatial: 0.8\ntemporal: 0.5\nalignment: 1.0"),  # exact -> 1
        _scores("spatial: 0.6, temporal: 0.8; alignment: 0.7"),  # |.2|+|.3|+|.3| = .8
        _scores("alignment: 0\ntemporal: 0.5\nspatial: 0.8\nextra: 1"),  # order free, extras ignored: l1 = 1
        _scores("spatial: 0.8\ntemporal: 0.5"),  # a dimension missing -> the lowest reward
        _scores("spatial: 1.8\ntemporal: 0.5\nalignment: 1"),  # out of range -> lowest
        _scores("spatial: high\ntemporal: 0.5\nalignment: 1"),  # malformed item -> lowest
        _scores("spatial: 0.8\nspatial: 0.1\ntemporal: 0.5\nalignment: 1"),  # repeated -> lowest
        "spatial: 0.8\ntemporal: 0.5\nalignment: 1.0",  # outside the answer tag -> lowest
    ]
    l1 = [0.0, 0.8, 1.0] + [3.0] * 5  # a malformed answer counts as distance 1 in every dimension
    truths = [truth] * len(completions)
    # VQ-Insight sets lambda_j = 1 (Implementation Details): 1 - sum of distances, in [1 - M, 1].
    assert multi_dimension_reward(completions, dimension_scores=truths) == pytest.approx([1 - d for d in l1])
    assert multi_dimension_reward(completions, dimension_scores=truths, dimension_weight=0.5) == \
        pytest.approx([1 - d / 2 for d in l1])
    # The other reading, lambda_j = 1/M: 1 - mean distance, in [0, 1].
    assert multi_dimension_reward(completions, dimension_scores=truths, dimension_weight="mean") == \
        pytest.approx([1 - d / 3 for d in l1])
    with pytest.raises(ValueError, match="score in \\[0, 1\\]"):
        multi_dimension_reward([completions[0]], dimension_scores=[{"spatial": 4.0}])
    with pytest.raises(ValueError, match="dimension_weight must be a positive number"):
        multi_dimension_reward([completions[0]], dimension_scores=[truth], dimension_weight="sum")


@pytest.mark.parametrize(("answer", "preferred", "expected"), [
    ("A", "A", 1.0), ("Video A", "A", 1.0), ("video b.", "Video B", 1.0), ("B", "video2", 1.0), ("1", "A", 1.0),
    ("B", "A", 0.0), ("Video A is better", "A", 0.0), ("A and B", "A", 0.0), ("", "B", 0.0),
])
def test_preference_reward(answer, preferred, expected):
    assert preference_reward([f"<reason>Smoother motion.</reason><answer>{answer}</answer>"], preferred=[preferred]) == [expected]


def test_preference_reward_answer_outside_tag_and_bad_truth():
    assert preference_reward(["Video A"], preferred=["A"]) == [0.0]
    with pytest.raises(ValueError, match="'preferred' must name video A or B.*'tie'"):
        preference_reward([GOOD], preferred=["tie"])


def test_rating_reward_is_accuracy_plus_half_format():
    completions = [
        "<reason>Crisp detail.</reason><answer>Good</answer>",  # right, well formed -> 1.5
        "<reason>Crisp detail.</reason><answer>excellent</answer>",  # wrong, well formed -> 0.5
        "<answer>Good</answer>",  # right, no reason -> 1.0
        "<reason>Crisp detail.</reason><answer>Great</answer>",  # not a level -> 0
        "Good",  # outside the tag -> 0
    ]
    assert rating_reward(completions, rating=["good"] * 5) == [1.5, 0.5, 1.0, 0.0, 0.0]
    assert rating_reward(completions[:2], rating=["Good"] * 2, format_weight=0.0) == [1.0, 0.0]
    with pytest.raises(ValueError, match="Bad, Poor, Fair, Good, Excellent"):
        rating_reward(completions[:1], rating=["4"])


@pytest.mark.parametrize(("fn", "column"), [
    (accuracy_reward, "answer"), (multi_dimension_reward, "dimension_scores"),
    (preference_reward, "preferred"), (rating_reward, "rating"),
])
def test_missing_column_raises_key_error_naming_it(fn, column):
    with pytest.raises(KeyError, match=f"needs the dataset column '{column}'"):
        fn(prompts=["p"], completions=[GOOD], completion_ids=[[1]], other_column=[1])


TRL_REWARDS = {
    "accuracy_reward": (accuracy_reward, {"answer": ["Yes", "No"]}, [1.0, 1.0]),
    "format_reward": (format_reward, {}, [1.0, 1.0]),
    "length_reward": (length_reward, {}, [0.1, 0.0]),
    "multi_dimension_reward": (multi_dimension_reward, {"dimension_scores": [{"x": 1.0}, {"x": 0.0}]}, [0.0, 0.0]),
    "preference_reward": (preference_reward, {"preferred": ["A", "B"]}, [0.0, 0.0]),
    "rating_reward": (rating_reward, {"rating": ["Good", "Bad"]}, [0.0, 0.0]),
    "temporal_reward": (temporal_reward, {"w_seq": [0.9, 0.1], "w_rand": [0.5, 0.5]}, [0.3, 0.0]),
}


@pytest.mark.parametrize("name", list(TRL_REWARDS))
def test_called_exactly_as_trl_calls_it(name):
    from trl import GRPOTrainer
    from trl.trainer.utils import get_callable_name

    source = inspect.getsource(GRPOTrainer._calculate_rewards)
    assert "prompts=prompts, completions=completions, completion_ids=completion_ids_list, **reward_kwargs" in source
    fn, columns, expected = TRL_REWARDS[name]
    extra, metrics = {}, {}
    completions = [[{"role": "assistant", "content": GOOD}],
                   [{"role": "assistant", "content": "<reason>Frozen.</reason><answer>No</answer>"}]]
    out = fn(prompts=[[{"role": "user", "content": "q"}]] * 2, completions=completions, completion_ids=[[1] * 400, [1] * 12],
             **columns, unrelated_column=["a", "b"], trainer_state=None,
             log_extra=lambda column, values: extra.setdefault(column, values),
             log_metric=lambda key, value: metrics.setdefault(key, value))
    assert out == pytest.approx(expected) and all(type(r) is float for r in out)
    assert get_callable_name(fn) == name and pickle.loads(pickle.dumps(fn)) is fn
    if name == "accuracy_reward":
        assert extra == {"parsed_answer": ["Yes", "No"]}


@pytest.fixture(scope="module")
def tiny_policy_dir(tmp_path_factory):
    from finger_reward.tiny import make_tiny_chat_model

    return make_tiny_chat_model(tmp_path_factory.mktemp("policy"))


@pytest.mark.slow
def test_real_grpo_trainer_logs_accuracy_and_format(tiny_policy_dir, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": f"Is the ball red? clip {i}"}] for i in range(4)],
        "answer": ["Yes", "No"] * 2,
    })
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                      max_steps=1, logging_steps=1, report_to="none", beta=0.0, learning_rate=1e-4, use_cpu=True,
                      save_strategy="no", bf16=False)
    trainer = GRPOTrainer(model=str(tiny_policy_dir), reward_funcs=[accuracy_reward, format_reward, length_reward],
                          args=args, train_dataset=dataset)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "rewards/accuracy_reward/mean" in h]
    assert len(logged) == 1
    # A random 8-token policy can neither close the tags nor reach 320 tokens.
    assert logged[0]["rewards/format_reward/mean"] == 0.0 and logged[0]["rewards/length_reward/mean"] == 0.0
    assert 0.0 <= logged[0]["rewards/accuracy_reward/mean"] <= 1.0
