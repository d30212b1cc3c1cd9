"""VQ-Insight's temporal modelling reward and Q-Save's rating reward, trained by the evaluator's GRPO on a tiny Qwen2.5-VL.

The frame shuffle and the answer stem are pure functions; the recipes in configs/ run real GRPO steps,
and the logged rewards are recomputed here from the rollout (w_seq / w_rand by an independent
full forward per completion) and from `finger_reward.rewards`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from trl import TrlParser

from finger_reward.engine.inputs import processor_inputs
from finger_reward.instruct import InstructError, InstructRecord, load_instruct, rating_level, rating_question
from finger_reward.rewards import accuracy_reward, format_reward, rating_reward
from finger_reward.rope import with_rope_positions
from finger_reward.scoring import RATING_LEVELS, answer_probs, answer_token_ids
from finger_reward.synthetic import make_world
from finger_reward.temporal import answer_stem, frame_permutation, shuffle_clip
from finger_reward.trainers.grpo import REWARD_FUNCS, GRPORecipe, VideoGRPOTrainer
from finger_reward.video import Clip

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["--num_generations", "3", "--max_completion_length", "10", "--max_steps", "1", "--max_frames", "4",
        "--learning_rate", "1e-3", "--logging_steps", "1", "--save_steps", "100", "--forward_batch_size", "2",
        "--bf16", "false", "--gradient_checkpointing", "false", "--seed", "0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("peer_world"), num_scenes=1)


@pytest.fixture(scope="module")
def records(world):
    return load_instruct(world.instruct_path, mode="reason")


def _recipe(config: str, model_dir, data, out, *extra) -> GRPORecipe:
    (recipe,) = TrlParser([GRPORecipe]).parse_args_and_config(
        ["--config", str(CONFIGS / config), "--model", str(model_dir), "--data", str(data), "--output_dir", str(out), *TINY, *extra])
    return recipe


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ---- the frame shuffle and the answer stem (pure) ---------------------------------------------------


def test_frame_permutation_is_seeded_and_never_the_identity():
    for n in range(2, 7):
        orders = [frame_permutation(n, seed) for seed in range(40)]
        assert all(sorted(o) == list(range(n)) and o != list(range(n)) for o in orders)
        assert orders == [frame_permutation(n, seed) for seed in range(40)]  # reproducible
        assert len({tuple(o) for o in orders}) > (n > 2)  # the seed matters (2 frames have one other order)
    assert frame_permutation(8, "0:3:a.mp4") == frame_permutation(8, "0:3:a.mp4") != frame_permutation(8, "0:4:a.mp4")
    with pytest.raises(ValueError, match="at least 2 frames"):
        frame_permutation(1, 0)


def test_shuffle_clip_reorders_frames_before_the_processor():
    frames = torch.arange(6, dtype=torch.uint8)[:, None, None, None].expand(6, 3, 4, 4).clone()
    clip = Clip(frames=frames, fps=2.0, name="c.mp4")
    shuffled = shuffle_clip(clip, 7)
    order = frame_permutation(6, 7)
    assert shuffled.frames[:, 0, 0, 0].tolist() == order and shuffled.fps == 2.0 and shuffled.frames.shape == frames.shape
    assert torch.equal(clip.frames, frames)  # the ordered clip is left as it was
    with pytest.raises(ValueError, match="SlowFast"):
        shuffle_clip(dataclasses.replace(clip, pathways=(object(),)), 7)


@pytest.mark.parametrize(("completion", "stem"), [
    ("<reason>It flickers.</reason><answer>No</answer>", "<reason>It flickers.</reason><answer>"),
    ("<reason>It flickers.</reason>", "<reason>It flickers.</reason><answer>"),
    ("It flickers.", "<reason>It flickers.</reason><answer>"),
    ("", "<reason></reason><answer>"),
])
def test_answer_stem_closes_the_reason_as_the_engine_does(completion, stem):
    assert answer_stem(completion) == stem


# ---- recipes ----------------------------------------------------------------------------------------


def test_recipes_name_reward_functions(tmp_path):
    default = GRPORecipe(model="m", data="d")
    assert default.reward_funcs == ["accuracy_reward", "format_reward"] and not default.temporal_shuffle  # FingER Eq. 9
    temporal = _recipe("grpo_vqinsight_temporal.yaml", "m", "d", tmp_path)
    assert temporal.reward_funcs == ["accuracy_reward", "format_reward", "temporal_reward"] and temporal.temporal_shuffle
    rating = _recipe("grpo_qsave_rating.yaml", "m", "d", tmp_path)
    assert rating.reward_funcs == ["rating_reward"] and rating.slowfast == 0.9
    assert all(REWARD_FUNCS[name].__name__ == name for name in REWARD_FUNCS)
    for bad, message in (({"reward_funcs": ["accuracy"]}, "one of accuracy_reward, format_reward"),
                         ({"reward_funcs": ["temporal_reward"]}, "temporal_shuffle: true"),
                         ({"temporal_shuffle": True}, "temporal_shuffle: true"),
                         ({"reward_funcs": ["temporal_reward"], "temporal_shuffle": True, "slowfast": 0.9}, "slowfast: null"),
                         ({"reward_weights": [1.0]}, "2 reward_funcs but 1 reward_weights")):
        with pytest.raises(ValueError, match=message):
            GRPORecipe(model="m", data="d", **bad)


# ---- VQ-Insight temporal modelling in a GRPO step ----------------------------------------------------


def _w(model, processor, record, clip, completion) -> float:
    """P(correct answer) after the completion's reason: one full forward of prompt + stem, no padding."""
    from finger_reward.instruct import VideoSFTCollator

    prompt = VideoSFTCollator(processor, "reason").prompt_text(record) + answer_stem(completion)
    inputs = processor_inputs(processor, prompt, clip)
    with torch.no_grad():
        logits = model(**with_rope_positions(model.config, inputs), use_cache=False).logits[0, -1]
    yes, no = answer_token_ids(processor.tokenizer)
    return float(answer_probs(logits, yes, no)[0 if record.answer == "Yes" else 1])


