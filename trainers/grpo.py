"""GRPO for the evaluator (FingER Sec. 3.3.3, Eq. 5-11; settings of Sec. 4.2): Zero-GRPO and GRPO with cold start.

For each FingER-Instruct record (a question about a video) the policy samples a group of G
completions `<reason>...</reason><answer>Yes|No</answer>` from the engine's own prompt (reason
mode: system turn, video at 2 fps under a 448x448 pixel budget, question, assistant header). Each
completion is rewarded with `accuracy_reward + format_reward` (Eq. 9-11, `finger_reward.rewards`),
rewards are normalised within the group (Eq. 8), and the policy minimises the clipped surrogate
with a KL penalty to the frozen starting model (Eq. 5-7):

    loss = 1/G sum_i 1/|o_i| sum_t [ -min(r_it A_i, clip(r_it, 1-eps, 1+eps) A_i) + beta KL_it ]
    r_it = pi(o_it | v, q, o_i<t) / pi_old(o_it | ...),   KL_it = pi_ref/pi - log(pi_ref/pi) - 1

(token-level, as DeepSeekMath and TRL write Eq. 5). Paper: G=16, beta=0.04, epsilon=0.2, mu=1,
lr 5e-7, 2k steps. Zero-GRPO starts from the base model (configs/grpo_zero.yaml), GRPO with cold
start from the SFT-with-reasons checkpoint (configs/grpo_coldstart.yaml); nothing else differs.

Why a loop of our own rather than TRL's GRPOTrainer: TRL 1.16 passes video blocks to generation,
but `_generate_and_score_completions` / `_get_per_token_logps_and_entropies` forward only the image
fields (pixel_values, image_grid_thw, ...) to the log-probability pass, and rebuild
mm_token_type_ids only when image_grid_thw is present; with a video the policy gradient is taken
on the text alone and silently ignores the clip. Patching that needs overrides of both
`_generate_and_score_completions` (hundreds of lines) and `_get_per_token_logps_and_entropies`,
plus TRL's image-only batch splitting (`split_pixel_values_by_grid`). This module instead keeps
one small loop that feeds every forward pass (generation, old/reference log-probabilities, the
loss) the same processor output the engine scores with, `pixel_values_videos`, `video_grid_thw`,
`second_per_grid_ts` and `mm_token_type_ids` included, and reuses TRL's pieces: `GRPOConfig` holds
the hyper-parameters (`trainer.args`), rewards have TRL's reward-function shape, and metrics use
TRL's names (`reward`, `reward_std`, `rewards/<name>/mean`, `kl`, `clip_ratio/region_mean`,
`completions/mean_length`, ...).

Launch (one process, on the GPU when there is one):

    python -m finger_reward.trainers.grpo --config configs/grpo_zero.yaml \
        --model Qwen/Qwen2.5-VL-7B-Instruct --data train.jsonl --output_dir out/grpo_zero
    python -m finger_reward.trainers.grpo --config configs/grpo_coldstart.yaml \
        --model out/sft_reason --data train.jsonl --output_dir out/grpo_coldstart

Data-parallel on N GPUs (`trainers/data_parallel.py`): every process samples and scores its own
questions, the gradients are averaged, the main process writes logs and checkpoints (with one
rng_state_<rank>.pth per process, as HF Trainer):

    torchrun --nproc_per_node 8 -m finger_reward.trainers.grpo --config configs/grpo_coldstart.yaml ...

Every key of the YAML is a field of `GRPORecipe` (trainers/grpo_recipe.py); command-line flags override it. Metrics go to
`output_dir/log.jsonl` (one line per logging step), the sampled completions with their rewards and
question fields to `output_dir/completions.jsonl` (the input of the SFT cool-off,
`finger_reward.trainers.cooloff`), checkpoints to `output_dir/checkpoint-N`, the final model to
`output_dir`. A checkpoint follows the HF Trainer layout (model and processor, optimizer.pt,
scheduler.pt, rng_state.pth, trainer_state.json) plus grpo_state.json (the data order and the
metrics awaiting the next log), so `--resume_from_checkpoint last` (or a checkpoint directory)
continues exactly where the run stopped. With `--eval_data val.jsonl` the answer accuracy w/ and
w/o prob (`finger_reward.evaluation.heldout`, reason mode) is measured after training and goes to
`output_dir/eval.json` and the log.

Cost: each step runs generation, one no-grad forward for pi_old (so the loss value is the true
surrogate, and mu > 1 reuses it), one for pi_ref (beta > 0) and one with gradients, over G rows
that each carry the video; `forward_batch_size` bounds the rows per forward.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import shutil
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerState, get_scheduler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.trainer.utils import disable_dropout_in_model

from finger_reward.engine.inputs import placeholder_token_ids, processor_inputs
from finger_reward.instruct import InstructRecord, VideoSFTCollator
from finger_reward.preference import check_reward_kinds, load_training_records, log_fields
from finger_reward.pretrained import as_slowfast, write_scoring_defaults
from finger_reward.recipes import parse_recipe
from finger_reward.rope import with_rope_positions
from finger_reward.trainers import fsdp, shared_video
from finger_reward.trainers.shared_video import VIDEO_KEYS, videos_of_rows
from finger_reward.trainers.data_parallel import DataParallel
# The recipe lives in its own module; importing it from here stays the way in.
from finger_reward.trainers.grpo_recipe import DTYPES, LANGUAGE_MODEL_LINEARS, REWARD_FUNCS, GRPORecipe, grpo_config  # noqa: F401
from finger_reward.trainers.resume import resolve_checkpoint, rewind_log, rng_state, set_rng_state
from finger_reward.trainers.rollout import sample_group

logger = logging.getLogger(__name__)

MODE = "reason"  # GRPO trains the reasoning format; the prompt is the engine's reason-mode prompt
# HF Trainer's checkpoint file names, plus the loop's own position.
OPTIMIZER_NAME, SCHEDULER_NAME, RNG_STATE_NAME = "optimizer.pt", "scheduler.pt", "rng_state.pth"
TRAINER_STATE_NAME, LOOP_STATE_NAME = "trainer_state.json", "grpo_state.json"


# ---- model ----------------------------------------------------------------------------------------


def load_model(recipe: GRPORecipe):
    model = AutoModelForImageTextToText.from_pretrained(recipe.model, dtype=getattr(torch, recipe.model_dtype))
    processor = AutoProcessor.from_pretrained(recipe.model)
    if recipe.freeze_vision:
        model.model.visual.requires_grad_(False)
    if recipe.lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                            target_modules=recipe.lora_target_modules, task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    return model, processor


def _select_rows(batch: dict, rows: slice) -> dict:
    """Rows `rows` of a rollout batch, with the video tensors of exactly those rows (`shared_video.videos_of_rows`:
    every row holds the same prompt, so the same video blocks)."""
    videos = videos_of_rows(batch, rows, batch["input_ids"].shape[0])
    out = {key: value[rows] if isinstance(value, torch.Tensor) and value.dim() > 0 else value
           for key, value in batch.items() if key not in videos}
    return {**out, **videos}


class VideoGRPOTrainer:
    """GRPO on FingER-Instruct for a video VLM, every forward pass seeing the video.

    `reward_funcs`: callables in TRL's reward shape (default `[accuracy_reward, format_reward]`,
    FingER Eq. 9), weighted by `reward_weights` (default 1 each) and summed. `model`/`processor`
    may be given (else loaded from `recipe.model`); `records` likewise (else `load_instruct`).
    """

    def __init__(self, recipe: GRPORecipe, *, model=None, processor=None,
                 reward_funcs: Sequence[Callable] | None = None, reward_weights: Sequence[float] | None = None,
                 records: list[InstructRecord] | None = None):
        self.recipe, self.args = recipe, grpo_config(recipe)
        self.parallel = DataParallel.from_env()
        random.seed(recipe.seed)
        torch.manual_seed(recipe.seed)
        if model is None:
            model, loaded = load_model(recipe)
            model.to(self.parallel.device)
            processor = processor or loaded
        elif processor is None:
            processor = AutoProcessor.from_pretrained(recipe.model)
        self.model, self.processor, self.tokenizer = model, processor, processor.tokenizer
        # No dropout in any pass (LoRA's included, as TRL's disable_dropout): the old-policy and the
        # training log-probabilities of one rollout then agree exactly, so at mu=1 the ratio is 1.
        disable_dropout_in_model(self.model)
        if recipe.gradient_checkpointing:  # non-reentrant: the variant FSDP2 supports
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.reward_funcs = list(reward_funcs) if reward_funcs is not None else [REWARD_FUNCS[n] for n in recipe.reward_funcs]
        if reward_weights is None and reward_funcs is None and recipe.reward_weights is not None:
            reward_weights = recipe.reward_weights
        self.reward_weights = torch.tensor(reward_weights if reward_weights is not None else [1.0] * len(self.reward_funcs))
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"{len(self.reward_funcs)} reward functions but {len(self.reward_weights)} weights")
        self.records = records if records is not None else load_training_records(recipe.data)  # questions, pairs or both
        check_reward_kinds(self.reward_funcs, self.records, data=recipe.data)  # a reward the records cannot feed fails now
        if len(self.records) < self.parallel.world_size:
            raise ValueError(f"{len(self.records)} record(s) cannot give each of {self.parallel.world_size} processes its own question")
        self.parallel.broadcast_parameters(self.model)
        self.collator = VideoSFTCollator(processor, MODE, fps=recipe.fps, max_frames=recipe.max_frames,
                                         max_pixels=recipe.max_pixels, slowfast=as_slowfast(recipe.slowfast),
                                         clip_cache=recipe.clip_cache)
        self.ref_model = self._reference()
        if recipe.fsdp:  # after the reference is copied, before the optimizer sees the parameters
            self._shard()
        eos = {self.tokenizer.convert_tokens_to_ids(self.collator.end_of_turn)} if self.collator.end_of_turn else set()
        eos |= {self.tokenizer.eos_token_id} - {None}
        eos |= set(_as_list(getattr(self.model.generation_config, "eos_token_id", None)))
        self.eos_ids = sorted(i for i in eos if isinstance(i, int) and i >= 0)
        self.pad_id = self.collator.pad_id
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.args.learning_rate, weight_decay=self.args.weight_decay,
                                           betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon)
        self.scheduler = get_scheduler(self.args.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=self.args.warmup_steps, num_training_steps=self.args.max_steps)
        self.global_step = 0
        self.log_history: list[dict] = []
        self.completions: list[dict] = []  # every sampled completion with its rewards (also in completions.jsonl)
        self._order: list[int] = []  # record indices still to visit in this pass, popped from the end
        self._pending: dict[str, list[float]] = defaultdict(list)  # metrics since the last log
        if recipe.eval_data:  # fail now, not after training, on a bad held-out file
            from finger_reward.evaluation.loaders import load_finger_test

            load_finger_test(recipe.eval_data)

    # ---- reference policy -------------------------------------------------------------------------

    def _reference(self):
        if self.args.beta == 0:
            return None
        if self.recipe.lora:
            return None  # the policy with its adapters disabled
        ref = copy.deepcopy(self.model).eval()
        ref.requires_grad_(False)
        return ref

    def _shard(self):
        compute_dtype = torch.bfloat16 if self.recipe.bf16 else None
        fsdp.shard(self.model, compute_dtype=compute_dtype)
        if self.ref_model is not None:  # frozen: no fp32 master copy needed
            fsdp.shard(self.ref_model.to(compute_dtype or self.ref_model.dtype), compute_dtype=compute_dtype)

    def _ref_context(self):
        if self.ref_model is None and self.recipe.lora:
            return self.model.disable_adapter()
        return nullcontext()

    def _autocast(self):
        if self.recipe.bf16 and torch.cuda.is_available():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- rollout: prompt, G completions, rewards, advantages ------------------------------------

    def prompt_inputs(self, record: InstructRecord) -> dict[str, torch.Tensor]:
        """The engine's reason-mode prompt for the record with its video: the processor's full output
        (input_ids, attention_mask, mm_token_type_ids, pixel_values_videos, video_grid_thw, second_per_grid_ts)."""
        inputs = processor_inputs(self.processor, self.collator.prompt_text(record), self.collator.load_clip(record))
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    @staticmethod
    def repeat_inputs(inputs: dict, n: int) -> dict:
        """One prompt's processor output repeated for n rows (the video tensors once per row)."""
        return {k: (v.repeat(n, *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}

    @torch.no_grad()
    def rollout(self, record: InstructRecord) -> dict:
        """Sample G completions for one record and build the group's training batch (see `compute_loss`)."""
        G = self.args.num_generations
        single = self.prompt_inputs(record)
        prompt = self.repeat_inputs(single, G)
        prompt_length = prompt["input_ids"].shape[1]
        was_training = self.model.training
        self.model.eval()
        with self._autocast():
            # One prefill of the video and prompt; the G completions decode from copies of its cache.
            out = sample_group(
                self.model, single, G, temperature=self.args.temperature, top_p=self.args.top_p,
                max_new_tokens=self.args.max_completion_length, eos_token_ids=self.eos_ids, pad_token_id=self.pad_id,
                # A sampled <|video_pad|> would break the next forward's feature count.
                suppress_tokens=placeholder_token_ids(self.processor),
            )
        self.model.train(was_training)
        completion_ids = out[:, prompt_length:]
        is_eos = torch.isin(completion_ids, torch.tensor(self.eos_ids, device=completion_ids.device))
        # Mask after the first end token (the end token itself is trained: it teaches the model to stop).
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion_ids.shape[1])
        completion_mask = (torch.arange(completion_ids.shape[1], device=out.device)[None] <= first[:, None]).long()
        ids_list = [row[: int(m.sum())].tolist() for row, m in zip(completion_ids, completion_mask)]
        texts = [self.tokenizer.decode([t for t in ids if t not in self.eos_ids], skip_special_tokens=True) for ids in ids_list]

        batch = {
            "input_ids": out,
            "attention_mask": torch.cat([prompt["attention_mask"], completion_mask], dim=1),
            "completion_mask": completion_mask,
            "prompt_length": prompt_length,
            **{k: prompt[k] for k in VIDEO_KEYS if k in prompt},
        }
        if "mm_token_type_ids" in prompt:
            batch["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(completion_ids)], dim=1)

        columns, temporal_log, temporal_metrics = self.temporal_pass(record, batch, texts)
        rewards, per_func, extra, metrics = self.score(record, texts, ids_list, **columns)
        extra.update(temporal_log)
        metrics.update(temporal_metrics)
        mean = rewards.mean()
        std = rewards.std()
        advantages = rewards - mean
        if self.recipe.scale_rewards:
            advantages = advantages / (std + 1e-4)
        batch["advantages"] = advantages.to(self.device)
        batch["old_per_token_logps"] = self.per_token_logps(self.model, batch)
        if self.args.beta != 0:
            with self._ref_context():
                batch["ref_per_token_logps"] = self.per_token_logps(self.ref_model or self.model, batch)

        lengths = completion_mask.sum(1).float()
        metrics.update({
            "reward": mean.item(), "reward_std": std.item(), "frac_reward_zero_std": float(std.item() == 0),
            "completions/mean_length": lengths.mean().item(),
            "completions/clipped_ratio": (~is_eos.any(1)).float().mean().item(),
        })
        for name, values in per_func.items():
            metrics[f"rewards/{name}/mean"] = float(torch.nanmean(values))
            applicable = values[~values.isnan()]  # None (NaN): another kind of row, e.g. accuracy on a preference pair
            metrics[f"rewards/{name}/std"] = float(applicable.std()) if len(applicable) > 1 else 0.0 if len(applicable) else math.nan
        batch["metrics"] = metrics
        # The question fields ride along so that correct rollouts become FingER-Instruct lines (SFT cool-off).
        question = log_fields(record)
        batch["log"] = [
            {"step": self.global_step, **question, "completion": text,
             **{name: None if v[i].isnan() else float(v[i]) for name, v in per_func.items()}, "reward": float(rewards[i]),
             "advantage": float(advantages[i]), **{k: v[i] for k, v in extra.items()}}
            for i, text in enumerate(texts)
        ]
        return batch

    def temporal_pass(self, record: InstructRecord, batch: dict, texts: list[str]) -> tuple[dict, dict, dict]:
        """VQ-Insight's shuffled pass (recipe.temporal_shuffle; trainers/shuffled_pass.py): reward columns
        w_seq / w_rand, log columns and metrics; nothing without temporal_shuffle. Not trained on."""
        if not self.recipe.temporal_shuffle:
            return {}, {}, {}
        from finger_reward.trainers.shuffled_pass import temporal_pass

        return temporal_pass(self, record, batch, texts)

    def score(self, record: InstructRecord, texts: list[str], ids_list: list[list[int]], **reward_columns):
        """Rewards in TRL's calling convention; None means not applicable (NaN, ignored in the sum).
        `reward_columns` (one value per completion, e.g. w_seq / w_rand) join the record's columns."""
        G = len(texts)
        columns = {k: [v] * G for k, v in record.to_dict().items() if k not in ("prompt", "completion", "completion_ids")}
        columns.update(reward_columns)
        extra: dict[str, list] = {}
        metrics: dict[str, float] = {}
        per_func = {}
        for func in self.reward_funcs:
            name = getattr(func, "__name__", type(func).__name__)
            values = func(prompts=[self.collator.prompt_text(record)] * G, completions=texts, completion_ids=ids_list,
                          **columns, trainer_state=None, log_extra=lambda key, vals: extra.__setitem__(key, list(vals)),
                          log_metric=lambda key, val: metrics.__setitem__(key, float(val)))
            per_func[name] = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)
        stacked = torch.stack(list(per_func.values()), dim=1)
        rewards = (stacked * self.reward_weights[None]).nansum(dim=1)
        return rewards, per_func, extra, metrics

    # ---- log-probabilities and the loss ---------------------------------------------------------

    def _forward_inputs(self, batch: dict) -> dict:
        """The model inputs of a rollout batch, with the original model's rope positions (`finger_reward.rope`)."""
        keys = ("input_ids", "attention_mask", "mm_token_type_ids", *VIDEO_KEYS)
        return with_rope_positions(self.model.config, {k: batch[k] for k in keys if k in batch})

    def per_token_logps(self, model, batch: dict) -> torch.Tensor:
        """log pi(o_t | v, q, o_<t) of every completion token, the video in the forward pass; (rows, C)."""
        P = batch["prompt_length"]
        with torch.set_grad_enabled(torch.is_grad_enabled() and model is self.model), self._autocast():
            rows = batch["input_ids"].shape[0]
            size = self.recipe.forward_batch_size or rows
            if torch.is_grad_enabled() or size >= rows:
                return self._logps(model, self._forward_inputs(batch), P)
            return torch.cat([self._logps(model, self._forward_inputs(_select_rows(batch, slice(i, min(i + size, rows)))), P)
                              for i in range(0, rows, size)])

    def _logps(self, model, inputs: dict, prompt_length: int) -> torch.Tensor:
        # Logits of the completion positions only: over a video prompt of thousands of tokens the full
        # (rows, length, vocabulary) logits would be the largest tensor of the step.
        keep = inputs["input_ids"].shape[1] - prompt_length + 1
        # The rows show one clip: encoded once, every row gets its features (trainers/shared_video.py).
        logits = shared_video.forward_logits(model, inputs, logits_to_keep=keep, share=self.recipe.share_video)
        logits = logits[:, :-1].float() / self.args.temperature
        targets = inputs["input_ids"][:, prompt_length:]
        return logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """The GRPO loss (Eq. 5-7) of a rollout batch, mean over its rows, with gradients to the policy."""
        logps = self.per_token_logps(self.model, batch)
        mask = batch["completion_mask"].to(logps.dtype)
        advantages = batch["advantages"][:, None]
        ratio = torch.exp(logps - batch["old_per_token_logps"])
        eps = self.args.epsilon
        clipped = torch.clamp(ratio, 1 - eps, 1 + eps)
        per_token = -torch.min(ratio * advantages, clipped * advantages)
        metrics = {}
        if self.args.beta != 0:
            delta = batch["ref_per_token_logps"] - logps
            kl = torch.exp(delta) - delta - 1
            per_token = per_token + self.args.beta * kl
            metrics["kl"] = ((kl * mask).sum() / mask.sum().clamp(min=1)).item()
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
        region = ((ratio < 1 - eps) & (advantages < 0)) | ((ratio > 1 + eps) & (advantages > 0))
        metrics["clip_ratio/region_mean"] = ((region.float() * mask).sum() / mask.sum().clamp(min=1)).item()
        deviation = (ratio.detach() - 1).abs() * mask
        metrics["ratio/mean_abs_dev"] = (deviation.sum() / mask.sum().clamp(min=1)).item()
        metrics["ratio/max_abs_dev"] = deviation.max().item() if deviation.numel() else 0.0
        return loss, metrics

    # ---- the loop ---------------------------------------------------------------------------------

    def _next_record(self) -> InstructRecord:
        """This process's next question: every process walks one shuffled order and takes its own of each
        `world_size` consecutive records."""
        if len(self._order) < self.parallel.world_size:
            self._order = list(range(len(self.records)))
            random.Random(self.recipe.seed + self.global_step).shuffle(self._order)
        turn = [self._order.pop() for _ in range(self.parallel.world_size)]
        return self.records[turn[self.parallel.rank]]

    def train(self, resume_from_checkpoint: str | bool | None = None):
        """Run to max_steps; `resume_from_checkpoint` (a checkpoint-N directory, or True / "last" for the
        newest in output_dir) first restores everything the checkpoint holds. Then, with
        `recipe.eval_data`, measure the answer accuracy (`evaluate`)."""
        recipe, args = self.recipe, self.args
        out = Path(recipe.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if resume_from_checkpoint not in (None, False):
            self.resume(resume_from_checkpoint)
        pending = self._pending
        self.model.train()
        while self.global_step < args.max_steps:
            with fsdp.gathered(self.model):  # sampling decodes token by token: no gather per layer and token
                groups = [self._seeded_rollout(i)
                          for i in range(recipe.gradient_accumulation_steps * recipe.per_device_train_batch_size)]
            rows = self.parallel.gather([row for g in groups for row in g["log"]])
            self.completions.extend(rows)
            if self.parallel.is_main:
                with (out / "completions.jsonl").open("a", encoding="utf-8") as f:
                    f.writelines(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
            start = self.global_step
            for _ in range(args.num_iterations):
                if self.global_step >= args.max_steps:
                    break
                step_metrics = self.optimizer_step(groups)
                for k, v in self.parallel.average_metrics(_mean_metrics(groups, step_metrics)).items():
                    pending[k].append(v)
                if self.global_step % args.logging_steps == 0 or self.global_step == args.max_steps:
                    self.log({k: sum(v) / len(v) for k, v in pending.items()}, out)
                    pending.clear()
            # Checkpoints fall between generation batches, so a resumed run needs no stored rollouts.
            if args.save_steps and self.global_step // args.save_steps > start // args.save_steps \
                    and self.global_step < args.max_steps:
                self.save_checkpoint()
        self.model.eval()
        if recipe.eval_data:
            with fsdp.gathered(self.model):  # process 0 evaluates on the whole model; the others wait
                if self.parallel.is_main:
                    self.evaluate()
                self.parallel.barrier()
        return self

    def _seeded_rollout(self, index: int) -> dict:
        """The rollout of this process's `index`-th question of the step, sampled from a seed of its own (the
        run's seed, the step, the question's place among all processes' questions of the step): a run samples
        the same completions on 1 or N processes, and a resumed run the same as a straight one."""
        record = self._next_record()
        place = index * self.parallel.world_size + self.parallel.rank
        seed = ((self.recipe.seed * 1_000_003 + self.global_step) * 1_000_003 + place) % 2**63
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            return self.rollout(record)

    def optimizer_step(self, groups: list[dict]) -> dict[str, float]:
        """One optimizer step over the rollout groups (each group's loss weighted 1/len(groups))."""
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, list[float]] = defaultdict(list)
        loss_sum = 0.0
        for group in groups:
            rows = group["input_ids"].shape[0]
            size = self.recipe.forward_batch_size or rows
            for start in range(0, rows, size):
                part = _select_rows(group, slice(start, min(start + size, rows)))
                loss, metrics = self.compute_loss(part)
                weight = (part["input_ids"].shape[0] / rows) / len(groups)
                (loss * weight).backward()
                loss_sum += loss.item() * weight
                for k, v in metrics.items():
                    totals[k].append(v)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.recipe.fsdp:  # FSDP averaged them in its reduce-scatter
            self.parallel.average_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.global_step += 1
        return {"loss": loss_sum, "grad_norm": fsdp.grad_norm_value(grad_norm), "learning_rate": self.scheduler.get_last_lr()[0],
                **{k: sum(v) / len(v) for k, v in totals.items()}}

    def log(self, metrics: dict[str, float], out: Path):
        row = {"step": self.global_step, **metrics}
        self.log_history.append(row)
        if self.parallel.is_main:
            logger.info("%s", row)
            with (out / "log.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def save_model(self, path: str | Path, *, weights: bool = True):
        """The model (or adapter), processor and scoring defaults; the main process writes them, a sharded
        model's weights gathered to it first (so every process calls this). `weights=False`: the config alone."""
        state = fsdp.full_state_dict(self.model) if weights and self.recipe.fsdp else None
        if not self.parallel.is_main:
            return
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if weights:
            self.model.save_pretrained(path, state_dict=state)
        else:
            self.model.config.save_pretrained(path)
        self.processor.save_pretrained(path)
        write_scoring_defaults(path, mode=MODE, fps=self.recipe.fps, max_frames=self.recipe.max_frames,
                               max_pixels=self.recipe.max_pixels, slowfast=self.recipe.slowfast)

    # ---- checkpoints ------------------------------------------------------------------------------

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Write output_dir/checkpoint-N (HF Trainer's layout plus grpo_state.json), via a temporary
        folder renamed at the end, so a run killed while saving leaves no half checkpoint behind."""
        path = Path(path) if path is not None else Path(self.recipe.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.global_step}"
        tmp = path.with_name(f"tmp-{path.name}")
        if self.parallel.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.parallel.barrier()
        if self.recipe.fsdp:  # every process writes its own shards of the weights and AdamW states
            fsdp.save_sharded(tmp, self.model, self.optimizer)
        if self.parallel.is_main:  # unsharded weights, optimizer and loop state are the same in every process
            self.save_model(tmp, weights=not self.recipe.fsdp)
            if not self.recipe.fsdp:
                torch.save(self.optimizer.state_dict(), tmp / OPTIMIZER_NAME)
            torch.save(self.scheduler.state_dict(), tmp / SCHEDULER_NAME)
            TrainerState(global_step=self.global_step, max_steps=self.args.max_steps, logging_steps=self.args.logging_steps,
                         save_steps=self.args.save_steps, log_history=self.log_history).save_to_json(str(tmp / TRAINER_STATE_NAME))
            loop = {"data_order": self._order, "pending_metrics": self._pending}
            (tmp / LOOP_STATE_NAME).write_text(json.dumps(loop), encoding="utf-8")
        self.parallel.barrier()
        torch.save(rng_state(), tmp / self._rng_file())  # each process's own generators
        self.parallel.barrier()
        if self.parallel.is_main:
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        self.parallel.barrier()
        return path

    def _rng_file(self) -> str:
        """HF Trainer's name: rng_state.pth alone, rng_state_<rank>.pth with several processes."""
        return RNG_STATE_NAME if self.parallel.world_size == 1 else f"rng_state_{self.parallel.rank}.pth"

    def resume(self, checkpoint: str | Path | bool):
        """Restore weights, optimizer, scheduler, RNG, step, data position and pending metrics from a
        checkpoint (True or "last": the newest in output_dir), and cut output_dir's log.jsonl and
        completions.jsonl back to that step, so the files read as if the run had never stopped."""
        path = resolve_checkpoint(checkpoint, self.recipe.output_dir)
        weights = fsdp.SHARDED_DIR if self.recipe.fsdp else OPTIMIZER_NAME
        missing = [name for name in (weights, SCHEDULER_NAME, TRAINER_STATE_NAME, LOOP_STATE_NAME)
                   if not (path / name).exists()]
        if missing:
            sharded = (path / fsdp.SHARDED_DIR).is_dir()
            hint = f" (it was saved by a run with fsdp: {str(sharded).lower()}; resume with the same)" \
                if sharded != self.recipe.fsdp and (path / SCHEDULER_NAME).is_file() else ""
            raise ValueError(f"{path} is not a GRPO checkpoint of this trainer: missing {', '.join(missing)}{hint}")
        if not (path / self._rng_file()).is_file():
            saved = sorted(p.name for p in path.glob("rng_state*.pth"))
            raise ValueError(f"{path} has no {self._rng_file()} for this process (it holds {saved or 'none'}); "
                             f"resume with as many processes as the run that saved it ({max(len(saved), 1)})")
        if self.recipe.fsdp:
            fsdp.load_sharded(path, self.model, self.optimizer)
        else:
            self._load_weights(path)
            self.optimizer.load_state_dict(torch.load(path / OPTIMIZER_NAME, map_location=self.device, weights_only=True))
        self.scheduler.load_state_dict(torch.load(path / SCHEDULER_NAME, weights_only=True))
        state = TrainerState.load_from_json(str(path / TRAINER_STATE_NAME))
        if state.max_steps != self.args.max_steps:
            logger.warning("%s was saved by a run of max_steps=%d; this run has %d (the LR schedule follows this run)",
                           path, state.max_steps, self.args.max_steps)
        self.global_step, self.log_history = state.global_step, list(state.log_history)
        loop = json.loads((path / LOOP_STATE_NAME).read_text(encoding="utf-8"))
        self._order = list(loop["data_order"])
        self._pending.clear()
        self._pending.update({k: list(v) for k, v in loop["pending_metrics"].items()})
        set_rng_state(torch.load(path / self._rng_file(), weights_only=False))
        if self.parallel.is_main:
            self._rewind_logs(Path(self.recipe.output_dir))
        self.parallel.barrier()
        logger.info("resumed from %s at step %d", path, self.global_step)

    def _load_weights(self, path: Path):
        if self.recipe.lora:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            result = set_peft_model_state_dict(self.model, load_file(path / "adapter_model.safetensors"))
            if result.unexpected_keys:
                raise ValueError(f"{path}: adapter weights do not fit this model: {result.unexpected_keys[:3]}")
            return
        # from_pretrained maps the saved key names back onto the model's (see sft.VideoSFTTrainer).
        saved = type(self.model).from_pretrained(path, dtype=next(self.model.parameters()).dtype)
        self.model.load_state_dict(saved.state_dict(), strict=True)

    def _rewind_logs(self, out: Path):
        """Drop the lines a stopped run wrote after the checkpoint: log rows of later steps, rollouts sampled
        at or after its step (a rollout row carries the step it was sampled at, before the update)."""
        out.mkdir(parents=True, exist_ok=True)
        log = out / "log.jsonl"
        if not log.is_file():  # resumed into a new output_dir: start its log with the restored history
            log.write_text("".join(json.dumps(row) + "\n" for row in self.log_history), encoding="utf-8")
        rewind_log(log, self.global_step)
        rewind_log(out / "completions.jsonl", self.global_step - 1)

    # ---- evaluation -------------------------------------------------------------------------------

    def evaluate(self, data: str | Path | None = None) -> dict:
        """Answer accuracy w/ and w/o prob on held-out FingER-Instruct (default recipe.eval_data), in reason
        mode with greedy reasons up to max_completion_length; writes output_dir/eval.json and logs it."""
        from finger_reward.evaluation.heldout import eval_metrics, evaluate_instruct, write_eval

        data = data or self.recipe.eval_data
        if data is None:
            raise ValueError("evaluate() needs held-out data: pass data= or set eval_data in the recipe")
        recipe, out = self.recipe, Path(self.recipe.output_dir)
        result = evaluate_instruct(self.model, data, processor=self.processor, mode=MODE,
                                   max_new_tokens=self.args.max_completion_length, fps=recipe.fps,
                                   max_frames=recipe.max_frames, max_pixels=recipe.max_pixels,
                                   slowfast=as_slowfast(recipe.slowfast))
        write_eval(result, out / "eval.json")
        self.log(eval_metrics(result), out)
        return result


def _mean_metrics(groups: list[dict], step_metrics: dict[str, float]) -> dict[str, float]:
    """An optimizer step's metrics: each rollout metric averaged over the step's groups, then the update's.
    A reward's NaN (no row of the group was of its kind) is left out, as TRL's nanmean leaves it out."""
    values: dict[str, list[float]] = defaultdict(list)
    for group in groups:
        for key, value in group["metrics"].items():
            if not (key.startswith("rewards/") and math.isnan(value)):
                values[key].append(value)
    return {**{key: sum(v) / len(v) for key, v in values.items()}, **step_metrics}


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, set)) else [value]


def build_trainer(recipe: GRPORecipe, **kwargs) -> VideoGRPOTrainer:
    return VideoGRPOTrainer(recipe, **kwargs)


def train(recipe: GRPORecipe, **kwargs) -> VideoGRPOTrainer:
    """Train (resuming from recipe.resume_from_checkpoint if set), save the final model (or adapter) and
    processor to output_dir, return the trainer."""
    trainer = build_trainer(recipe, **kwargs)
    trainer.train(resume_from_checkpoint=recipe.resume_from_checkpoint)
    trainer.save_model(recipe.output_dir)
    return trainer


def main(argv: list[str] | None = None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return train(parse_recipe(GRPORecipe, argv))


if __name__ == "__main__":
    main()
