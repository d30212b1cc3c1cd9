"""Chat messages for FingER's question answering.

The video comes before the question, so every question about one video shares the same token
prefix (system turn + video) and the engine can encode that prefix once.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def build_messages(question: str, mode: str = "answer") -> list[dict]:
    """The chat for one question about one video: system turn, then video, then the question."""
    return [
        {"role": "system", "content": SYSTEM_PROMPTS[check_mode(mode)]},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]},
    ]


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
