"""Supervised fine-tuning of the FingER evaluator (FingER Sec. 3.3.1-3.3.2, settings of Sec. 4.2).

The algorithm: plain next-token cross-entropy on FingER-Instruct, with the loss on the
completion only. The prompt is exactly the one the engine scores with (system turn, video at
2 fps under a 448x448 pixel budget, question, assistant header); the completion is either the
answer alone (`mode: answer`, "SFT") or `<reason>...</reason><answer>Yes|No</answer>`
(`mode: reason`, "SFT with reasoning", the cold start for GRPO), followed by the end-of-turn
token. Full fine-tuning by default; `--lora true` trains LoRA adapters (peft) on the language
model instead. Built on TRL's SFTTrainer with our own video collator
(`finger_reward.instruct.VideoSFTCollator`), since TRL prepares image datasets but not video.

Launch (one process, or one per GPU with accelerate/torchrun):

    python -m finger_reward.trainers.sft --config configs/sft_answer.yaml \
        --model Qwen/Qwen2.5-VL-7B-Instruct --data train.jsonl --output_dir out/sft_answer
    accelerate launch --num_processes 8 -m finger_reward.trainers.sft --config configs/sft_reason.yaml \
        --model Qwen/Qwen2.5-VL-7B-Instruct --data train.jsonl --eval_data val.jsonl --output_dir out/sft_reason

Every key of the YAML is a field of `SFTRecipe`; command-line flags override it. The paper's
global batch of 32 is per_device_train_batch_size x gradient_accumulation_steps x processes;
set `global_batch_size: 32` and the accumulation is derived from the number of processes
(8 GPUs x 1 x 4 = 32, 1 GPU x 1 x 32 = 32). Resume with `--resume_from_checkpoint last`
(the newest checkpoint in output_dir) or a checkpoint directory. With `--eval_data val.jsonl` the
eval loss is logged every eval_steps and, after training, the answer accuracy w/ and w/o prob
(`finger_reward.evaluation.heldout`) goes to output_dir/eval.json and the log.

Q-Save rating loss (Q-Save Sec. 4.2.2-4.2.3): with `--rating_loss_weight B` (Q-Save: 1) the loss
is CE + B * (r_hat - r_MOS)^2 on records that carry a `mos`, where r_hat = sum_j p_j w_j is the
rating expectation over the five levels read at the rating token (`scoring.rating_expectation`,
w = 0, 0.25, ..., 1 for Bad..Excellent) and r_MOS the MOS moved from [mos_min, mos_max] to [0, 1].
SFT cool-off (Q-Save stage 3) is this trainer on `python -m finger_reward.trainers.cooloff`'s
output: configs/sft_cooloff.yaml.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from finger_reward.instruct import VideoSFTCollator
from finger_reward.preference import PreferenceRecord, load_training_records
from finger_reward.pretrained import as_slowfast, slowfast_threshold, write_scoring_defaults
from finger_reward.prompts import MODES
from finger_reward.recipes import parse_recipe
from finger_reward.rope import with_rope_positions
from finger_reward.scoring import rating_expectation
from finger_reward.trainers import fsdp

logger = logging.getLogger(__name__)

LANGUAGE_MODEL_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class SFTRecipe:
    """Everything an SFT run needs; loadable from a flat YAML (configs/sft_*.yaml) with CLI overrides."""

    model: str | None = field(default=None, metadata={"help": "checkpoint directory or hub id of a Qwen2.5-VL / Qwen3-VL model"})
    data: str | None = field(default=None, metadata={"help": "FingER-Instruct JSONL for training (question fields, video, answer, reason); "
                                                                 "VQ-Insight preference lines (video, video_b, preferred, reason) may be mixed in"})
    eval_data: str | None = field(default=None, metadata={"help": "FingER-Instruct JSONL: eval loss every eval_steps, and answer accuracy "
                                                                      "(w/ and w/o prob) after training to output_dir/eval.json (optional)"})
    mode: str = field(default="answer", metadata={"help": "completion to learn: 'answer' (Yes/No) or 'reason' (<reason>..</reason><answer>..</answer>)"})

    lora: bool = field(default=False, metadata={"help": "train LoRA adapters (peft) instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: str = field(
        default=LANGUAGE_MODEL_LINEARS,
        metadata={"help": "peft target_modules: a regex over full module names (default: the language model's "
                          "attention and MLP linears; the vision tower's MLP uses the same short names), or 'all-linear'"},
    )
    freeze_vision: bool = field(default=False, metadata={"help": "full fine-tuning only: keep the vision tower fixed (LLaMA-Factory's default; the paper does not say)"})

    fps: float = field(default=2.0, metadata={"help": "frames per second sampled from each video (paper: 2), as the engine samples"})
    max_pixels: int = field(default=448 * 448, metadata={"help": "pixel budget per frame, H x W (paper: 448 x 448 = 200704)"})
    max_frames: int = field(default=48, metadata={"help": "at most this many frames per video, evenly spread"})
    slowfast: float | None = field(default=None, metadata={"help": "Q-Save SlowFast frames with this patch similarity threshold in "
                                                                     "(0, 1] (Q-Save: 0.9), as scoring samples them; None: plain frames. "
                                                                     "Written to finger_reward.json, so scoring follows"})
    clip_cache: int = field(default=0, metadata={"help": "keep this many decoded videos in memory (0: decode every time); for small data sets trained for many epochs"})

    model_dtype: str = field(
        default="float32",
        metadata={"help": f"dtype of the loaded weights, one of {DTYPES}; keep float32 master weights with bf16 "
                          "autocast for full fine-tuning (a 5e-6 step vanishes in bf16 rounding); bfloat16 suits LoRA"},
    )
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute activations in backward to save memory (TRL's default)"})
    learning_rate: float = field(default=5.0e-6, metadata={"help": "AdamW peak learning rate (paper: 5e-6)"})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "examples per device per micro-step (also the eval batch size)"})
    gradient_accumulation_steps: int | None = field(
        default=None,
        metadata={"help": "micro-steps per optimizer step; default: derived from global_batch_size, else 1"},
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={"help": "examples per optimizer step over all processes (paper: 32); must equal "
                          "per_device_train_batch_size x gradient_accumulation_steps x processes"},
    )
    num_train_epochs: float = field(default=2.0, metadata={"help": "passes over the data (paper: 2)"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many optimizer steps (overrides num_train_epochs when > 0)"})
    output_dir: str = field(default="out/sft", metadata={"help": "checkpoints and the final model go here"})
    seed: int = field(default=42, metadata={"help": "seed for data order, LoRA init and dropout"})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (needs a GPU with bf16 support)"})
    logging_steps: int = field(default=10, metadata={"help": "log loss, token accuracy and entropy every N steps"})
    save_steps: int = field(default=500, metadata={"help": "save a checkpoint every N optimizer steps"})
    eval_steps: int | None = field(default=None, metadata={"help": "evaluate on eval_data every N steps (default: save_steps)"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "processes decoding videos for the data loader (0: in the main process)"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint directory, or 'last' for the newest in output_dir"})
    eval_max_new_tokens: int = field(default=256, metadata={"help": "reason mode: most tokens of each greedy reason in the accuracy evaluation"})
    rating_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Q-Save's beta_1: weight of the MSE between the rating expectation at the rating token and the "
                          "record's MOS, added to the CE loss (Q-Save: 1); 0 = plain SFT. Needs records with 'mos'"},
    )
    mos_min: float = field(default=1.0, metadata={"help": "lowest MOS of the data's scale (Q-Save: 1); the MSE target is (mos - mos_min) / (mos_max - mos_min)"})
    mos_max: float = field(default=5.0, metadata={"help": "highest MOS of the data's scale (Q-Save: 5)"})
    report_to: str = field(default="none", metadata={"help": "logging integrations, as TrainingArguments.report_to ('none', 'wandb', 'tensorboard', ...)"})

    def __post_init__(self):
        if self.model is None or self.data is None:
            raise ValueError("SFTRecipe needs `model` and `data`: pass --model PATH --data train.jsonl (or set them in the YAML)")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {MODES}")
        if self.model_dtype not in DTYPES:
            raise ValueError(f"model_dtype={self.model_dtype!r} is not one of {DTYPES}")
        if self.lora and (self.lora_r < 1 or not 0 <= self.lora_dropout < 1):
            raise ValueError(f"need lora_r >= 1 and 0 <= lora_dropout < 1; got {self.lora_r}, {self.lora_dropout}")
        if self.lora and self.freeze_vision:
            raise ValueError("freeze_vision applies to full fine-tuning; with lora=true only the adapters train already")
        if not self.fps > 0 or self.max_frames < 1 or self.max_pixels < 1:
            raise ValueError(f"need fps > 0, max_frames >= 1, max_pixels >= 1; got {self.fps}, {self.max_frames}, {self.max_pixels}")
        slowfast_threshold(self.slowfast)
        if self.per_device_train_batch_size < 1:
            raise ValueError(f"per_device_train_batch_size must be at least 1, got {self.per_device_train_batch_size}")
        if self.gradient_accumulation_steps is not None and self.gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be at least 1, got {self.gradient_accumulation_steps}")
        if not self.rating_loss_weight >= 0 or not self.mos_min < self.mos_max:
            raise ValueError(f"need rating_loss_weight >= 0 and mos_min < mos_max; got {self.rating_loss_weight}, "
                             f"{self.mos_min}, {self.mos_max}")
        if self.eval_max_new_tokens < 1:
            raise ValueError(f"eval_max_new_tokens must be at least 1, got {self.eval_max_new_tokens}")

    def accumulation_steps(self, num_processes: int) -> int:
        """Gradient accumulation so that per-device batch x accumulation x processes = global_batch_size."""
        per_step = self.per_device_train_batch_size * num_processes
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps or 1
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of per_device_train_batch_size "
                f"({self.per_device_train_batch_size}) x processes ({num_processes}); change one of them"
            )
        derived = self.global_batch_size // per_step
        if self.gradient_accumulation_steps not in (None, derived):
            raise ValueError(
                f"gradient_accumulation_steps={self.gradient_accumulation_steps} gives a global batch of "
                f"{per_step * self.gradient_accumulation_steps}, not global_batch_size={self.global_batch_size}; "
                f"set one of them (here {derived} steps match)"
            )
        return derived


# ---- 1. data: FingER-Instruct records as a datasets.Dataset ------------------------------------


def instruct_dataset(path: str, mode: str, *, need_mos: bool = False):
    """Validate every line up front (errors name the file and line), then hand TRL a Dataset of rows.

    Question lines, VQ-Insight preference lines (two videos, `preferred`) or a mix of both
    (`preference.load_training_records`), as GRPO reads them; a preference row learns the two-video
    prompt's answer A/B (with its reason in reason mode)."""
    records = load_training_records(path, mode=mode)
    pairs = sum(isinstance(r, PreferenceRecord) for r in records)
    logger.info("%s: %d examples (%d preference pairs) about %d videos", path, len(records), pairs,
                len({v for r in records for v in getattr(r, "videos", (r.video,))}))
    if need_mos and all(getattr(r, "mos", None) is None for r in records):
        raise ValueError(f"rating_loss_weight > 0 but no record of {path} has a 'mos'; add the MOS of rating "
                         "questions (Q-Save) or set rating_loss_weight to 0")
    rows = [r.to_dict() for r in records]
    columns = list(dict.fromkeys(key for row in rows for key in row))  # from_list keeps the first row's keys only
    return Dataset.from_list([{key: row.get(key) for key in columns} for row in rows])


