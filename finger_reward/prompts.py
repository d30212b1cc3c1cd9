"""Chat messages for FingER's question answering.

The video comes before the question, so every question about one video shares the same token
prefix (system turn + video) and the engine can encode that prefix once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finger_reward.video import Clip

MODES = ("answer", "reason")

SYSTEM_PROMPTS = {
    "answer": (
        "You are a careful judge of AI-generated videos. Watch the video, then answer the "
        "question about it with Yes or No only."
    ),
    "reason": (
        "You are a careful judge of AI-generated videos. Watch the video, then answer the "
        "question about it. First explain your reasoning inside <reason></reason>, then give "
        "Yes or No inside <answer></answer>."
    ),
}

# Q-Save's rating questions (Sec. 3.4.1): the answer is one of five levels, not Yes/No.
RATING_SYSTEM_PROMPTS = {
    "answer": (
        "You are a careful judge of AI-generated videos. Watch the video, then rate it as the "
        "question asks with one of Bad, Poor, Fair, Good or Excellent only."
    ),
    "reason": (
        "You are a careful judge of AI-generated videos. Watch the video, then rate it as the "
        "question asks. First explain your reasoning inside <reason></reason>, then give one of "
        "Bad, Poor, Fair, Good or Excellent inside <answer></answer>."
    ),
}

# VQ-Insight's preference comparison (Sec. "Preference Comparison Reward"): two videos, one choice.
PAIR_SYSTEM_PROMPTS = {
    "answer": (
        "You are a careful judge of AI-generated videos. Watch Video A and Video B, then answer "
        "which of the two is better in the aspect asked about, with A or B only."
    ),
    "reason": (
        "You are a careful judge of AI-generated videos. Watch Video A and Video B, then answer "
        "which of the two is better in the aspect asked about. First compare them inside "
        "<reason></reason>, then give A or B inside <answer></answer>."
    ),
}
PAIR_LABELS = ("A", "B")
# What "better in DIMENSION" means, one line per FingER dimension (configs/questions.yaml has the long form).
PAIR_ASPECTS = {
    "visual_quality": "visual quality (clean, sharp frames without artifacts or distortions)",
    "temporal_consistency": "temporal consistency (every entity stays the same from frame to frame, no flicker)",
    "dynamic_degree": "dynamic degree (moves as much as the prompt asks, neither frozen nor chaotic)",
    "text_alignment": "text-to-video alignment (shows what the prompt describes)",
    "factual_consistency": "factual consistency (obeys physics and common sense)",
}

REASON_OPEN, REASON_CLOSE = "<reason>", "</reason>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

_SENTINEL = "\x00FINGER_QUESTION\x00"


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    return mode


def build_messages(question: str, mode: str = "answer", clip: Clip | None = None, *, rating: bool = False) -> list[dict]:
    """The chat for one question about one video: system turn, then video, then the question.
    `rating=True`: a Q-Save rating question, whose system turn asks for one of the five levels."""
    return [
        {"role": "system", "content": (RATING_SYSTEM_PROMPTS if rating else SYSTEM_PROMPTS)[check_mode(mode)]},
        {"role": "user", "content": [*video_blocks(clip), {"type": "text", "text": question}]},
    ]


def pair_question(dimension: str, prompt: str) -> str:
    """The comparison question for one dimension: which video is better in it, for the prompt both were made from."""
    if dimension not in PAIR_ASPECTS:
        raise ValueError(f"dimension={dimension!r} is not one of {', '.join(PAIR_ASPECTS)}")
    return f'Both videos were generated from the prompt "{prompt}". Which video is better in {PAIR_ASPECTS[dimension]}?'


def build_pair_messages(question: str, mode: str = "answer", clips: tuple[Clip, Clip] | None = None) -> list[dict]:
    """The chat comparing two videos: system turn, "Video A:" and its video, "Video B:" and its video, the question.

    Both videos come before the question, so the five dimension questions about one pair share
    one prefix, as the questions about one video do.
    """
    return [
        {"role": "system", "content": PAIR_SYSTEM_PROMPTS[check_mode(mode)]},
        {"role": "user", "content": [*pair_video_blocks(clips), {"type": "text", "text": question}]},
    ]


def pair_video_blocks(clips: tuple[Clip, Clip] | None = None) -> list[dict]:
    """Each video after its label ("Video A:", then "Video B:" on a new line); a SlowFast clip brings its pathways."""
    clips = clips or (None, None)
    blocks: list[dict] = []
    for k, (label, clip) in enumerate(zip(PAIR_LABELS, clips)):
        blocks += [{"type": "text", "text": f"{chr(10) if k else ''}Video {label}:"}, *video_blocks(clip)]
    return blocks


def video_blocks(clip: Clip | None = None) -> list[dict]:
    """The user turn's video part: one video block, or a marker and a video block per SlowFast pathway.

    Qwen-VL gives all frames of one video one size, so a SlowFast clip (Q-Save Sec. 4.2.1) is two
    videos: the slow frames at full resolution, then the fast frames at the lower one, each after
    a text marker naming the pathway and its frames' absolute timestamps (seconds on the clip's
    sampled clock). Q-Save's special tokens become plain text, which any checkpoint's tokenizer
    reads. For a clip with slow frames at 0 s and 2 s, fast frames between:

        "Slow frames at 0.0s, 2.0s:" <video> "\\nFast frames at 0.5s, 1.0s, 1.5s, 2.5s:" <video>

    then the question follows, as after a plain video. A clip with no fast frame has the slow
    part only. Each pathway gets its mean frame rate as its temporal mrope spacing; the markers
    carry the exact times. An odd frame count is padded by the processor repeating the last frame.
    """
    if clip is None or not clip.pathways:
        return [{"type": "video"}]
    blocks: list[dict] = []
    for k, pathway in enumerate(clip.pathways):
        times = ", ".join(_seconds(t) for t in clip.timestamps(pathway))
        newline = "\n" if k else ""
        marker = f"{newline}{pathway.kind.capitalize()} frames at {times}:"
        blocks += [{"type": "text", "text": marker}, {"type": "video"}]
    return blocks


def _seconds(t: float) -> str:
    text = f"{t:.2f}"
    return (text[:-1] if text.endswith("0") else text) + "s"


def expand_video(text: str, processor, clip: Clip | Sequence[Clip]) -> str:
    """A rendered chat with each plain video placeholder replaced by its clip's `video_blocks`, in order.

    Prompts are rendered once for every clip (the shared prefix); this gives a SlowFast clip its
    own markers and second video, rendered by the processor's chat template itself. A two-video
    prompt (`build_pair_messages`) takes its two clips in order.
    """
    clips = [clip] if not isinstance(clip, Sequence) else list(clip)
    if not any(c.pathways for c in clips):
        return text
    plain = _render_blocks(processor, video_blocks())
    parts = text.split(plain)
    if len(parts) != len(clips) + 1:
        wanted = "exactly one video placeholder" if len(clips) == 1 else f"exactly {len(clips)} video placeholders"
        raise ValueError(f"{len(clips)} clip(s) with SlowFast frames need {wanted} {plain!r} in the prompt, "
                         f"found {len(parts) - 1}")
    expanded = [_render_blocks(processor, video_blocks(c)) for c in clips]
    return parts[0] + "".join(e + p for e, p in zip(expanded, parts[1:]))


def _render_blocks(processor, blocks: list[dict]) -> str:
    """How the chat template renders these content blocks inside a user turn."""
    edge = {"type": "text", "text": _SENTINEL}
    text = processor.apply_chat_template(
        [{"role": "user", "content": [edge, *blocks, edge]}], tokenize=False, add_generation_prompt=False
    )
    return text.split(_SENTINEL)[1]


@dataclass(frozen=True)
class SplitPrompt:
    """A rendered chat split where the question goes: `prefix + question + suffix`.

    `prefix` holds the system turn and the video placeholder and is the same for every
    question; `suffix` closes the user turn and opens the assistant's.
    """

    prefix: str
    suffix: str

    def text_after_video(self, question: str) -> str:
        return question + self.suffix


def split_prompt(processor, mode: str = "answer", *, pair: bool = False, rating: bool = False) -> SplitPrompt:
    """Render the processor's own chat template once and split it at the question.

    `pair=True`: the two-video comparison chat (`build_pair_messages`), whose prefix holds both videos.
    `rating=True`: the chat of a Q-Save rating question (five levels instead of Yes/No).
    """
    messages = build_pair_messages(_SENTINEL, mode) if pair else build_messages(_SENTINEL, mode, rating=rating)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.count(_SENTINEL) != 1:
        raise ValueError("the chat template must place the question text exactly once")
    prefix, suffix = text.split(_SENTINEL)
    video_token = getattr(processor, "video_token", "<|video_pad|>")
    if video_token not in prefix:
        raise ValueError(
            f"the chat template puts the question before the video ({video_token} not found "
            "before it); prefix sharing needs the video first"
        )
    return SplitPrompt(prefix=prefix, suffix=suffix)
