"""A procedural video world: short clips of coloured shapes with one controlled defect each.

Random weights say nothing about quality; these clips do. Each clip follows a prompt
("a red circle moves from left to right"), optionally broken in one FingER dimension, so the
answer to every question about it is known from how it was made. The world is written as
real .mp4 files, a question bank and FingER-Instruct JSONL (question fields + video, answer,
reason) for tests and training.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finger_reward.questions.bank import QuestionBank
from finger_reward.questions.record import DIMENSIONS, Question


def write_video(frames: np.ndarray, path: str | Path, fps: float = 8.0) -> Path:
    """Encode uint8 frames (T, H, W, 3) as an H.264 .mp4 with PyAV (even H and W required)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.asarray(frames, dtype=np.uint8)
    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


# ---- the world's vocabulary ---------------------------------------------------------------------

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 210, 40),
    "blue": (40, 70, 240),
    "yellow": (245, 225, 20),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left to right", "right to left", "top to bottom", "bottom to top")
DEFECTS: dict[str, str] = {
    "text_alignment": "wrong_color",
    "dynamic_degree": "frozen",
    "temporal_consistency": "flicker",
    "visual_quality": "noise",
    "factual_consistency": "teleport",
}
BACKGROUND = (20, 22, 34)
NOISE_STD = 60.0
NOISE_BLOCK = 2
BLUR_SIZE = 5
WASHOUT = 0.5  # a low-quality clip is also washed out: halfway to mid-grey
_DIMENSION_OF = {defect: dimension for dimension, defect in DEFECTS.items()}