# ---- 2. model: full fine-tuning, frozen vision tower, or LoRA -----------------------------------


def load_model(recipe: SFTRecipe):
    model = AutoModelForImageTextToText.from_pretrained(recipe.model, dtype=getattr(torch, recipe.model_dtype))
    if recipe.freeze_vision:
        model.model.visual.requires_grad_(False)
    return model, AutoProcessor.from_pretrained(recipe.model)


def lora_config(recipe: SFTRecipe):
    if not recipe.lora:
        return None
    from peft import LoraConfig

    return LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                      target_modules=recipe.lora_target_modules, task_type="CAUSAL_LM")


# ---- 3. trainer: TRL SFTTrainer fed by the video collator ----------------------------------------


def sft_config(recipe: SFTRecipe, has_eval: bool) -> SFTConfig:
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = recipe.accumulation_steps(processes)
    logger.info("global batch %d = %d per device x %d accumulation x %d processes",
                recipe.per_device_train_batch_size * accumulation * processes,
                recipe.per_device_train_batch_size, accumulation, processes)
    return SFTConfig(
        output_dir=recipe.output_dir,
        learning_rate=recipe.learning_rate,
        per_device_train_batch_size=recipe.per_device_train_batch_size,
        per_device_eval_batch_size=recipe.per_device_train_batch_size,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=recipe.num_train_epochs,
        max_steps=recipe.max_steps,
        seed=recipe.seed,
        bf16=recipe.bf16,
        logging_steps=recipe.logging_steps,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=(recipe.eval_steps or recipe.save_steps) if has_eval else None,
        gradient_checkpointing=recipe.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},  # the variant FSDP2 supports
        dataloader_num_workers=recipe.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning needs an accelerator
        report_to=recipe.report_to,
        # The collator builds input_ids, labels and video tensors from the raw rows: keep every
        # column, skip TRL's text preparation and truncation (cutting video tokens breaks the model).
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        # Eval needs only the loss; without this the Trainer gathers full-vocabulary logits.
        prediction_loss_only=True,
    )


