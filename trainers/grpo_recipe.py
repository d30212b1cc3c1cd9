"""The evaluator GRPO loop's recipe (trainers/grpo.py): every field a run takes, loadable from a flat YAML
(configs/grpo_*.yaml) with command-line overrides, checked when built, and its TRL `GRPOConfig`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trl import GRPOConfig

from finger_reward.pretrained import slowfast_threshold
from finger_reward.rewards import (accuracy_reward, format_reward, length_reward, multi_dimension_reward,
                                   preference_reward, rating_reward, temporal_reward)

LANGUAGE_MODEL_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
DTYPES = ("float32", "bfloat16", "float16")
# The recipe's `reward_funcs` names (the edge's registry): the training rewards of finger_reward.rewards.
REWARD_FUNCS = {f.__name__: f for f in (accuracy_reward, format_reward, length_reward, temporal_reward,
                                        multi_dimension_reward, preference_reward, rating_reward)}


@dataclass
class GRPORecipe:
    """Everything a GRPO run needs; loadable from a flat YAML (configs/grpo_*.yaml) with CLI overrides."""

    model: str | None = field(default=None, metadata={"help": "start checkpoint: the base model (Zero-GRPO) or the SFT-with-reasons output (cold start)"})
    data: str | None = field(default=None, metadata={"help": "FingER-Instruct JSONL (question fields, video, answer; reason not needed)"})
    output_dir: str = field(default="out/grpo", metadata={"help": "logs, checkpoints and the final model go here"})

    num_generations: int = field(default=16, metadata={"help": "G, completions sampled per question (paper: 16)"})
    beta: float = field(default=0.04, metadata={"help": "KL coefficient to the frozen start model (paper: 0.04); 0 drops the reference model"})
    epsilon: float = field(default=0.2, metadata={"help": "clip range of the probability ratio (paper: 0.2)"})
    num_iterations: int = field(default=1, metadata={"help": "mu, optimizer steps per generated batch (paper: 1)"})
    learning_rate: float = field(default=5.0e-7, metadata={"help": "AdamW peak learning rate (paper: 5e-7)"})
    scale_rewards: bool = field(default=True, metadata={"help": "divide group-centred rewards by the group std (Eq. 8)"})
    max_completion_length: int = field(default=256, metadata={"help": "most new tokens per completion"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (also divides the logits of the log-probabilities, as TRL does)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "questions per micro-step, each with num_generations completions"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    forward_batch_size: int | None = field(default=None, metadata={"help": "rows (completions) per forward pass; default: the whole group"})
    max_steps: int = field(default=2000, metadata={"help": "optimizer steps (paper: 2k)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "transformers scheduler name"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})

    fps: float = field(default=2.0, metadata={"help": "frames per second sampled from each video (paper: 2), as the engine samples"})
    max_pixels: int = field(default=448 * 448, metadata={"help": "pixel budget per frame, H x W (paper: 448 x 448)"})
    max_frames: int = field(default=48, metadata={"help": "at most this many frames per video"})
    slowfast: float | None = field(default=None, metadata={"help": "Q-Save SlowFast frames with this patch similarity threshold in "
                                                                     "(0, 1] (Q-Save: 0.9), as scoring samples them; None: plain frames. "
                                                                     "Written to finger_reward.json, so scoring follows"})
    share_video: bool = field(default=True, metadata={"help": "encode a forward's clip once for all its rows (they show the same "
                                                              "video): the vision tower's cost and activations / rows; "
                                                              "false: once per row, as a plain forward does"})
    clip_cache: int = field(default=0, metadata={"help": "keep this many decoded videos in memory (0: decode every time); for small data sets trained for many epochs"})

    reward_funcs: list[str] = field(default_factory=lambda: ["accuracy_reward", "format_reward"], metadata={
        "help": f"reward functions of finger_reward.rewards, summed (FingER Eq. 9: accuracy_reward, format_reward); one of {', '.join(REWARD_FUNCS)}"})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "one weight per reward function (default 1 each)"})
    temporal_shuffle: bool = field(default=False, metadata={
        "help": "VQ-Insight temporal modelling (Eq. 4): also sample G answers on the clip with its frames shuffled (seeded) and pass "
                "w_seq / w_rand, the probabilities of the correct answer, to the rewards (temporal_reward); not trained on"})

    lora: bool = field(default=False, metadata={"help": "train LoRA adapters (peft); the reference is the model with adapters disabled"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: str = field(default=LANGUAGE_MODEL_LINEARS, metadata={"help": "peft target_modules (regex or 'all-linear')"})
    freeze_vision: bool = field(default=False, metadata={"help": "full fine-tuning only: keep the vision tower fixed"})
    fsdp: bool = field(default=False, metadata={"help": "shard the model over the torchrun processes (FSDP2, trainers/fsdp.py): for full "
                                                       "fine-tuning fp32 weights, gradients, AdamW states and the reference model split N "
                                                       "ways (with lora, the frozen base); compute in bf16 when bf16 is set; checkpoints "
                                                       "are sharded (DCP)"})

    model_dtype: str = field(default="float32", metadata={"help": f"dtype of the loaded weights, one of {DTYPES}"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast on CUDA"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    seed: int = field(default=42, metadata={"help": "seed for data order, sampling and LoRA init"})
    logging_steps: int = field(default=10, metadata={"help": "write averaged metrics every N optimizer steps"})
    save_steps: int = field(default=500, metadata={"help": "save a checkpoint every N optimizer steps (with num_iterations > 1, at the end "
                                                           "of the generation batch in which such a step falls)"})
    report_to: str = field(default="none", metadata={"help": "kept in GRPOConfig; metrics always go to output_dir/log.jsonl"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint directory, or 'last' for the newest in output_dir"})
    eval_data: str | None = field(default=None, metadata={"help": "FingER-Instruct JSONL: answer accuracy (w/ and w/o prob, reason mode) after "
                                                                  "training, to output_dir/eval.json and the log (optional)"})

    def __post_init__(self):
        if self.model is None or self.data is None:
            raise ValueError("GRPORecipe needs `model` and `data`: pass --model PATH --data train.jsonl (or set them in the YAML)")
        if self.num_generations < 2:
            raise ValueError(f"GRPO needs num_generations >= 2 to normalise rewards within a group, got {self.num_generations}")
        if self.beta < 0 or not self.epsilon > 0 or self.num_iterations < 1:
            raise ValueError(f"need beta >= 0, epsilon > 0, num_iterations >= 1; got {self.beta}, {self.epsilon}, {self.num_iterations}")
        if self.model_dtype not in DTYPES:
            raise ValueError(f"model_dtype={self.model_dtype!r} is not one of {DTYPES}")
        if self.fsdp and int(os.environ.get("WORLD_SIZE", 1)) < 2:
            raise ValueError("fsdp: true shards over processes: launch with torchrun --nproc_per_node N (N >= 2), or set fsdp: false")
        if self.lora and self.freeze_vision:
            raise ValueError("freeze_vision applies to full fine-tuning; with lora=true only the adapters train already")
        if not self.fps > 0 or self.max_frames < 1 or self.max_pixels < 1:
            raise ValueError(f"need fps > 0, max_frames >= 1, max_pixels >= 1; got {self.fps}, {self.max_frames}, {self.max_pixels}")
        slowfast_threshold(self.slowfast)
        _check_reward_recipe(self)
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_completion_length", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.forward_batch_size is not None and self.forward_batch_size < 1:
            raise ValueError(f"forward_batch_size must be at least 1, got {self.forward_batch_size}")


def _check_reward_recipe(recipe: GRPORecipe):
    """Reward names, weights and the temporal pass agree (GRPORecipe.__post_init__)."""
    unknown = [name for name in recipe.reward_funcs if name not in REWARD_FUNCS]
    if unknown or not recipe.reward_funcs:
        raise ValueError(f"reward_funcs {unknown or '[]'}: name functions of finger_reward.rewards, one of {', '.join(REWARD_FUNCS)}")
    if recipe.reward_weights is not None and len(recipe.reward_weights) != len(recipe.reward_funcs):
        raise ValueError(f"{len(recipe.reward_funcs)} reward_funcs but {len(recipe.reward_weights)} reward_weights; give one weight each")
    if ("temporal_reward" in recipe.reward_funcs) != recipe.temporal_shuffle:
        raise ValueError("temporal_reward needs the shuffled pass and the shuffled pass serves only temporal_reward: "
                         "set temporal_shuffle: true together with temporal_reward in reward_funcs, or neither")
    if recipe.temporal_shuffle and recipe.slowfast is not None:
        raise ValueError("temporal_shuffle shuffles plain frames; set slowfast: null for the temporal reward")


def grpo_config(recipe: GRPORecipe) -> GRPOConfig:
    """TRL's GRPOConfig for the recipe (TRL counts completions per device: questions x G)."""
    return GRPOConfig(
        output_dir=recipe.output_dir,
        num_generations=recipe.num_generations,
        beta=recipe.beta,
        epsilon=recipe.epsilon,
        num_iterations=recipe.num_iterations,
        learning_rate=recipe.learning_rate,
        scale_rewards="group" if recipe.scale_rewards else "none",
        loss_type="grpo",
        max_completion_length=recipe.max_completion_length,
        temperature=recipe.temperature,
        top_p=recipe.top_p,
        per_device_train_batch_size=recipe.per_device_train_batch_size * recipe.num_generations,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        max_steps=recipe.max_steps,
        weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.max_grad_norm,
        lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=recipe.warmup_steps,
        seed=recipe.seed,
        logging_steps=recipe.logging_steps,
        save_steps=recipe.save_steps,
        bf16=recipe.bf16,
        gradient_checkpointing=recipe.gradient_checkpointing,
        report_to=recipe.report_to,
    )
