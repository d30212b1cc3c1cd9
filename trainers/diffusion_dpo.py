"""Diffusion-DPO for flow-matching text-to-video transformers (Wan, LTX-Video), training a LoRA policy.

The algorithm (Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization",
CVPR 2024), in the rectified-flow form of `trainers/flow_matching.py`:

1. Encode once. Every pair's chosen (w) and rejected (l) video goes through the pipeline's VAE and
   its prompt through the text encoder; the latents and text states are cached in memory, so
   neither encoder runs during training.
2. Each step, per pair: one noise level sigma ~ sigmoid(N(sigma_mean, sigma_std)) (logit-normal)
   and one noise tensor n, shared by both videos: x_t = sigma n + (1 - sigma) x0, target v = n - x0.
3. The policy (transformer + LoRA) and the reference (the same transformer with its adapter
   disabled, so no second copy in memory) predict v for both videos; err = per-sample mean
   squared velocity error.
4. loss = -log sigmoid(-beta/2 ((err_w - err_l) - (ref_err_w - ref_err_l))): the policy is pushed
   to denoise the chosen video better, and the rejected one worse, than the reference does.

LoRA's B matrices start at zero, so the policy starts equal to the reference and the first
loss is exactly ln 2. Only the LoRA weights train; they are saved in diffusers' format, so
`pipe.load_lora_weights(output_dir)` applies them.

Pairs file: JSONL, one pair per line with at least "prompt", "chosen" and "rejected" (video
paths; relative paths are read from the pairs file's folder), as `finger_reward/dpo_pairs.py`
writes it. Other keys (scores, seeds) are ignored. Clips are read at the pipeline's frame rate
(`integrations.diffusers.pipeline_fps`: Wan 16, LTX-Video 24; a faster file is thinned to it).

Launch (one GPU):

    python -m finger_reward.trainers.diffusion_dpo --config configs/dpo_wan.yaml \
        --pairs_file runs/pairs/pairs.jsonl --output_dir runs/dpo_wan

Launch (8 GPUs, data parallel, one process per GPU; each process caches and trains on its share):

    accelerate launch --num_processes 8 -m finger_reward.trainers.diffusion_dpo \
        --config configs/dpo_wan.yaml --pairs_file runs/pairs/pairs.jsonl --output_dir runs/dpo_wan

Use the result:

    pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", dtype=torch.bfloat16)
    pipe.load_lora_weights("runs/dpo_wan")

Pipelines: WanPipeline (Wan2.1-T2V 1.3B / 14B, Wan2.2-TI2V-5B) and LTXPipeline (LTX-Video 0.9.x:
`--pretrained_model Lightricks/LTX-Video --height 480 --width 704 --num_frames 121
--max_sequence_length 128`); `trainers/video_models.py` holds what differs between them.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from finger_reward.errors import VideoError
from finger_reward.integrations.diffusers import pipeline_fps
from finger_reward.jsonl import read_jsonl
from finger_reward.recipes import from_yaml, parse_recipe, undo_yaml_coercion
from finger_reward.trainers.flow_matching import (
    MIXED_PRECISION,
    add_lora,
    add_noise,
    load_pipeline,
    logit_normal_sigmas,
    lora_parameters,
    save_lora,
    velocity_target,
)
from finger_reward.trainers.resume import CHECKPOINT_PREFIX, resume_training, save_training, start_log
from finger_reward.trainers.video_models import cat_texts, video_model
from finger_reward.video import load_video

logger = logging.getLogger(__name__)

PAIR_KEYS = ("prompt", "chosen", "rejected")


# ---- the loss ---------------------------------------------------------------------------------


def dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Diffusion-DPO loss (Wallace et al. 2024, Eq. 14) on per-sample squared errors, shape (B,).

        loss = -mean log sigmoid(-beta/2 * ((err_w - err_l) - (ref_err_w - ref_err_l)))

    err_* are the policy's and ref_err_* the reference's mean squared (velocity) errors on the
    chosen (w) and rejected (l) sample, noised with the same noise and sigma. The paper's constant
    T * omega(lambda_t) is folded into beta; the 1/2 is that of the paper's released code, where
    beta = 5000. Metrics (detached): the implicit rewards -beta/2 (err - ref_err) of each sample,
    their margin (the sigmoid's argument) and the implicit accuracy (share of pairs with margin > 0).
    """
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    shapes = {tuple(t.shape) for t in (err_w, err_l, ref_err_w, ref_err_l)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"errors must be four 1-D tensors of one shape (B,), got shapes {sorted(shapes)}")
    reward_w = -0.5 * beta * (err_w - ref_err_w)
    reward_l = -0.5 * beta * (err_l - ref_err_l)
    margin = reward_w - reward_l  # = -beta/2 ((err_w - err_l) - (ref_err_w - ref_err_l))
    loss = -F.logsigmoid(margin).mean()
    metrics = {
        "loss": loss, "implicit_accuracy": (margin > 0).float().mean(), "rewards/chosen": reward_w.mean(),
        "rewards/rejected": reward_l.mean(), "rewards/margin": margin.mean(), "err/chosen": err_w.mean(),
        "err/rejected": err_l.mean(), "ref_err/chosen": ref_err_w.mean(), "ref_err/rejected": ref_err_l.mean(),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


# ---- the recipe -------------------------------------------------------------------------------


@dataclass
class DPORecipe:
    """Every setting of a Diffusion-DPO run; `configs/dpo_wan.yaml` sets them for Wan2.1-T2V-1.3B."""

    pretrained_model: str = field(default="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                                  metadata={"help": "diffusers pipeline folder or hub id (WanPipeline or LTXPipeline)"})
    pairs_file: str | None = field(default=None, metadata={"help": "pairs.jsonl with prompt, chosen, rejected (required)"})
    output_dir: str | None = field(default=None, metadata={"help": "where the LoRA and checkpoint-N/ go (required)"})
    beta: float = field(default=5000.0, metadata={
        "help": "DPO strength; 5000 as Diffusion-DPO's released recipes (errors are means over latent elements, "
                "so differences are small and beta is in the thousands); lower it if the policy drifts"})
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate of the LoRA weights"})
    lr_warmup_steps: int = field(default=0, metadata={"help": "linear warm-up, in optimizer steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the LoRA gradient norm (0: no clipping)"})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank on the attention projections"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale alpha / rank)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout inside the LoRA branch"})
    batch_size: int = field(default=1, metadata={"help": "pairs per process per micro-step (2x videos per forward)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    num_frames: int = field(default=81, metadata={"help": "frames per video, 4k + 1 (LTX: 8k + 1); the first ones are kept"})
    height: int = field(default=480, metadata={"help": "frame height, a multiple of 16 (resize to cover, centre crop)"})
    width: int = field(default=832, metadata={"help": "frame width, a multiple of 16"})
    max_sequence_length: int = field(default=512, metadata={"help": "prompt tokens (WanPipeline's default 512)"})
    sigma_mean: float = field(default=0.0, metadata={"help": "mean of the logit-normal noise-level sampling"})
    sigma_std: float = field(default=1.0, metadata={"help": "std of the logit-normal noise-level sampling"})
    seed: int = field(default=0, metadata={"help": "seed of LoRA init, pair order, noise and sigmas"})
    mixed_precision: str = field(default="no", metadata={
        "help": "no, fp16 or bf16: frozen weights load in that dtype (VAE stays float32), LoRA weights stay float32"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations to save memory"})
    save_steps: int = field(default=250, metadata={"help": "save the LoRA to checkpoint-N/ every N steps (0: only at the end)"})
    logging_steps: int = field(default=10, metadata={"help": "log metrics every N steps"})
    report_to: str = field(default="none", metadata={"help": "accelerate tracker: none, tensorboard, wandb, ..."})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "continue exactly from a checkpoint-N folder of an earlier run (or 'last': the newest in output_dir)"})

    def __post_init__(self):
        undo_yaml_coercion(self)
        if self.num_frames < 1 or self.num_frames % 4 != 1:
            raise ValueError(f"num_frames={self.num_frames} must be 4k + 1 (Wan's VAE compresses time 4x after "
                             "the first frame): use e.g. 5, 33, 49 or 81")
        if self.height < 16 or self.width < 16 or self.height % 16 or self.width % 16:
            raise ValueError(f"height={self.height} and width={self.width} must be multiples of 16 (VAE 8x, patch 2x)")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision={self.mixed_precision!r}; expected one of {', '.join(MIXED_PRECISION)}")
        positive = ("beta", "learning_rate", "lora_rank", "lora_alpha", "batch_size", "gradient_accumulation_steps",
                    "max_steps", "sigma_std", "logging_steps", "max_sequence_length")
        bad = [f"{name}={getattr(self, name)}" for name in positive if not getattr(self, name) > 0]
        bad += [f"{name}={getattr(self, name)}" for name in ("lr_warmup_steps", "weight_decay", "max_grad_norm",
                                                              "save_steps") if getattr(self, name) < 0]
        if not 0 <= self.lora_dropout < 1:
            bad.append(f"lora_dropout={self.lora_dropout}")
        if bad:
            raise ValueError(f"out of range: {', '.join(bad)}; rates, sizes and counts must be positive, "
                             "warm-up, decay, clipping and save_steps non-negative, dropout in [0, 1)")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "DPORecipe":
        """Fields from a flat YAML file (unknown keys are an error naming the valid ones), then `overrides`."""
        return from_yaml(cls, path, **overrides)


# ---- data: pairs -> cached latents -------------------------------------------------------------


def read_pairs(path: str | Path) -> list[dict]:
    """The pairs of a JSONL file, with video paths made absolute (relative ones are read from its folder)."""
    path = Path(path)
    pairs = []
    for where, record in read_jsonl(path, objects=True):
        missing = [k for k in PAIR_KEYS if k not in record]
        if missing:
            raise ValueError(f"{where}: missing key(s) {', '.join(missing)}; each pair needs {', '.join(PAIR_KEYS)}")
        pair = {"prompt": str(record["prompt"])}
        for key in ("chosen", "rejected"):
            video = Path(record[key])
            pair[key] = str(video if video.is_absolute() else path.parent / video)
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"{path} holds no pairs")
    return pairs


def load_clip(path: str, num_frames: int, height: int, width: int, fps: float | None = None) -> torch.Tensor:
    """A video file as float (C, F, H, W) in [-1, 1]: its first `num_frames` frames at `fps`, resized to cover
    height x width (aspect kept) and centre-cropped. A shorter clip is an error, never padded.

    `fps` is the generator's frame rate (`pipeline_fps`: Wan 16, LTX-Video 24): a faster file is thinned to it
    (evenly spaced frames), so the policy learns motion at the speed it renders; a slower file keeps every frame
    (logged once per rate, as its motion will look faster). None: every frame of the file, as it is."""
    clip = load_video(path, fps=fps or 1e6, max_frames=1 << 30, max_pixels=1 << 40, patch_factor=1)
    if fps is not None and clip.fps < fps * 0.99:
        _warn_slow_clip(round(clip.fps, 3), fps)
    frames = clip.frames
    if frames.shape[0] < num_frames:
        raise VideoError(path, f"has {frames.shape[0]} frames; num_frames={num_frames} needs at least that many: "
                               "lower num_frames (4k + 1) or regenerate the pairs")
    frames = frames[:num_frames].float()
    h, w = frames.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        frames = F.interpolate(frames, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    frames = frames[..., top:top + height, left:left + width]
    return (frames / 127.5 - 1).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()


@functools.lru_cache(maxsize=None)
def _warn_slow_clip(clip_fps: float, fps: float) -> None:
    logger.warning("pair videos at %g fps are slower than the pipeline's %g fps: every frame is kept, so their motion "
                   "trains %.2gx faster; generate pairs at the pipeline's rate (select-pairs does)", clip_fps, fps,
                   fps / clip_fps)


@torch.no_grad()
def cache_pairs(model, pairs: list[dict], recipe: DPORecipe, show_progress: bool = True,
                fps: float | None = None) -> list[dict]:
    """VAE latents of each pair's two videos (read at `fps`, see `load_clip`) and the prompt's text inputs, computed
    once, kept on the CPU."""
    cache, prompt_texts = [], {}
    for pair in tqdm(pairs, desc="encoding pairs", disable=not show_progress):
        videos = torch.stack([load_clip(pair[k], recipe.num_frames, recipe.height, recipe.width, fps)
                              for k in ("chosen", "rejected")])
        latents = model.encode_videos(videos).float().cpu()
        if pair["prompt"] not in prompt_texts:
            text = model.encode_prompts([pair["prompt"]], recipe.max_sequence_length)
            prompt_texts[pair["prompt"]] = {key: value[0].cpu() for key, value in text.items()}
        cache.append({"chosen": latents[0], "rejected": latents[1], "text": prompt_texts[pair["prompt"]]})
    return cache


def collate(items: list[dict], device) -> dict:
    """Cached pairs as one batch on `device` (the text inputs stay a dict)."""
    batch = {key: torch.stack([item[key] for item in items]).to(device) for key in ("chosen", "rejected")}
    batch["text"] = {key: torch.stack([item["text"][key] for item in items]).to(device) for key in items[0]["text"]}
    return batch


class PairOrder:
    """Endless batches of pair indices: shuffled epochs, each pair once per epoch (a last partial batch dropped);
    its position goes into checkpoints, so a resumed run sees the pairs the straight run would have."""

    def __init__(self, num_items: int, batch_size: int, generator: torch.Generator):
        self.num_items, self.batch_size, self.generator = num_items, batch_size, generator
        self.order: list[int] = []
        self.position = 0

    def __next__(self) -> list[int]:
        if self.position + self.batch_size > len(self.order):
            self.order, self.position = torch.randperm(self.num_items, generator=self.generator).tolist(), 0
        self.position += self.batch_size
        return self.order[self.position - self.batch_size:self.position]

    def state_dict(self) -> dict:
        return {"order": list(self.order), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.order, self.position = list(state["order"]), state["position"]


# ---- one step's errors -------------------------------------------------------------------------


@contextmanager
def adapters_disabled(transformer):
    """The reference model: the same transformer with its LoRA switched off (re-enabled, trainable, after)."""
    transformer.disable_adapters()
    try:
        yield transformer
    finally:
        transformer.enable_adapters()


def pair_errors(model, transformer, batch: dict, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean squared velocity errors (err_w, err_l): both videos noised with the same noise and sigma,
    predicted in one forward pass of 2B videos."""
    latents = torch.cat([batch["chosen"], batch["rejected"]])
    noise, sigmas = torch.cat([noise, noise]), torch.cat([sigmas, sigmas])
    pred = model.velocity(transformer, add_noise(latents, noise, sigmas), sigmas, cat_texts([batch["text"]] * 2))
    err = (pred.float() - velocity_target(latents, noise).float()).pow(2).flatten(1).mean(1)
    return err.chunk(2)


# ---- saving ------------------------------------------------------------------------------------



# ---- the loop ----------------------------------------------------------------------------------


def train(recipe: DPORecipe, *, pipe=None) -> dict:
    """Run Diffusion-DPO; returns {"history": one metrics dict per optimizer step, "output_dir": ...}.

    `pipe`: an already-loaded pipeline to train in place (its transformer gets the LoRA; its dtype is
    used as it is); None loads `recipe.pretrained_model` with the recipe's mixed-precision dtype.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if recipe.pairs_file is None or recipe.output_dir is None:
        raise ValueError("pairs_file and output_dir are required: pass --pairs_file PAIRS.jsonl --output_dir DIR")
    output_dir = Path(recipe.output_dir)
    accelerator = Accelerator(mixed_precision=recipe.mixed_precision,
                              gradient_accumulation_steps=recipe.gradient_accumulation_steps,
                              log_with=None if recipe.report_to == "none" else recipe.report_to, project_dir=output_dir)
    set_seed(recipe.seed)
    main_process = accelerator.is_main_process

    # 1. The pipeline, and every pair encoded once (each process encodes and trains on its share).
    if pipe is None:
        pipe = load_pipeline(recipe.pretrained_model, MIXED_PRECISION[recipe.mixed_precision])
    video = video_model(pipe, num_frames=recipe.num_frames, height=recipe.height, width=recipe.width)
    fps = pipeline_fps(pipe)  # the clips are read at the rate the policy renders
    pipe.set_progress_bar_config(disable=True)
    pipe.to(accelerator.device)
    pairs = read_pairs(recipe.pairs_file)
    if len(pairs) < recipe.batch_size * accelerator.num_processes:
        raise ValueError(f"{len(pairs)} pairs cannot fill batch_size={recipe.batch_size} on "
                         f"{accelerator.num_processes} process(es); lower batch_size or add pairs")
    with accelerator.split_between_processes(pairs) as own_pairs:
        cache = cache_pairs(video, own_pairs, recipe, show_progress=main_process, fps=fps)
    pipe.text_encoder.to("cpu")  # the cache holds all that training needs from the encoders
    pipe.vae.to("cpu")

    # 2. The policy: a LoRA on the transformer (float32 weights); the reference is the same model, adapter off.
    transformer = add_lora(pipe.transformer, rank=recipe.lora_rank, alpha=recipe.lora_alpha, dropout=recipe.lora_dropout)
    params = lora_parameters(transformer)
    for p in params:
        p.data = p.data.float()
    if recipe.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (recipe.lr_warmup_steps + 1)))
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    model = accelerator.unwrap_model(transformer)
    if recipe.report_to != "none":
        accelerator.init_trackers("diffusion_dpo", config=asdict(recipe))

    # 3. The loop: same noise and sigma for chosen and rejected; DPO loss against the adapter-free reference.
    generator = torch.Generator().manual_seed(recipe.seed + accelerator.process_index)
    order = PairOrder(len(cache), recipe.batch_size, generator)
    loop = {"optimizer": optimizer, "scheduler": warmup, "order": order, "generator": generator}
    history = []
    if recipe.resume_from_checkpoint:
        history = resume_training(recipe.resume_from_checkpoint, output_dir, accelerator.process_index, model, loop)
    first = len(history) + 1
    if main_process:  # one line per optimizer step (finger-reward plot-training reads it)
        start_log(output_dir / "metrics.jsonl", history)
    progress = tqdm(range(first, recipe.max_steps + 1), initial=first - 1, total=recipe.max_steps,
                    desc="diffusion-dpo", disable=not main_process)
    for step in progress:
        start = time.perf_counter()
        step_metrics = []
        for _ in range(recipe.gradient_accumulation_steps):
            items = [cache[i] for i in next(order)]
            batch = collate(items, accelerator.device)
            noise = torch.randn(batch["chosen"].shape, generator=generator).to(accelerator.device)
            sigmas = logit_normal_sigmas(len(items), mean=recipe.sigma_mean, std=recipe.sigma_std,
                                         generator=generator).to(accelerator.device)
            with accelerator.accumulate(transformer):
                with torch.no_grad(), adapters_disabled(model), accelerator.autocast():
                    ref_err_w, ref_err_l = pair_errors(video, model, batch, noise, sigmas)
                with accelerator.autocast():
                    err_w, err_l = pair_errors(video, transformer, batch, noise, sigmas)
                loss, metrics = dpo_loss(err_w, err_l, ref_err_w, ref_err_l, recipe.beta)
                accelerator.backward(loss)
                if accelerator.sync_gradients and recipe.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, recipe.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_metrics.append(torch.stack(list(metrics.values())))
        warmup.step()
        values = accelerator.reduce(torch.stack(step_metrics).mean(0).to(accelerator.device), reduction="mean")
        record = {"step": step, "lr": warmup.get_last_lr()[0], **dict(zip(metrics, values.tolist())),
                  "time/step_s": time.perf_counter() - start}
        history.append(record)
        if main_process:
            with open(output_dir / "metrics.jsonl", "a", encoding="utf-8") as log:
                log.write(json.dumps(record) + "\n")
        progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['implicit_accuracy']:.2f}")
        if step % recipe.logging_steps == 0 or step == recipe.max_steps:
            accelerator.log(record, step=step)
            if main_process:
                logger.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step"))
        if recipe.save_steps and step % recipe.save_steps == 0 and step < recipe.max_steps:
            checkpoint = output_dir / f"{CHECKPOINT_PREFIX}-{step}"
            if main_process:
                save_lora(type(pipe), model, checkpoint)
            save_training(checkpoint, accelerator.process_index, model, history, loop)
            accelerator.wait_for_everyone()

    # 4. The LoRA, loadable by the pipeline, and the recipe that made it.
    accelerator.wait_for_everyone()
    if main_process:
        save_lora(type(pipe), model, output_dir)
        (output_dir / "dpo_recipe.json").write_text(json.dumps({**asdict(recipe), "video_fps": fps}, indent=2),
                                                    encoding="utf-8")
    accelerator.end_training()
    return {"history": history, "output_dir": str(output_dir)}


# ---- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> DPORecipe:
    """DPORecipe from `--config YAML` (optional) and `--field value` flags, which win over the YAML."""
    return parse_recipe(DPORecipe, argv)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = train(parse_args(argv))
    if result["history"]:
        last = result["history"][-1]
        logger.info("done: loss %.4f (ln 2 = %.4f at the start), LoRA in %s", last["loss"], math.log(2),
                    result["output_dir"])
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