@dataclass(frozen=True)
class Scene:
    """What the prompt asks for: one coloured shape moving in one direction."""

    color: str
    shape: str
    direction: str

    def __post_init__(self):
        for value, valid in ((self.color, COLORS), (self.shape, SHAPES), (self.direction, DIRECTIONS)):
            if value not in valid:
                raise ValueError(f"unknown scene value {value!r}; expected one of {', '.join(valid)}")

    @property
    def entity(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def prompt(self) -> str:
        return f"a {self.entity} moves from {self.direction} on a dark background"


def random_scene(rng: np.random.Generator) -> Scene:
    """Draw a scene uniformly from the colours, shapes and directions."""
    return Scene(
        color=str(rng.choice(list(COLORS))),
        shape=str(rng.choice(SHAPES)),
        direction=str(rng.choice(DIRECTIONS)),
    )


# ---- rendering ----------------------------------------------------------------------------------


def render(
    scene: Scene, defect: str | None = None, *, num_frames: int = 16, height: int = 64, width: int = 96, seed: int = 0
) -> np.ndarray:
    """Frames uint8 (T, H, W, 3) of the scene with at most one defect; deterministic for (scene, defect, seed)."""
    _check_defect(defect)
    if num_frames < 2 or height % 2 or width % 2 or min(height, width) < 16:
        raise ValueError(f"need num_frames >= 2 and even height, width >= 16; got {num_frames}, {height}, {width}")
    rng = np.random.default_rng(seed)
    centers = _trajectory(scene.direction, defect, num_frames, height, width, rng)
    colors = _object_colors(scene.color, defect, num_frames, rng)
    radius = height // 4
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for k in range(num_frames):
        frame = np.empty((height, width, 3), dtype=np.float32)
        frame[:] = BACKGROUND
        frame[_shape_mask(scene.shape, centers[k], radius, height, width)] = colors[k]
        if defect == "noise":
            # Noise alone hides in second-order statistics, which a tiny model trained from random
            # weights barely learns to see; the washed-out contrast of poor footage shows in the means.
            washed = (1 - WASHOUT) * frame + WASHOUT * 128.0
            frame = _blur(washed, BLUR_SIZE) + _noise(rng, height, width)
        frames[k] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return frames


def _check_defect(defect: str | None) -> None:
    if defect is not None and defect not in _DIMENSION_OF:
        raise ValueError(f"unknown defect {defect!r}; expected None or one of {', '.join(_DIMENSION_OF)}")


def _trajectory(direction: str, defect: str | None, t: int, height: int, width: int, rng) -> np.ndarray:
    """Object centres (T, 2) as (y, x): a straight run across the frame, frozen or teleporting on request."""
    radius = height // 4
    horizontal = direction in ("left to right", "right to left")
    along, across = (width, height) if horizontal else (height, width)
    free = across - 2 * radius
    progress = np.linspace(0.0, 1.0, t)
    lane = np.full(t, across / 2 + rng.uniform(-free / 8, free / 8))
    if defect == "frozen":
        progress = np.zeros(t)
    elif defect == "teleport":
        half = t // 2
        progress = np.concatenate([np.linspace(0.0, 0.1, half), np.linspace(0.9, 1.0, t - half)])
        lane[half:] += rng.choice([-1.0, 1.0]) * 3 * free / 8  # the far side of the lane, still inside
    if direction in ("right to left", "bottom to top"):
        progress = 1.0 - progress
    position = radius + progress * (along - 2 * radius)
    return np.stack([lane, position] if horizontal else [position, lane], axis=1)


def _object_colors(color: str, defect: str | None, t: int, rng) -> list[tuple[int, int, int]]:
    """The object's colour per frame: the prompt's, another one, or alternating with a far one."""
    own = COLORS[color]
    others = [name for name in COLORS if name != color]
    if defect == "wrong_color":
        return [COLORS[str(rng.choice(others))]] * t
    if defect == "flicker":
        far = max(others, key=lambda name: np.linalg.norm(np.subtract(COLORS[name], own)))
        return [own if k % 2 == 0 else COLORS[far] for k in range(t)]
    return [own] * t


def _shape_mask(shape: str, center, radius: int, height: int, width: int) -> np.ndarray:
    """Boolean (H, W) mask of a circle, square or upward triangle of the given radius at `center` (y, x)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    dy, dx = yy - center[0], xx - center[1]
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        side = 0.85 * radius
        return (np.abs(dx) <= side) & (np.abs(dy) <= side)
    # triangle: apex at the top, base at the bottom, half-width growing linearly downwards
    inside_rows = np.abs(dy) <= radius
    return inside_rows & (np.abs(dx) <= (dy + radius) / 2 * 1.1)


def _noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Gaussian noise (H, W, 3) in 2x2 blocks, coarse enough to survive H.264 and downscaling."""
    block = NOISE_BLOCK
    coarse = rng.normal(0.0, NOISE_STD, (-(-height // block), -(-width // block), 3))
    return coarse.repeat(block, axis=0).repeat(block, axis=1)[:height, :width]


def _blur(frame: np.ndarray, size: int) -> np.ndarray:
    """Box blur of an (H, W, C) float frame with edge padding."""
    pad = size // 2
    padded = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    out = np.zeros_like(frame)
    for dy in range(size):
        for dx in range(size):
            out += padded[dy : dy + frame.shape[0], dx : dx + frame.shape[1]]
    return out / size**2


# ---- questions and their ground truth -----------------------------------------------------------

# dimension -> (positive question, negative question); {entity}, {shape}, {color} filled per scene
_QUESTIONS = {
    "text_alignment": (
        "Is the {shape} in the video {color}?",
        "Is the {shape} in the video a different colour than {color}?",
    ),
    "dynamic_degree": (
        "Does the {entity} move across the frame?",
        "Does the {entity} stay still for the whole video?",
    ),
    "temporal_consistency": (
        "Does the {entity} keep the same colour throughout the video?",
        "Does the {entity} flicker or change colour?",
    ),
    "visual_quality": (
        "Is the video clear and free of noise and blur?",
        "Is the video noisy or blurry?",
    ),
    "factual_consistency": (
        "Does the {entity} move smoothly without jumping?",
        "Does the {entity} suddenly jump to another position?",
    ),
}

# dimension -> (why the clip is fine in it, why it is broken in it)
_REASONS = {
    "text_alignment": (
        "The {shape} is drawn in {color}, as the prompt says.",
        "The {shape} is drawn in another colour instead of {color}.",
    ),
    "dynamic_degree": (
        "The {entity} changes position from frame to frame.",
        "The {entity} stays in the same place in every frame.",
    ),
    "temporal_consistency": (
        "The {entity} keeps one colour in every frame.",
        "The {entity} switches to a very different colour every other frame.",
    ),
    "visual_quality": (
        "The frames are clean and sharp, without noise, blur or washed-out colours.",
        "Heavy noise and blur cover every frame, and the colours are washed out.",
    ),
    "factual_consistency": (
        "The {entity} never jumps to a distant position.",
        "The {entity} jumps to a far position in the middle of the clip.",
    ),
}


def questions_for(scene: Scene) -> list[Question]:
    """One positive and one negative question per FingER dimension about the scene's object."""
    fields = {"entity": scene.entity, "shape": scene.shape, "color": scene.color}
    return [
        Question(prompt=scene.prompt, dimension=dimension, entity=scene.entity,
                 question=template.format(**fields), positive=positive)
        for dimension in DIMENSIONS
        for template, positive in zip(_QUESTIONS[dimension], (True, False))
    ]


def _is_broken(question: Question, defect: str | None) -> bool:
    """Whether the clip's defect lies in the question's dimension."""
    _check_defect(defect)
    return defect is not None and _DIMENSION_OF[defect] == question.dimension


def answer(question: Question, defect: str | None) -> str:
    """Ground truth: the "bad" answer exactly when the clip's defect belongs to the question's dimension."""
    good = "Yes" if question.positive else "No"
    bad = "No" if question.positive else "Yes"
    return bad if _is_broken(question, defect) else good


def reason(question: Question, defect: str | None) -> str:
    """One sentence saying why the answer holds, from how the clip was made."""
    color, _, shape = question.entity.partition(" ")
    template = _REASONS[question.dimension][_is_broken(question, defect)]
    return template.format(entity=question.entity, shape=shape, color=color)


# ---- the world on disk --------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticClip:
    """One rendered clip on disk and how it was made."""

    path: Path
    scene: Scene
    defect: str | None
    seed: int

    @property
    def prompt(self) -> str:
        return self.scene.prompt


@dataclass(frozen=True)
class World:
    """The clips, the question bank and the FingER-Instruct JSONL written by `make_world`."""

    clips: list[SyntheticClip]
    bank_path: Path
    instruct_path: Path
    prompts_path: Path | None = None  # {"video", "prompt"} per clip, as `finger-reward score-dir` reads it


def make_world(
    out_dir: str | Path,
    *,
    num_scenes: int = 2,
    defects=(None, *DEFECTS.values()),
    seed: int = 0,
    num_frames: int = 16,
    height: int = 64,
    width: int = 96,
    fps: float = 8.0,
    clips_per_scene: int = 1,
    balanced: bool = False,
    progress: bool = False,
    relative_paths: bool | None = None,
) -> World:
    """Render and encode `clips_per_scene` clips per (scene, defect); write the question bank, the instruct
    JSONL and `prompts.jsonl` (one {"video", "prompt"} line per clip, for `finger-reward score-dir OUT_DIR`).

    With `balanced=True` the instruct JSONL is `balance_answers` of all (clip, question) lines, for training.
    The instruct JSONL's videos are relative to `out_dir` with `relative_paths=True` (the folder can move;
    readers resolve them against the file's folder), else absolute; the default (None) is relative when
    `out_dir` is given relative, since a path relative to the caller's folder would not resolve from the
    file's. `prompts.jsonl`'s videos are always relative to `out_dir`, which score-dir joins them to.
    """
    from tqdm.auto import tqdm

    for defect in defects:
        _check_defect(defect)
    if clips_per_scene < 1:
        raise ValueError(f"clips_per_scene must be at least 1, got {clips_per_scene}")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    clips = []
    scenes = _distinct_scenes(rng, num_scenes)
    with tqdm(total=len(scenes) * len(defects) * clips_per_scene, desc="rendering clips", unit="clip",
              disable=not progress) as bar:
        for index, scene in enumerate(scenes):
            for copy in range(clips_per_scene):
                for defect in defects:
                    clip_seed = int(rng.integers(2**31))
                    frames = render(scene, defect, num_frames=num_frames, height=height, width=width, seed=clip_seed)
                    name = f"{index}_{defect or 'clean'}" + (f"_{copy}" if copy else "")
                    path = write_video(frames, out_dir / "videos" / f"{name}.mp4", fps=fps)
                    clips.append(SyntheticClip(path=path, scene=scene, defect=defect, seed=clip_seed))
                    bar.update()
    bank_path = QuestionBank([q for scene in scenes for q in questions_for(scene)]).to_jsonl(out_dir / "questions.jsonl")
    relative = not out_dir.is_absolute() if relative_paths is None else relative_paths
    rows = _instruct_rows(clips, out_dir if relative else None)
    if balanced:
        rows = balance_answers(rows, seed=seed)
    prompts = [{"video": _video_field(c.path, out_dir), "prompt": c.prompt} for c in clips]
    return World(clips=clips, bank_path=bank_path, instruct_path=_write_jsonl(rows, out_dir / "instruct.jsonl"),
                 prompts_path=_write_jsonl(prompts, out_dir / "prompts.jsonl"))


def _distinct_scenes(rng: np.random.Generator, count: int) -> list[Scene]:
    """`count` different scenes, so that every prompt names one scene."""
    total = len(COLORS) * len(SHAPES) * len(DIRECTIONS)
    if not 0 <= count <= total:
        raise ValueError(f"num_scenes must be between 0 and {total}, got {count}")
    scenes: list[Scene] = []
    while len(scenes) < count:
        scene = random_scene(rng)
        if scene not in scenes:
            scenes.append(scene)
    return scenes


def _video_field(path: Path, root: Path | None) -> str:
    """A clip's path as a JSONL line gives it: relative to `root` (POSIX separators), or absolute without one."""
    return path.relative_to(root).as_posix() if root is not None else os.path.abspath(path)


def _instruct_rows(clips: list[SyntheticClip], root: Path | None = None) -> list[dict]:
    """FingER-Instruct rows: one per (clip, question) with the question fields, video, answer and reason."""
    return [{**q.to_dict(), "video": _video_field(clip.path, root), "answer": answer(q, clip.defect),
             "reason": reason(q, clip.defect)}
            for clip in clips for q in questions_for(clip.scene)]


def balance_answers(rows: list[dict], *, seed: int = 0) -> list[dict]:
    """Per dimension, every "broken" row and as many "fine" rows drawn at random, shuffled.

    With one defect per clip a question is broken in 1 clip of 6, so always answering "fine" is
    83% right and a small model learns the question's polarity and never looks at the video.
    Balanced, the answer can only be told from the video (the answer is polarity XOR defect).
    """
    rng = np.random.default_rng(seed)
    kept = []
    for dimension in DIMENSIONS:
        rows_in = [r for r in rows if r["dimension"] == dimension]
        broken = [r for r in rows_in if r["answer"] != ("Yes" if r["positive"] else "No")]
        fine = [r for r in rows_in if r["answer"] == ("Yes" if r["positive"] else "No")]
        picked = rng.choice(len(fine), size=min(len(broken), len(fine)), replace=False)
        kept += broken + [fine[i] for i in sorted(picked)]
    return [kept[i] for i in rng.permutation(len(kept))]


def _write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
