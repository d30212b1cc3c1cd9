"""Chat messages for FingER's question answering.

The video comes before the question, so every question about one video shares the same token
prefix (system turn + video) and the engine can encode that prefix once.
"""

from __future__ import annotations

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

REASON_OPEN, REASON_CLOSE = "<reason>", "</reason>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

_SENTINEL = "\x00FINGER_QUESTION\x00"


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    return mode


def build_messages(question: str, mode: str = "answer", clip: Clip | None = None) -> list[dict]:
    """The chat for one question about one video: system turn, then video, then the question."""
    return [
        {"role": "system", "content": SYSTEM_PROMPTS[check_mode(mode)]},
        {"role": "user", "content": [*video_blocks(clip), {"type": "text", "text": question}]},
    ]


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


def expand_video(text: str, processor, clip: Clip) -> str:
    """A rendered chat with its one plain video placeholder replaced by the clip's `video_blocks`.

    Prompts are rendered once for every clip (the shared prefix); this gives a SlowFast clip its
    own markers and second video, rendered by the processor's chat template itself.
    """
    if not clip.pathways:
        return text
    plain = _render_blocks(processor, video_blocks())
    if text.count(plain) != 1:
        raise ValueError(
            f"a SlowFast clip needs exactly one video placeholder {plain!r} in the prompt, found {text.count(plain)}"
        )
    return text.replace(plain, _render_blocks(processor, video_blocks(clip)))


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


def split_prompt(processor, mode: str = "answer") -> SplitPrompt:
    """Render the processor's own chat template once and split it at the question."""
    text = processor.apply_chat_template(
        build_messages(_SENTINEL, mode), tokenize=False, add_generation_prompt=True
    )
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
