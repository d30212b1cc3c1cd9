"""Answer accuracy on held-out FingER-Instruct questions, the way FingER Tables 1-2 report Acc.

    result = evaluate_instruct("out/sft_answer", "val.jsonl", mode="answer")
    result["dimensions"]["overall"]   # {"acc": ..., "acc_prob": ..., "questions": ...}

Every question is answered through `FingerReward.score` (the engine and scoring code the reward
uses), then compared with the human answer in two ways: "w/ prob" (`acc_prob`), correct when the
probability of the right answer (Eq. 1) is above 0.5, and "w/o prob" (`acc`), correct when the
hard answer (argmax of Eq. 1, after a greedy reason in reason mode) is right. Per dimension and
pooled over all questions ("overall"), as `evaluate.agreement` pools them. Because most questions
about a decent video are answered "fine" (Yes to a positive question, No to a negative one), w/o
prob is also split into `acc_fine` and `acc_broken`, their mean `balanced_acc`, and the trivial
baseline `always_fine_acc` (the accuracy of answering every question "fine"). The trainers call this
after training when given `eval_data`, writing `output_dir/eval.json`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from finger_reward import metrics
from finger_reward.evaluation.evaluate import benchmark_bank, benchmark_videos
from finger_reward.evaluation.loaders import load_finger_test
from finger_reward.evaluation.records import AnsweredQuestion
from finger_reward.questions import DIMENSIONS
from finger_reward.results import VideoScore
from finger_reward.scorefile import Key
from finger_reward.video import SlowFast


def prob_accuracy(p_correct: Sequence[float]) -> float:
    """FingER's "w/ prob" Acc: the fraction of questions whose right answer has probability above 0.5."""
    if not len(p_correct):
        raise ValueError("accuracy needs at least one answered question")
    return sum(float(p) > 0.5 for p in p_correct) / len(p_correct)


def instruct_accuracy(items: Sequence[AnsweredQuestion], scores: dict[Key, VideoScore]) -> dict:
    """Acc w/ and w/o prob per dimension and "overall", from the scored (video, prompt) results.

    A question whose video failed to score, or that its result does not hold, is left out.
    """
    answered = defaultdict(lambda: ([], [], [], []))  # hard answers, truths, P(right answer), classes
    for item in items:
        result = scores.get((item.video, item.question.prompt))
        found = [q for q in (result.questions if result is not None and result.ok else [])
                 if q.question == item.question.question and q.dimension == item.question.dimension]
        if not found:
            continue
        p_right = found[0].p_yes if item.answer == "Yes" else found[0].p_no
        for dim in (item.question.dimension, "overall"):
            answered[dim][0].append(found[0].answer)
            answered[dim][1].append(item.answer)
            answered[dim][2].append(p_right)
            answered[dim][3].append("fine" if (item.answer == "Yes") == item.question.positive else "broken")
    return {dim: _figures(*answered[dim]) for dim in (*DIMENSIONS, "overall") if dim in answered}


def _figures(answers: list[str], truths: list[str], p_right: list[float], classes: list[str]) -> dict:
    by_class = metrics.class_accuracy([a == t for a, t in zip(answers, truths)], classes)
    return {"acc": metrics.answer_accuracy(answers, truths), "acc_prob": prob_accuracy(p_right),
            "questions": len(truths), "acc_fine": by_class["per_class"].get("fine"),
            "acc_broken": by_class["per_class"].get("broken"), "balanced_acc": by_class["balanced"],
            "always_fine_acc": by_class["share"].get("fine", 0.0)}


