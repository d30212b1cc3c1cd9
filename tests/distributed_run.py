"""Run under torchrun by tests/test_distributed.py: a generator loop on the tiny Wan pipeline, or the evaluator's
GRPO on the tiny Qwen2.5-VL; then each process writes its weights and history so the test can compare them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from finger_reward.tiny_wan import build_tiny_wan_pipeline

TINY = dict(num_frames=5, height=32, width=32, max_sequence_length=16, lora_rank=4, lora_alpha=4,
            mixed_precision="no", learning_rate=1e-2, save_steps=0)


def evaluator_grpo(work_dir: Path, options: dict) -> None:
    """The evaluator's GRPO loop (trainers/grpo.py) with a length reward; `options`: GRPORecipe fields, as JSON."""
    from finger_reward.trainers.grpo import GRPORecipe, build_trainer

    def length_reward(completions, **kwargs):  # differs within a group of a random model's completions
        return [len(c) / 10 for c in completions]

    def trainable(model):  # a sharded parameter gathered whole (a collective call)
        return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for name, p in model.named_parameters() if p.requires_grad}

    trainer = build_trainer(GRPORecipe(**options), reward_funcs=[length_reward])
    start = trainable(trainer.model)
    trainer.train(resume_from_checkpoint=options.get("resume_from_checkpoint"))
    trainer.save_model(options["output_dir"])
    weights = trainable(trainer.model)
    torch.save({"weights": weights, "start": start, "completions": trainer.completions, "log": trainer.log_history},
               work_dir / f"grpo-rank{trainer.parallel.rank}.pt")


def allow_fsdp_on_cpu() -> None:
    """accelerate 1.16 turns its FSDP plugin on only for accelerator backends (state.py lists MULTI_GPU,
    MULTI_XPU, ...), so under ACCELERATE_USE_CPU the FSDP config would silently run as plain data
    parallelism; this lets the same config shard on gloo, as it does on GPUs."""
    from accelerate.state import AcceleratorState, DistributedType

    init = AcceleratorState.__init__

    def init_with_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    AcceleratorState.__init__ = init_with_fsdp


def main(loop: str, work: str, extra: str) -> None:
    from accelerate import PartialState

    work_dir = Path(work)
    if loop == "grpo-evaluator":
        return evaluator_grpo(work_dir, json.loads(extra))
    if loop in ("sft", "sft-fsdp"):  # trainers/sft.py under `accelerate launch`, `extra`: its flags as a JSON list
        from finger_reward.trainers.sft import main as sft_main

        if loop == "sft-fsdp":
            allow_fsdp_on_cpu()
        sft_main(json.loads(extra))
        return None
    pipe = build_tiny_wan_pipeline(seed=0)
    if loop == "dpo":
        from finger_reward.trainers.diffusion_dpo import DPORecipe, train

        recipe = DPORecipe(pairs_file=extra, output_dir=str(work_dir / "out"), max_steps=3, batch_size=1,
                           gradient_accumulation_steps=1, logging_steps=1, **TINY)
        history = train(recipe, pipe=pipe)["history"]
    else:
        from finger_reward.trainers.flow_grpo import FlowGRPORecipe, train

        recipe = FlowGRPORecipe(prompts=str(work_dir / "prompts.txt"), reward_model=extra, output_dir=str(work_dir / "out"),
                                max_steps=2, group_size=2, prompts_per_step=1, num_inference_steps=3, num_updates=1,
                                clip_range=0.2, beta=0.1, std_floor=0.01, **{**TINY, "save_steps": 10})
        history = train(recipe, pipe=pipe)
    lora = {name: p.detach().clone() for name, p in pipe.transformer.named_parameters() if "lora_" in name}
    rank = PartialState().process_index
    torch.save({"lora": lora, "history": history}, work_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:4])
