"""VQ-Insight temporal modelling (Sec. 3.2, Eq. 4): the frame-shuffled clip and the answer probabilities w.

The same question is asked about the clip with its frames in order and with them shuffled; w is
the probability the policy gives the correct answer after a response (`w_seq` after the i-th
response on the ordered clip, `w_rand` after the i-th response sampled on the shuffled one), and
`rewards.temporal_reward` pays alpha when `w_seq > mu * w_rand`. The probability is read as the
engine reads an answer after a reason (FingER Eq. 1): the response's reason is closed with
`</reason><answer>` and the next-token distribution is restricted to the answer's token set.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import torch

from finger_reward import prompts
from finger_reward.engine.reasoning import extract_reason
from finger_reward.scoring import RATING_LEVELS, answer_probs
from finger_reward.video import Clip


def frame_permutation(num_frames: int, seed: int | str) -> list[int]:
    """A seeded random order of `num_frames` frame indices that is never the identity (the shuffled
    clip must differ from the ordered one); the same seed gives the same order."""
    if num_frames < 2:
        raise ValueError(f"shuffling frames needs a clip of at least 2 frames, got {num_frames}")
    rng = random.Random(seed)
    order = list(range(num_frames))
    while order == sorted(order):
        rng.shuffle(order)
    return order


def shuffle_clip(clip: Clip, seed: int | str) -> Clip:
    """The clip with its frames in `frame_permutation` order, shuffled before the processor; the frame
    rate and size stay, so the model sees the same tokens in another temporal order."""
    if clip.pathways:
        raise ValueError(f"{clip.name}: shuffling a SlowFast clip is not supported; train the temporal reward "
                         "on plain frames (slowfast: null)")
    order = frame_permutation(clip.frames.shape[0], seed)
    return dataclasses.replace(clip, frames=clip.frames[order], name=f"{clip.name} (frames shuffled)")


def answer_stem(completion: str) -> str:
    """The completion up to the answer slot, as the engine's reason mode closes it: `<reason>` + the
    response's reason + `</reason><answer>`; the next token is the answer."""
    return f"{prompts.REASON_OPEN}{extract_reason(completion)}{prompts.REASON_CLOSE}{prompts.ANSWER_OPEN}"


def correct_answer_probability(logits: torch.Tensor, answer: str, yes_ids: Sequence[int], no_ids: Sequence[int],
                               rating_ids: Sequence[int] | None = None) -> torch.Tensor:
    """P(correct answer) from next-token logits (..., V): for "Yes"/"No", Eq. 1 (softmax over T_Y u T_N);
    for a rating level, the softmax over the five level tokens (Q-Save's rating probabilities)."""
    if answer in ("Yes", "No"):
        return answer_probs(logits, yes_ids, no_ids)[..., 0 if answer == "Yes" else 1]
    if answer not in RATING_LEVELS:
        raise ValueError(f"the correct answer must be Yes, No or one of {', '.join(RATING_LEVELS)}, got {answer!r}")
    if rating_ids is None:
        raise ValueError("a rating answer needs the level token ids (instruct.rating_token_ids)")
    return logits[..., list(rating_ids)].float().softmax(-1)[..., RATING_LEVELS.index(answer)]