def evaluate_instruct(
    model_or_reward, heldout_jsonl: str | Path, *, mode: str | None = None, processor=None,
    video_root: str | Path | None = None, max_new_tokens: int = 256, fps: float = 2.0, max_frames: int = 48,
    max_pixels: int = 448 * 448, slowfast: SlowFast | None = None, chunk: int = 8, progress: bool = True,
) -> dict:
    """Score every held-out question and return its accuracy figures (see the module docstring).

    `model_or_reward`: a `FingerReward` (its engine, mode and video options are used), a checkpoint
    path, or a loaded model with `processor=` (a PEFT model is evaluated with its adapters).
    `mode` ("answer" or "reason", default "answer") must match a given reward's engine. The video
    options (fps, max_frames, max_pixels, slowfast) are for a model or path.
    The result also has "failed_videos" and the keys `evaluate.format_table` prints.
    """
    from tqdm.auto import tqdm

    bench = load_finger_test(heldout_jsonl, video_root)
    # The engine switches a loaded model to eval mode; a model that was training goes back to it.
    was_training = isinstance(model_or_reward, torch.nn.Module) and model_or_reward.training
    reward = _heldout_reward(model_or_reward, benchmark_bank(bench), mode=mode, processor=processor,
                             max_new_tokens=max_new_tokens, fps=fps, max_frames=max_frames, max_pixels=max_pixels,
                             slowfast=slowfast)
    keys = benchmark_videos(bench)
    scores: dict[Key, VideoScore] = {}
    try:
        with tqdm(total=len(keys), desc=f"evaluating {Path(heldout_jsonl).name}", unit="video",
                  disable=not progress) as bar:
            for start in range(0, len(keys), chunk):
                batch = keys[start: start + chunk]
                for key, result in zip(batch, reward.score([v for v, _ in batch], [p for _, p in batch])):
                    scores[key] = result
                bar.update(len(batch))
    finally:
        if was_training:
            model_or_reward.train()
    failed = sorted({video for (video, _), result in scores.items() if not result.ok})
    mode = reward.engine.mode
    return {
        "benchmark": "held-out", "kind": "questions", "data": str(heldout_jsonl), "mode": mode,
        "note": f"{heldout_jsonl}: {len(bench)} held-out FingER-Instruct questions, {mode} mode; "
                "acc = w/o prob (hard answer), acc_prob = w/ prob (P(right answer) > 0.5)",
        "failed_videos": failed,
        "dimensions": instruct_accuracy(bench.items, scores),
    }


def _heldout_reward(model_or_reward, bank, *, mode, processor, max_new_tokens, fps, max_frames, max_pixels, slowfast):
    """A FingerReward whose question bank is exactly the held-out questions; failures score NaN."""
    from finger_reward.reward import FingerReward

    engine = getattr(model_or_reward, "engine", None)
    if engine is not None:  # a FingerReward: same engine and options, held-out questions
        if mode is not None and mode != engine.mode:
            raise ValueError(f"mode={mode!r} but the reward's engine runs in {engine.mode!r} mode; "
                             "pass mode=None or a reward built with that mode")
        return FingerReward(engine, questions=bank, aggregate=model_or_reward.aggregate,
                            weights=model_or_reward.weights, on_error="nan", **model_or_reward.video_options)
    options = dict(questions=bank, mode=mode or "answer", max_new_tokens=max_new_tokens, on_error="nan",
                   fps=fps, max_frames=max_frames, max_pixels=max_pixels, slowfast=slowfast)
    if isinstance(model_or_reward, (str, Path)):
        return FingerReward.from_pretrained(model_or_reward, processor=processor, **options)
    if processor is None:
        raise ValueError("evaluate_instruct got a loaded model without processor=; pass its processor too")
    model = model_or_reward.get_base_model() if hasattr(model_or_reward, "get_base_model") else model_or_reward
    return FingerReward.from_pretrained(model, processor=processor, **options)


def eval_metrics(result: dict) -> dict[str, float]:
    """Flat log entries: `eval_acc/<dimension>` (w/o prob) and `eval_acc_prob/<dimension>` (w/ prob)."""
    return {f"eval_{name}/{dim}": row[name] for dim, row in result["dimensions"].items() for name in ("acc", "acc_prob")}


def write_eval(result: dict, path: str | Path) -> Path:
    """Write the result as indented JSON (the trainers' `output_dir/eval.json`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path