def rating_loss(logits: torch.Tensor, targets: torch.Tensor, level_ids: list[int]) -> torch.Tensor:
    """Q-Save's L_MSE = (r_hat - r_MOS)^2, mean over rows: `logits` (rows, vocab) at the positions that
    predict the rating token, `targets` the MOS on [0, 1]; r_hat is `scoring.rating_expectation`."""
    return ((rating_expectation(logits, level_ids) - targets.to(logits.device).float()) ** 2).mean()


class _LastHiddenState:
    """Keeps the first output of a backbone (its `last_hidden_state`) seen while the context is open.

    TRL's fused LM head returns log-probabilities only, never logits; the rating loss needs the
    logits at one position per row, which are the LM head applied to these hidden states.
    """

    def __init__(self, backbone: torch.nn.Module):
        self.backbone, self.value = backbone, None

    def _keep(self, module, args, output):
        if self.value is None:
            self.value = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def __enter__(self):
        self.handle = self.backbone.register_forward_hook(self._keep)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class VideoSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer, resuming full-model checkpoints through `from_pretrained`, with Q-Save's
    optional rating loss (`rating_loss_weight`; the collator must be built with `mos_range`).

    transformers 5.10 saves Qwen2.5-VL under its original key names (`visual.*`, `model.layers.*`),
    but `Trainer._load_from_checkpoint` feeds them to `load_state_dict(strict=False)` of a model
    whose keys are `model.visual.*`, `model.language_model.*`: nothing loads, a warning lists the
    keys, and training silently continues from the base weights with the restored optimizer
    (QwenLM/Qwen3-VL#1763, modelscope/ms-swift#7947). `from_pretrained` applies the renaming.
    LoRA adapters and FSDP checkpoints keep the Trainer's own loading; DeepSpeed never comes here.
    """

    def __init__(self, *args, rating_loss_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        if self.is_fsdp_enabled:
            # Under accelerate's FSDP config (configs/accelerate_fsdp.yaml) the model is sharded here, as the
            # GRPO loop shards it (trainers/fsdp.py); accelerate then takes it as it is. accelerate 1.16's own
            # FSDP2 wrapping gives lm_head a gradient that differs from the unsharded one (cosine 0.76 on the
            # tiny model; every other weight agrees); this sharding matches plain data parallelism.
            fsdp.shard(self.model, compute_dtype=torch.bfloat16 if self.args.bf16 else None)
        self.rating_loss_weight = rating_loss_weight
        self.rating_ids = getattr(self.data_collator, "rating_ids", None)
        if rating_loss_weight > 0 and self.rating_ids is None:
            raise ValueError("rating_loss_weight > 0 needs a VideoSFTCollator built with mos_range=(low, high)")

    def _causal_lm(self, model):
        from peft import PeftModel

        model = self.accelerator.unwrap_model(model)
        return model.get_base_model() if isinstance(model, PeftModel) else model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's SFT loss (CE on the completion), plus `rating_loss_weight` x Q-Save's rating MSE.

        The forward takes the original model's rope positions (`finger_reward.rope`), as scoring does.
        """
        inputs = with_rope_positions(self._causal_lm(model).config, inputs)
        positions, targets = inputs.pop("rating_positions", None), inputs.pop("rating_targets", None)
        if positions is None or self.rating_loss_weight == 0:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        causal_lm = self._causal_lm(model)
        with _LastHiddenState(causal_lm.base_model) as hidden:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        rows = (positions >= 0).nonzero().squeeze(-1)
        if len(rows):
            lm_head = causal_lm.get_output_embeddings()
            states = hidden.value[rows, positions[rows] - 1]  # the position whose logits predict the rating token
            mse = rating_loss(lm_head(states.to(lm_head.weight.dtype)), targets[rows], self.rating_ids)
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["rating_mse"].append(mse.item())  # this process's rows (a batch may have none)
            term = self.rating_loss_weight * mse
            # Like TRL's MoE aux loss: when the Trainer leaves accumulation to the loss, average over it.
            if num_items_in_batch is not None and (self.model_accepts_loss_kwargs or self.compute_loss_func is not None):
                term = term / self.current_gradient_accumulation_steps
            loss = loss + term
        return (loss, result[1]) if return_outputs else loss

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from peft import PeftModel

        model = self.model if model is None else model
        if isinstance(model, PeftModel) or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = type(model).from_pretrained(resume_from_checkpoint, dtype=model.dtype)
        model.load_state_dict(saved.state_dict(), strict=True)


def build_trainer(recipe: SFTRecipe) -> VideoSFTTrainer:
    """The SFTTrainer for a recipe, not yet trained."""
    rating = recipe.rating_loss_weight > 0
    train_dataset = instruct_dataset(recipe.data, recipe.mode, need_mos=rating)
    eval_dataset = instruct_dataset(recipe.eval_data, recipe.mode) if recipe.eval_data else None
    model, processor = load_model(recipe)
    collator = VideoSFTCollator(processor, recipe.mode, fps=recipe.fps, max_frames=recipe.max_frames,
                                max_pixels=recipe.max_pixels, slowfast=as_slowfast(recipe.slowfast),
                                mos_range=(recipe.mos_min, recipe.mos_max) if rating else None,
                                clip_cache=recipe.clip_cache)
    return VideoSFTTrainer(
        model=model,
        args=sft_config(recipe, eval_dataset is not None),
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=lora_config(recipe),
        rating_loss_weight=recipe.rating_loss_weight,
    )


def evaluate_accuracy(trainer: VideoSFTTrainer, recipe: SFTRecipe) -> dict | None:
    """Answer accuracy w/ and w/o prob on recipe.eval_data (main process only): output_dir/eval.json and the log.

    Rating records (with `mos`) and preference pairs have no Yes/No answer; a file holding them is
    skipped with a warning (its eval loss is still logged)."""
    from finger_reward.evaluation.heldout import eval_metrics, evaluate_instruct, write_eval

    if not trainer.is_world_process_zero():
        return None
    if any(getattr(r, "mos", None) is not None or isinstance(r, PreferenceRecord)
           for r in load_training_records(recipe.eval_data)):
        logger.warning("%s holds rating records (with 'mos') or preference pairs; answer accuracy is for Yes/No "
                       "questions, skipped", recipe.eval_data)
        return None
    result = evaluate_instruct(trainer.model, recipe.eval_data, processor=trainer.processing_class, mode=recipe.mode,
                               max_new_tokens=recipe.eval_max_new_tokens, fps=recipe.fps,
                               max_frames=recipe.max_frames, max_pixels=recipe.max_pixels,
                               slowfast=as_slowfast(recipe.slowfast))
    write_eval(result, Path(recipe.output_dir) / "eval.json")
    trainer.log(eval_metrics(result))
    return result


def train(recipe: SFTRecipe):
    """Train, save the final model (or adapter) and processor to output_dir, return the trainer."""
    trainer = build_trainer(recipe)
    resume = recipe.resume_from_checkpoint
    if resume == "last":
        resume = get_last_checkpoint(recipe.output_dir)
        if resume is None:
            raise ValueError(f"resume_from_checkpoint='last' but {recipe.output_dir} holds no checkpoint-* folder")
    trainer.train(resume_from_checkpoint=resume)
    if trainer.is_fsdp_enabled:  # checkpoints stay sharded; the final model is written whole, as scoring loads it
        state = fsdp.full_state_dict(trainer.model)  # every process takes part; process 0 gets the whole
        if trainer.is_world_process_zero():
            trainer.model.save_pretrained(recipe.output_dir, state_dict=state)
            trainer.processing_class.save_pretrained(recipe.output_dir)
    else:
        trainer.save_model(recipe.output_dir)
    # How the model is to be asked: FingerReward.from_pretrained reads it (finger_reward.pretrained).
    write_scoring_defaults(recipe.output_dir, mode=recipe.mode, fps=recipe.fps, max_frames=recipe.max_frames,
                           max_pixels=recipe.max_pixels, slowfast=recipe.slowfast)
    if recipe.eval_data:
        evaluate_accuracy(trainer, recipe)
    return trainer


def main(argv: list[str] | None = None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return train(parse_recipe(SFTRecipe, argv))


if __name__ == "__main__":
    main()
