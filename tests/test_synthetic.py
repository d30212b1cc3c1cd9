"""The procedural video world: defects are really in the frames, answers follow from them, files decode."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from finger_reward import synthetic
from finger_reward.questions.bank import QuestionBank
from finger_reward.questions.record import DIMENSIONS, Question
from finger_reward.synthetic import DEFECTS, Scene, balance_answers, make_world
from finger_reward.video import load_video

ALL_DEFECTS = (None, *DEFECTS.values())
SCENES = [
    Scene("red", "circle", "left to right"),
    Scene("blue", "square", "top to bottom"),
    Scene("yellow", "triangle", "right to left"),
    Scene("white", "circle", "bottom to top"),
]


# ---- measuring frames ---------------------------------------------------------------------------


def object_mask(frame: np.ndarray) -> np.ndarray:
    """Pixels clearly unlike the dark background."""
    return np.abs(frame.astype(np.int32) - synthetic.BACKGROUND).sum(-1) > 150


def centroids(frames: np.ndarray) -> np.ndarray:
    """(T, 2) centre of mass (y, x) of the object in each frame."""
    out = []
    for frame in frames:
        ys, xs = np.nonzero(object_mask(frame))
        assert len(ys) > 20, "object not found in frame"
        out.append((ys.mean(), xs.mean()))
    return np.array(out)


def object_colors(frames: np.ndarray) -> np.ndarray:
    """(T, 3) median colour of the object in each frame."""
    return np.array([np.median(frame[object_mask(frame)], axis=0) for frame in frames])


def nearest_color(rgb) -> str:
    return min(synthetic.COLORS, key=lambda name: np.linalg.norm(np.subtract(synthetic.COLORS[name], rgb)))


def high_frequency(frames: np.ndarray) -> float:
    """Mean absolute difference between horizontally and vertically adjacent pixels."""
    f = frames.astype(np.float32)
    return float(np.abs(np.diff(f, axis=2)).mean() + np.abs(np.diff(f, axis=1)).mean())


def steps(frames: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.diff(centroids(frames), axis=0), axis=1)


# Detectors of the object-based defects; noise is measured against a clean reference instead.
DETECTORS = {
    "frozen": lambda frames: steps(frames).max() < 0.5,
    "flicker": lambda frames: np.abs(np.diff(object_colors(frames), axis=0)).sum(-1).max() > 150,
    "teleport": lambda frames: steps(frames).max() > 4 * max(np.median(steps(frames)), 1.0),
    "wrong_color": lambda frames, color=None: nearest_color(object_colors(frames)[0]) != color,
}


def detect(defect: str, frames: np.ndarray, scene: Scene) -> bool:
    if defect == "wrong_color":
        return DETECTORS[defect](frames, scene.color)
    return DETECTORS[defect](frames)


# ---- rendering ----------------------------------------------------------------------------------


def test_render_returns_even_sized_uint8_frames():
    frames = synthetic.render(SCENES[0], num_frames=10, height=48, width=80)
    assert frames.dtype == np.uint8 and frames.shape == (10, 48, 80, 3)
    with pytest.raises(ValueError, match="even"):
        synthetic.render(SCENES[0], height=63)


def test_unknown_defect_is_an_error_naming_the_valid_ones():
    with pytest.raises(ValueError, match="wrong_color.*frozen.*flicker.*noise.*teleport"):
        synthetic.render(SCENES[0], "melting")


@pytest.mark.parametrize("defect", ALL_DEFECTS)
def test_render_is_deterministic_for_scene_defect_and_seed(defect):
    a = synthetic.render(SCENES[1], defect, seed=7)
    b = synthetic.render(SCENES[1], defect, seed=7)
    np.testing.assert_array_equal(a, b)


def test_noise_differs_between_seeds():
    a = synthetic.render(SCENES[0], "noise", seed=1)
    b = synthetic.render(SCENES[0], "noise", seed=2)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 20


@pytest.mark.parametrize("scene", SCENES, ids=lambda s: s.direction)
def test_clean_clip_moves_monotonically_in_the_prompt_direction_in_the_prompt_colour(scene):
    frames = synthetic.render(scene, None)
    ys, xs = centroids(frames).T
    along = {"left to right": xs, "right to left": -xs, "top to bottom": ys, "bottom to top": -ys}[scene.direction]
    assert np.all(np.diff(along) > 1.0)
    assert along[-1] - along[0] > frames.shape[1] / 3
    assert all(nearest_color(c) == scene.color for c in object_colors(frames))


def test_frozen_clip_has_identical_consecutive_frames():
    frames = synthetic.render(SCENES[0], "frozen", seed=3)
    assert all(np.array_equal(frames[k], frames[k + 1]) for k in range(len(frames) - 1))


def test_flicker_changes_the_object_colour_every_frame():
    colors = object_colors(synthetic.render(SCENES[1], "flicker", seed=3))
    assert np.all(np.abs(np.diff(colors, axis=0)).sum(-1) > 150)


def test_noise_adds_far_more_high_frequency_energy_than_the_clean_clip():
    clean = high_frequency(synthetic.render(SCENES[2], None, seed=3))
    noisy = high_frequency(synthetic.render(SCENES[2], "noise", seed=3))
    assert noisy > 5 * clean


@pytest.mark.parametrize("scene", SCENES, ids=lambda s: s.direction)
def test_teleport_jumps_across_at_least_half_the_frame(scene):
    frames = synthetic.render(scene, "teleport", seed=5)
    s = steps(frames)
    extent = frames.shape[2] if scene.direction in ("left to right", "right to left") else frames.shape[1]
    assert s.max() >= extent / 2
    assert s.max() > 10 * np.median(s)


@pytest.mark.parametrize("seed", range(5))
def test_wrong_color_draws_the_object_in_another_palette_colour(seed):
    colors = object_colors(synthetic.render(SCENES[0], "wrong_color", seed=seed))
    names = {nearest_color(c) for c in colors}
    assert len(names) == 1 and "red" not in names


@pytest.mark.parametrize("scene", SCENES[:2], ids=lambda s: s.prompt)
def test_each_object_defect_is_present_only_in_its_own_clip(scene):
    for clip_defect in (None, "frozen", "flicker", "teleport", "wrong_color"):
        frames = synthetic.render(scene, clip_defect, seed=11)
        found = {d for d in DETECTORS if detect(d, frames, scene)}
        assert found == ({clip_defect} - {None}), clip_defect


def test_random_scene_draws_valid_varied_scenes():
    rng = np.random.default_rng(0)
    scenes = [synthetic.random_scene(rng) for _ in range(40)]
    assert len({s.color for s in scenes}) > 2 and len({s.direction for s in scenes}) > 2
    assert scenes[0].prompt == f"a {scenes[0].color} {scenes[0].shape} moves from {scenes[0].direction} on a dark background"


# ---- questions, answers, reasons ----------------------------------------------------------------


def test_questions_cover_every_dimension_in_both_polarities():
    questions = synthetic.questions_for(SCENES[0])
    assert {(q.dimension, q.positive) for q in questions} == {(d, p) for d in DIMENSIONS for p in (True, False)}
    assert all(q.prompt == SCENES[0].prompt and q.entity == "red circle" for q in questions)
    assert len({q.question for q in questions}) == len(questions)
    assert "Is the circle in the video red?" in [q.question for q in questions]


@pytest.mark.parametrize("defect", ALL_DEFECTS)
def test_answer_is_bad_exactly_when_the_defect_is_in_the_question_dimension(defect):
    for q in synthetic.questions_for(SCENES[1]):
        broken = defect is not None and DEFECTS[q.dimension] == defect
        expected = "Yes" if q.positive != broken else "No"
        assert synthetic.answer(q, defect) == expected, (q.question, defect)


def test_answer_flips_with_polarity_and_with_the_defect():
    by_key = {(q.dimension, q.positive): q for q in synthetic.questions_for(SCENES[0])}
    pos, neg = by_key[("dynamic_degree", True)], by_key[("dynamic_degree", False)]
    assert (synthetic.answer(pos, None), synthetic.answer(neg, None)) == ("Yes", "No")
    assert (synthetic.answer(pos, "frozen"), synthetic.answer(neg, "frozen")) == ("No", "Yes")
    assert (synthetic.answer(pos, "noise"), synthetic.answer(neg, "noise")) == ("Yes", "No")
    with pytest.raises(ValueError, match="unknown defect"):
        synthetic.answer(pos, "melting")


def test_reason_explains_from_how_the_clip_was_made():
    q = next(q for q in synthetic.questions_for(SCENES[0]) if q.dimension == "text_alignment")
    clean, broken = synthetic.reason(q, None), synthetic.reason(q, "wrong_color")
    assert clean != broken and "red" in clean and "red" in broken
    assert synthetic.reason(q, "flicker") == clean
    assert all(synthetic.reason(q, d).endswith(".") for q in synthetic.questions_for(SCENES[0]) for d in ALL_DEFECTS)


# ---- the world on disk --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic.make_world(tmp_path_factory.mktemp("world"), num_scenes=2, seed=3)


def decode(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_make_world_writes_one_clip_per_scene_and_defect(world):
    assert len(world.clips) == 2 * len(ALL_DEFECTS)
    assert len({c.scene for c in world.clips}) == 2
    names = sorted(c.path.name for c in world.clips)
    assert names == sorted(f"{i}_{d or 'clean'}.mp4" for i in range(2) for d in ALL_DEFECTS)
    assert all(c.path.parent.name == "videos" and c.path.stat().st_size > 0 for c in world.clips)
    assert world.clips[0].prompt == world.clips[0].scene.prompt


def test_world_videos_decode_and_resemble_their_source(world):
    for clip in world.clips:
        assert load_video(clip.path).frames.shape[0] > 0
    clean = next(c for c in world.clips if c.defect is None)
    decoded = decode(clean.path)
    source = synthetic.render(clean.scene, None, seed=clean.seed)
    assert decoded.shape == source.shape
    assert np.abs(decoded.astype(int) - source.astype(int)).mean() < 20


@pytest.mark.parametrize(("size", "noise_ratio"), [((56, 84), 3.0), ((28, 28), 2.0)])
@pytest.mark.parametrize("scene_index", [0, 1])
def test_defects_survive_encoding_and_resizing(world, scene_index, size, noise_ratio):
    scene = list(dict.fromkeys(c.scene for c in world.clips))[scene_index]
    loaded = {c.defect: load_video(c.path, fps=8.0, max_pixels=size[0] * size[1]).frames.permute(0, 2, 3, 1).numpy()
              for c in world.clips if c.scene == scene}
    assert loaded[None].shape[1:3] == size
    for clip_defect in (None, "frozen", "flicker", "teleport", "wrong_color"):
        found = {d for d in DETECTORS if detect(d, loaded[clip_defect], scene)}
        assert found == ({clip_defect} - {None}), clip_defect
    assert high_frequency(loaded["noise"]) > noise_ratio * high_frequency(loaded[None])


def test_world_bank_loads_with_every_scene_questions(world):
    bank = QuestionBank.from_jsonl(world.bank_path)
    scenes = list(dict.fromkeys(c.scene for c in world.clips))
    assert bank.prompts == [s.prompt for s in scenes]
    assert all(bank.questions_for(s.prompt) == synthetic.questions_for(s) for s in scenes)


def test_instruct_lines_carry_ground_truth_answers_and_reasons(world):
    lines = [json.loads(line) for line in world.instruct_path.read_text(encoding="utf-8").splitlines()]
    clips = {str(c.path): c for c in world.clips}
    assert len(lines) == len(world.clips) * 2 * len(DIMENSIONS)
    for record in lines:
        clip, q = clips[record["video"]], Question.from_dict(record)
        assert set(record) == {"prompt", "dimension", "entity", "question", "positive", "video", "answer", "reason"}
        assert q.prompt == clip.prompt
        assert record["answer"] == synthetic.answer(q, clip.defect)
        assert record["reason"] == synthetic.reason(q, clip.defect)
    assert {r["answer"] for r in lines} == {"Yes", "No"}


def test_make_world_is_deterministic_and_rejects_unknown_defects(tmp_path):
    a = synthetic.make_world(tmp_path / "a", num_scenes=2, defects=(None,), seed=9)
    b = synthetic.make_world(tmp_path / "b", num_scenes=2, defects=(None,), seed=9)
    assert [(c.scene, c.seed) for c in a.clips] == [(c.scene, c.seed) for c in b.clips]
    with pytest.raises(ValueError, match="unknown defect"):
        synthetic.make_world(tmp_path / "c", defects=("melting",))
    assert not (tmp_path / "c").exists()


def _broken(row: dict) -> bool:
    return row["answer"] != ("Yes" if row["positive"] else "No")


def test_balanced_world_keeps_every_broken_answer_and_as_many_fine_ones_per_dimension(tmp_path):
    full = make_world(tmp_path / "full", num_scenes=2, clips_per_scene=2, num_frames=4, seed=3)
    balanced = make_world(tmp_path / "bal", num_scenes=2, clips_per_scene=2, num_frames=4, seed=3, balanced=True)
    rows = [json.loads(line) for line in full.instruct_path.read_text().splitlines()]
    kept = [json.loads(line) for line in balanced.instruct_path.read_text().splitlines()]
    assert len(full.clips) == 2 * 2 * 6 and len(rows) == len(full.clips) * 10
    for dim in DIMENSIONS:
        broken = [r for r in kept if r["dimension"] == dim and _broken(r)]
        fine = [r for r in kept if r["dimension"] == dim and not _broken(r)]
        assert len(broken) == len(fine) == sum(r["dimension"] == dim and _broken(r) for r in rows) == 8
    named = [json.dumps({**r, "video": Path(r["video"]).name}, sort_keys=True) for r in rows]
    assert all(json.dumps({**r, "video": Path(r["video"]).name}, sort_keys=True) in named for r in kept)
    assert balance_answers(rows, seed=5) != balance_answers(rows, seed=6)
    assert balance_answers(rows, seed=5) == balance_answers(rows, seed=5)


def test_clips_per_scene_renders_distinct_seeded_copies(tmp_path):
    world = make_world(tmp_path, num_scenes=1, clips_per_scene=3, defects=(None,), num_frames=4)
    assert [c.path.name for c in world.clips] == ["0_clean.mp4", "0_clean_1.mp4", "0_clean_2.mp4"]
    assert len({c.seed for c in world.clips}) == 3
    with pytest.raises(ValueError, match="clips_per_scene"):
        make_world(tmp_path / "bad", num_scenes=1, clips_per_scene=0)


# ---- the world's files as other commands read them ----------------------------------------------


def test_world_writes_a_prompts_file_relative_to_its_folder(world):
    rows = [json.loads(line) for line in world.prompts_path.read_text().splitlines()]
    assert world.prompts_path == world.bank_path.parent / "prompts.jsonl"
    assert [(r["video"], r["prompt"]) for r in rows] == [(f"videos/{c.path.name}", c.prompt) for c in world.clips]
    # an absolute folder: instruct paths are absolute, so a copy of its lines elsewhere still finds the clips
    assert all(Path(json.loads(line)["video"]).is_absolute() for line in world.instruct_path.read_text().splitlines())


def test_synthetic_command_writes_a_folder_that_score_dir_and_eval_read_from_anywhere(tmp_path, monkeypatch, capsys):
    """`finger-reward synthetic world` from one folder, then score-dir and the instruct loader from another, with the
    world's root spelled absolute: every path resolves from the world's own folder, never the caller's."""
    from finger_reward.cli import main
    from finger_reward.evaluation.loaders import load_benchmark

    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert main(["synthetic", "world", "--scenes", "1", "--frames", "4"]) == 0
    printed = capsys.readouterr().out
    assert "prompts world/prompts.jsonl" in printed and "finger-reward score-dir world --prompts" in printed
    root = tmp_path / "here" / "world"
    lines = [json.loads(line) for line in (root / "instruct.jsonl").read_text().splitlines()]
    assert lines and all(line["video"].startswith("videos/") for line in lines)  # relative to world/, not to here/

    monkeypatch.chdir(tmp_path / "elsewhere")
    bench = load_benchmark("finger", root / "instruct.jsonl")
    assert all(Path(item.video).is_file() for item in bench.items)
    out = tmp_path / "elsewhere" / "results.jsonl"
    assert main(["score-dir", str(root), "--prompts", str(root / "prompts.jsonl"), "--model", "tiny",
                 "--out", str(out)]) == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(results) == 6 and not any(r.get("error") for r in results), results
