"""Answer accuracy on held-out FingER-Instruct (evaluation/heldout.py), on the tiny Qwen2.5-VL and the synthetic world."""

from __future__ import annotations

import json

import pytest

from finger_reward import FingerReward
from finger_reward.evaluation.evaluate import format_table
from finger_reward.evaluation.heldout import eval_metrics, evaluate_instruct, prob_accuracy, write_eval
from finger_reward.questions import DIMENSIONS, QuestionBank
from finger_reward.questions.record import Question
from finger_reward.synthetic import make_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("heldout_world"), num_scenes=1)


@pytest.fixture(scope="module")
def heldout(world, tmp_path_factory):
    """Every fourth line of the world: questions of all five dimensions about every clip."""
    path = tmp_path_factory.mktemp("heldout") / "heldout.jsonl"
    path.write_text("\n".join(world.instruct_path.read_text().splitlines()[::4]) + "\n")
    return path


def _direct(reward: FingerReward, path) -> dict:
    """Accuracy straight from FingerReward.score, one video at a time: dimension -> (acc w/o prob, acc w/ prob, n)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    results = {}
    for row in rows:
        if (row["video"], row["prompt"]) not in results:
            (results[row["video"], row["prompt"]],) = reward.score([row["video"]], [row["prompt"]])
    right = {}
    for row in rows:
        result = results[row["video"], row["prompt"]]
        (answered,) = [q for q in result.questions if q.question == row["question"]]
        p_right = answered.p_yes if row["answer"] == "Yes" else answered.p_no
        for dim in (row["dimension"], "overall"):
            right.setdefault(dim, []).append((answered.answer == row["answer"], p_right > 0.5))
    return {dim: (sum(h for h, _ in v) / len(v), sum(s for _, s in v) / len(v), len(v)) for dim, v in right.items()}


@pytest.mark.parametrize("mode", ["answer", "reason"])
def test_accuracy_equals_a_direct_computation_from_finger_reward(tiny_model_and_processor, heldout, tmp_path, mode):
    model, processor = tiny_model_and_processor
    if mode == "reason":  # a greedy reason per question: fewer questions (one per clip, all five dimensions)
        lines = [json.loads(line) for line in heldout.read_text().splitlines()]
        heldout = tmp_path / "heldout.jsonl"
        heldout.write_text("".join(json.dumps(next(r for r in lines if r["dimension"] == d)) + "\n" for d in DIMENSIONS))
    result = evaluate_instruct(model, heldout, processor=processor, mode=mode, max_new_tokens=6, max_frames=4,
                               chunk=2, progress=False)
    bank = QuestionBank(Question.from_dict(json.loads(line)) for line in heldout.read_text().splitlines())
    reward = FingerReward.from_pretrained(model, processor=processor, questions=bank, mode=mode, max_new_tokens=6,
                                          max_frames=4)
    expected = _direct(reward, heldout)
    assert result["mode"] == mode and result["failed_videos"] == []
    assert set(result["dimensions"]) == {*DIMENSIONS, "overall"}
    for dim, row in result["dimensions"].items():
        assert (row["acc"], row["acc_prob"], row["questions"]) == pytest.approx(expected[dim]), dim
        assert 0 <= row["acc"] <= 1 and 0 <= row["acc_prob"] <= 1
    assert result["dimensions"]["overall"]["questions"] == (15 if mode == "answer" else 5)
    # A FingerReward gives the same figures through its own engine.
    assert evaluate_instruct(reward, heldout, progress=False)["dimensions"] == result["dimensions"]


def test_flipped_truths_flip_the_accuracy(tiny_model_dir, heldout, tmp_path):
    """With every human answer flipped, each question that was right is wrong: acc becomes 1 - acc."""
    flipped = tmp_path / "flipped.jsonl"
    lines = [json.loads(line) for line in heldout.read_text().splitlines()]
    flipped.write_text("".join(json.dumps({**r, "answer": {"Yes": "No", "No": "Yes"}[r["answer"]]}) + "\n" for r in lines))
    original = evaluate_instruct(tiny_model_dir, heldout, max_frames=4, progress=False)["dimensions"]
    other = evaluate_instruct(str(tiny_model_dir), flipped, max_frames=4, progress=False)["dimensions"]
    for dim, row in original.items():
        assert other[dim]["acc"] == pytest.approx(1 - row["acc"]) and other[dim]["acc_prob"] == pytest.approx(1 - row["acc_prob"])
        # "fine" and "broken" trade places, and the always-"fine" baseline becomes its complement.
        assert other[dim]["always_fine_acc"] == pytest.approx(1 - row["always_fine_acc"])
        if row["acc_fine"] is not None:
            assert other[dim]["acc_broken"] == pytest.approx(1 - row["acc_fine"])


def test_training_model_is_put_back_and_results_are_written(tiny_model_dir, heldout, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).train()
    result = evaluate_instruct(model, heldout, processor=AutoProcessor.from_pretrained(tiny_model_dir), max_frames=4,
                               progress=False)
    assert model.training
    path = write_eval(result, tmp_path / "out" / "eval.json")
    assert json.loads(path.read_text()) == result
    flat = eval_metrics(result)
    assert flat["eval_acc/overall"] == result["dimensions"]["overall"]["acc"]
    assert set(flat) == {f"eval_{k}/{d}" for d in result["dimensions"] for k in ("acc", "acc_prob")}
    table = format_table(result)
    assert "held-out" in table and "overall" in table


def test_failed_videos_are_listed_and_left_out(tiny_model_dir, heldout, tmp_path):
    lines = [json.loads(line) for line in heldout.read_text().splitlines()]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    path = tmp_path / "with_broken.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines + [{**lines[0], "video": str(broken)}]))
    result = evaluate_instruct(tiny_model_dir, path, max_frames=4, progress=False)
    assert result["failed_videos"] == [str(broken)]
    assert result["dimensions"]["overall"]["questions"] == len(lines)


def test_errors_name_the_problem(tiny_model_and_processor, heldout, tmp_path):
    model, processor = tiny_model_and_processor
    with pytest.raises(ValueError, match="without processor="):
        evaluate_instruct(model, heldout)
    reward = FingerReward.from_pretrained(model, processor=processor, mode="answer")
    with pytest.raises(ValueError, match="runs in 'answer' mode"):
        evaluate_instruct(reward, heldout, mode="reason")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**json.loads(heldout.read_text().splitlines()[0]), "answer": "maybe"}) + "\n")
    with pytest.raises(Exception, match=r"bad.jsonl, line 1.*'Yes' or 'No'"):
        evaluate_instruct(model, bad, processor=processor)
    assert prob_accuracy([0.9, 0.5, 0.51, 0.1]) == 0.5  # strictly above one half
    with pytest.raises(ValueError, match="at least one"):
        prob_accuracy([])