def test_temporal_recipe_trains_with_w_seq_and_w_rand_from_the_rollout(tiny_model_dir, world, records, tmp_path):
    recipe = _recipe("grpo_vqinsight_temporal.yaml", tiny_model_dir, world.instruct_path, tmp_path / "out")
    trainer = VideoGRPOTrainer(recipe, records=records)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    rows = trainer.completions
    assert len(rows) == 3  # G ordered completions only: the shuffled answers are not trained on
    # The step trains on the ordered group: it moves the weights exactly when the group's rewards differ.
    moved = any(not torch.equal(start[n], p) for n, p in trainer.model.named_parameters())
    assert moved == (len({r["reward"] for r in rows}) > 1)
    record = next(r for r in records if r.question == rows[0]["question"] and r.video == rows[0]["video"])
    clip = trainer.collator.load_clip(record)
    shuffled = shuffle_clip(clip, rows[0]["shuffle_seed"])
    assert not torch.equal(shuffled.frames, clip.frames)
    model = trainer.model.eval()  # weights after the step: recompute with the same weights the rollout had
    for name, p in model.named_parameters():
        p.data.copy_(start[name])
    for row in rows:
        # w_seq: ordered clip after the i-th response; w_rand: shuffled clip after the i-th shuffled response.
        assert row["w_seq"] == pytest.approx(_w(model, trainer.processor, record, clip, row["completion"]), abs=1e-5)
        assert row["w_rand"] == pytest.approx(_w(model, trainer.processor, record, shuffled, row["shuffled_completion"]), abs=1e-5)
        expected = 0.3 if row["w_seq"] > 0.8 * row["w_rand"] else 0.0  # VQ-Insight Eq. 4, alpha 0.3, mu 0.8
        assert row["temporal_reward"] == pytest.approx(expected)
        accuracy = accuracy_reward([row["completion"]], answer=[record.answer])[0]
        fmt = format_reward([row["completion"]])[0]
        assert row["reward"] == pytest.approx(accuracy + fmt + expected)
    (logged,) = _log(Path(recipe.output_dir))
    assert logged["rewards/temporal_reward/mean"] == pytest.approx(sum(r["temporal_reward"] for r in rows) / 3)
    assert logged["temporal/w_seq_mean"] == pytest.approx(sum(r["w_seq"] for r in rows) / 3)
    assert logged["temporal/w_rand_mean"] == pytest.approx(sum(r["w_rand"] for r in rows) / 3)


# ---- Q-Save rating in a GRPO step --------------------------------------------------------------------


@pytest.fixture(scope="module")
def rating_path(records, tmp_path_factory):
    """Rating lines about the world's clips: Q-Save's prompt, a level in `rating` (or a `mos`), a reason."""
    lines = []
    for record, (key, value) in zip(list({r.video: r for r in records}.values()),
                                    [("rating", "good"), ("mos", 1.4), ("rating", "Excellent"), ("mos", 3.1)]):
        row = {k: v for k, v in record.to_dict().items() if k not in ("source", "answer", "mos", "rating")}
        row.update(dimension="visual_quality", question=rating_question("visual_quality"),
                   reason="The shape stays sharp and the colours stay clean.", **{key: value})
        if key == "mos":
            row["answer"] = rating_level(value)
        lines.append(row)
    path = tmp_path_factory.mktemp("rating") / "rating.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_rating_question_is_qsave_five_level_prompt():
    text = rating_question("temporal_consistency")
    assert "Judge its temporal consistency based on following three criteria: 1) identity, colour" in text
    assert "[Bad, Poor, Fair, Good, Excellent]" in text and "How would you rate the temporal consistency" in text
    assert text.endswith("<reason>Your analysis here</reason><answer>Rating</answer>")
    with pytest.raises(ValueError, match="unknown dimension 'sharpness'"):
        rating_question("sharpness")


