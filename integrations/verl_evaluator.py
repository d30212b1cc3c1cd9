"""Training the FingER evaluator itself with GRPO on verl 0.9.1 (FingER Sec. 3.3.3): data, reward, video loading.

`finger_reward.integrations.verl` is FingER as the reward of *another* policy; this module is the
other way round: the judge (Qwen2.5-VL) is verl's policy, answering FingER-Instruct questions about
videos, rewarded by the same pure functions as the single-process trainer (`trainers/grpo.py`).

- `instruct_to_verl(jsonl, parquet)`: FingER-Instruct JSONL -> verl's RL parquet. Each row is one
  question about one video: `prompt` holds the engine's chat (reason-mode system turn, then
  "<video>" and the question, which verl's RLHFDataset splits into the same video-then-text blocks
  `prompts.build_messages` makes), `videos` a qwen-vl-utils dict, `reward_model.ground_truth` "Yes"/"No".
- `compute_score`: verl's custom reward, r = r_accuracy + r_format (Eq. 9-11, `finger_reward.rewards`).
- `FingerVideoDataset`: verl's RLHFDataset whose videos are decoded by `finger_reward.video.load_video`,
  so the policy is trained on the frames the engine scores with (qwen-vl-utils samples other frames).
- `FingerAgentLoop` (agent name "finger_video", configs/verl_agent_loops.yaml): verl's single-turn
  agent loop, with the rope positions of the trained policy's forward (verl computes them with the
  processor's `get_rope_index`, which it binds to transformers' version) taken from
  `finger_reward.rope` instead (`bind_rope_positions`), so the actor is trained on the positions
  the vLLM rollout sampled with and the engine scores with.

configs/verl_grpo.yaml wires them up; `python -m finger_reward.trainers.verl_grpo` launches it.
`import finger_reward.integrations.verl_evaluator` does not import verl.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace
from pathlib import Path

from finger_reward import prompts
from finger_reward.instruct import InstructError, InstructRecord, load_instruct
from finger_reward.integrations.verl import VERL_KEYWORDS
from finger_reward.rewards import accuracy_reward, format_reward
from finger_reward.rope import RopeLayout, rope_positions
from finger_reward.video import PATCH_FACTOR, load_video

logger = logging.getLogger(__name__)

DATA_SOURCE = "finger_instruct"  # verl groups validation metrics by data_source
PLACEHOLDERS = ("<image>", "<video>", "<audio>")  # RLHFDataset._build_messages splits the text at these
SPATIAL_MERGE = 2  # Qwen2.5-VL / Qwen3-VL merge 2 x 2 patches; verl hands the dataset only the patch size


# ---- the reward ---------------------------------------------------------------------------------


def compute_score(data_source, solution_str, ground_truth, extra_info=None, *, accuracy_weight: float = 1.0,
                  format_weight: float = 1.0, **kwargs) -> dict:
    """verl's custom reward for one completion: {"score": r, "acc": r_accuracy, "format": r_format}.

    r = accuracy_weight * r_accuracy + format_weight * r_format, weights 1 as in FingER Eq. 9;
    r_accuracy (Eq. 10) and r_format (Eq. 11) are `rewards.accuracy_reward` / `rewards.format_reward`,
    so verl and `trainers/grpo.py` reward identically. `ground_truth` is the row's
    `reward_model.ground_truth` ("Yes"/"No"); `data_source` is not used. verl logs every key.
    """
    for name in VERL_KEYWORDS:
        kwargs.pop(name, None)  # verl adds these when its own reward model is on; not ours
    if kwargs:
        raise TypeError(f"compute_score got unknown reward_kwargs {sorted(kwargs)}; "
                        "valid: accuracy_weight, format_weight")
    if not isinstance(ground_truth, str) or ground_truth.strip().lower() not in ("yes", "no"):
        where = f" (extra_info index {extra_info.get('index')})" if isinstance(extra_info, dict) else ""
        raise ValueError(f"reward_model.ground_truth must be 'Yes' or 'No'{where}, got {ground_truth!r}; "
                         "write the parquet with instruct_to_verl")
    acc = accuracy_reward([solution_str], answer=[ground_truth])[0]
    fmt = format_reward([solution_str])[0]
    return {"score": accuracy_weight * acc + format_weight * fmt, "acc": acc, "format": fmt}


# ---- FingER-Instruct -> verl parquet ------------------------------------------------------------


def verl_messages(question: str, mode: str = "reason") -> list[dict]:
    """`prompts.build_messages` with each message's content blocks as verl's text: a video block is "<video>"."""
    def text(content):
        if isinstance(content, str):
            return content
        return "".join("<video>" if block["type"] == "video" else block["text"] for block in content)

    return [{"role": m["role"], "content": text(m["content"])} for m in prompts.build_messages(question, mode)]


def verl_row(record: InstructRecord, index: int, *, mode: str, split: str, video: dict) -> dict:
    """One verl RL row for one FingER-Instruct record (see the module docstring)."""
    found = [p for p in PLACEHOLDERS if p in record.question]
    if found:
        raise InstructError(f"{record.source or 'record'}: field 'question' contains {', '.join(found)}, which "
                            "verl reads as a media placeholder; reword the question")
    return {
        "data_source": DATA_SOURCE,
        "prompt": verl_messages(record.question, mode),
        "videos": [{"video": record.video, **video}],
        "reward_model": {"style": "rule", "ground_truth": record.answer},
        "extra_info": {"index": index, "split": split, "prompt": record.prompt, "dimension": record.dimension,
                       "entity": record.entity, "question": record.question, "positive": record.positive,
                       "video": record.video, "source": record.source},
    }


def instruct_to_verl(jsonl_path: str | Path, out_parquet: str | Path, *, mode: str = "reason", fps: float = 2.0,
                     max_pixels: int = 448 * 448, max_frames: int = 48, video_root: str | Path | None = None,
                     split: str = "train", patch_factor: int = PATCH_FACTOR) -> Path:
    """Write FingER-Instruct JSONL as verl's RL parquet; returns the parquet path.

    Lines are read by `load_instruct` (a bad line raises `InstructError` naming file and line;
    relative videos resolve against `video_root`, default the JSONL's folder, and must exist; reasons
    are not needed). Videos are stored as absolute paths with the engine's sampling settings, as
    qwen-vl-utils reads them (`fps`, `max_frames`, `max_pixels`, and `min_pixels` = one patch, so
    small clips are not enlarged, as the engine does not); `FingerVideoDataset` reads the same keys.
    `mode` must be "reason": GRPO's rewards read the `<answer>` tag that only reason mode asks for.
    `patch_factor`: patch size x spatial merge of the model (28 for Qwen2.5-VL, 32 for Qwen3-VL).
    """
    if prompts.check_mode(mode) != "reason":
        raise ValueError(f"mode={mode!r}: GRPO rewards the <reason>/<answer> format (Eq. 10-11), which only "
                         "mode='reason' asks for; answer mode would score 0 on every completion")
    if not 0 < fps or max_frames < 1 or max_pixels < patch_factor**2:
        raise ValueError(f"need fps > 0, max_frames >= 1, max_pixels >= {patch_factor**2}; "
                         f"got {fps}, {max_frames}, {max_pixels}")
    try:
        import pandas as pd  # verl depends on pandas and pyarrow
    except ImportError as err:
        raise ImportError(f"instruct_to_verl needs pandas and pyarrow: pip install 'finger-reward[verl]' ({err})") from err

    video = {"fps": float(fps), "max_frames": int(max_frames), "max_pixels": int(max_pixels),
             "min_pixels": patch_factor**2}
    records = load_instruct(jsonl_path, video_root=video_root)
    rows = [verl_row(replace(r, video=str(Path(r.video).resolve())), i, mode=mode, split=split, video=video)
            for i, r in enumerate(records)]
    out = Path(out_parquet)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(out, index=False)
    logger.info("wrote %d verl rows from %s to %s", len(rows), jsonl_path, out)
    return out


# ---- verl's dataset with the engine's video decoding --------------------------------------------


def load_clip(item: dict, image_patch_size: int):
    """A chat video block (`{"type": "video", "video": path, "fps": ..}`) decoded as the engine decodes it."""
    unsupported = sorted(set(item) - {"type", "video", "fps", "max_frames", "max_pixels", "min_pixels"})
    if unsupported:
        raise ValueError(f"video {item.get('video')!r}: FingerVideoDataset reads fps, max_frames and max_pixels, "
                         f"not {', '.join(unsupported)}; use verl's RLHFDataset (qwen-vl-utils) for those")
    options = {k: item[k] for k in ("fps", "max_frames", "max_pixels") if item.get(k) is not None}
    return load_video(item["video"], patch_factor=image_patch_size * SPATIAL_MERGE, **options)


def __getattr__(name: str):
    # verl's loaders do getattr(module, "FingerVideoDataset"), Hydra's getattr(module, "FingerAgentLoop")
    if name == "FingerVideoDataset":
        return finger_video_dataset_class()
    if name == "FingerAgentLoop":
        return finger_agent_loop_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- rope positions for verl's actor ---------------------------------------------------------------


def bind_rope_positions(processor, config) -> None:
    """Make verl's position computation (`processor.get_rope_index`, `get_rope_index_kwargs`) use `finger_reward.rope`.

    verl 0.9.1's agent loop binds transformers' `get_rope_index` to the processor and calls it
    without `second_per_grid_ts`; both would put the text after a video elsewhere than the
    model's original code, vLLM's rollout and the engine do. `config` is the model's config.
    """
    layout = RopeLayout.from_config(config)

    def get_rope_index(input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                       second_per_grid_ts=None, **_ignored):  # verl also passes mm_token_type_ids
        return rope_positions(layout, input_ids, attention_mask, image_grid_thw=image_grid_thw,
                              video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts)

    processor.get_rope_index = get_rope_index
    processor.get_rope_index_kwargs = lambda inputs: {"second_per_grid_ts": inputs.get("second_per_grid_ts")}


@functools.cache
def finger_agent_loop_class() -> type:
    """Build `FingerAgentLoop` on verl's SingleTurnAgentLoop (imports verl)."""
    try:
        from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop
    except ImportError as err:
        raise ImportError(f"FingerAgentLoop needs verl: pip install 'finger-reward[verl]' ({err})") from err

    class FingerAgentLoop(SingleTurnAgentLoop):
        """verl's single-turn agent loop; the worker's processor computes `finger_reward.rope` positions."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.processor is not None:
                bind_rope_positions(self.processor, self.processor.config)

    FingerAgentLoop.__module__, FingerAgentLoop.__qualname__ = __name__, "FingerAgentLoop"
    return FingerAgentLoop


@functools.cache
def finger_video_dataset_class() -> type:
    """Build `FingerVideoDataset` on verl's RLHFDataset (imports verl)."""
    try:
        from verl.utils.dataset.rl_dataset import RLHFDataset
    except ImportError as err:
        raise ImportError(f"FingerVideoDataset needs verl: pip install 'finger-reward[verl]' ({err})") from err

    class FingerVideoDataset(RLHFDataset):
        """verl's RLHFDataset, videos decoded and sampled by `finger_reward.video.load_video`.

        verl asks the dataset class for each prompt's media (`process_multi_modal_info`, in the agent
        loop and when filtering long prompts); this one returns the engine's frames (fps sampling at
        frame centres, at most max_frames, resized under max_pixels) with their real frame rate as
        metadata, as `engine.inputs.processor_inputs` gives them. Pair it with
        `data.mm_processor_kwargs.do_resize=false` (as the engine) so the processor keeps their size.
        """

        @classmethod
        def _process_multi_modal_info(cls, messages: list[dict], image_patch_size, config) -> tuple:
            blocks = [b for m in messages if isinstance(m.get("content"), list) for b in m["content"]
                      if isinstance(b, dict) and b.get("type") in ("image", "video", "audio")]
            if any(b["type"] != "video" for b in blocks):
                raise ValueError("FingerVideoDataset reads videos only; this prompt has "
                                 f"{sorted({b['type'] for b in blocks})}")
            clips = [load_clip(b, image_patch_size) for b in blocks]
            return None, [(c.frames, c.metadata) for c in clips] or None, None

    # pickled by reference, as finger_reward.integrations.verl_evaluator.FingerVideoDataset
    FingerVideoDataset.__module__, FingerVideoDataset.__qualname__ = __name__, "FingerVideoDataset"
    return FingerVideoDataset