def test_rating_column_loads_and_bad_ratings_name_file_line_field(rating_path, tmp_path):
    loaded = load_instruct(rating_path, mode="reason")
    assert [r.rating for r in loaded] == ["Good", "Bad", "Excellent", "Fair"]
    assert [r.answer for r in loaded] == [r.rating for r in loaded]  # the answer defaults to the rating
    assert [r.mos for r in loaded] == [None, 1.4, None, 3.1]
    good = json.loads(rating_path.read_text().splitlines()[0])
    for bad, message in (({"rating": "Great"}, "field 'rating' must be one of Bad, Poor, Fair, Good, Excellent"),
                         ({"rating": 4}, "field 'rating' must be one of"),
                         ({"rating": "Good", "answer": "Poor"}, "field 'answer' \\('Poor'\\) must equal field 'rating'")):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps({**good, **bad}) + "\n")
        with pytest.raises(InstructError, match=f"{path}, line 2: {message}"):
            load_instruct(path)
    plain = InstructRecord.from_dict({k: v for k, v in good.items() if k != "rating"} | {"answer": "yes"})
    assert plain.rating is None and plain.answer == "Yes"


def test_rating_reward_needs_a_rating_on_every_record(tiny_model_dir, world, records, tmp_path):
    recipe = _recipe("grpo_qsave_rating.yaml", tiny_model_dir, world.instruct_path, tmp_path)
    with pytest.raises(ValueError, match="rating_reward needs a 'rating' \\(or 'mos'\\) on every record; .* line 1"):
        VideoGRPOTrainer(recipe, records=records)


def test_qsave_recipe_trains_with_rating_reward(tiny_model_dir, rating_path, tmp_path):
    recipe = _recipe("grpo_qsave_rating.yaml", tiny_model_dir, rating_path, tmp_path / "out")
    trainer = VideoGRPOTrainer(recipe)
    trainer.train()
    rows = trainer.completions
    assert len(rows) == 3 and "rating_reward" in rows[0]
    by_question = {(r.video, r.question): r for r in trainer.records}
    for row in rows:
        level = by_question[(row["video"], row["question"])].rating
        assert level in RATING_LEVELS
        assert row["rating_reward"] == rating_reward([row["completion"]], rating=[level])[0]
        assert row["reward"] == row["rating_reward"]
    (logged,) = _log(Path(recipe.output_dir))
    assert logged["rewards/rating_reward/mean"] == pytest.approx(sum(r["rating_reward"] for r in rows) / 3)
    # The reward path: right level, well formed -> 1 + 0.5; well formed, wrong level -> 0.5; garbage -> 0.
    record = trainer.records[0]
    wrong = next(level for level in RATING_LEVELS if level != record.rating)
    rewards, per_func, _, _ = trainer.score(record, [f"<reason>Clean.</reason><answer>{record.rating}</answer>",
                                                     f"<reason>Clean.</reason><answer>{wrong}</answer>", "garbage"], [[1]] * 3)
    assert per_func["rating_reward"].tolist() == [1.5, 0.5, 0.0] and rewards.tolist() == [1.5, 0.5, 0.0]
    # The rollout's prompt asks for a level: Q-Save's question under the five-level system turn, not the Yes/No one.
    from finger_reward.prompts import RATING_SYSTEM_PROMPTS, SYSTEM_PROMPTS

    text = trainer.collator.prompt_text(record)
    assert RATING_SYSTEM_PROMPTS["reason"] in text and SYSTEM_PROMPTS["reason"] not in text and record.question in text
    plain = dataclasses.replace(record, rating=None, mos=None, answer="Yes")
    assert SYSTEM_PROMPTS["reason"] in trainer.collator.prompt_text(plain)

    # The SFT cool-off keeps exactly the rating rollouts at the full 1.5 and writes them back as rating lines.
    from finger_reward.trainers.cooloff import write_cooloff

    logged_rows = [json.loads(line) for line in (Path(recipe.output_dir) / "completions.jsonl").read_text().splitlines()]
    assert all(row["rating"] == by_question[(row["video"], row["question"])].rating for row in logged_rows)
    edits = [(f"<reason>Clean.</reason><answer>{logged_rows[0]['rating'].lower()}</answer>", True),
             (f"<reason>Clean.</reason><answer>{wrong if logged_rows[0]['rating'] == record.rating else record.rating}</answer>", False),
             (f"<answer>{logged_rows[0]['rating']}</answer>", False)]  # the right level without a reason
    edited = tmp_path / "completions.jsonl"
    edited.write_text("".join(json.dumps({**logged_rows[0], "completion": text}) + "\n" for text, _ in edits))
    (kept,) = load_instruct(write_cooloff(edited, tmp_path / "cooloff.jsonl"), mode="reason")
    source = by_question[(logged_rows[0]["video"], logged_rows[0]["question"])]
    assert (kept.rating, kept.answer, kept.mos, kept.reason) == (source.rating, source.rating, source.mos, "Clean.")
