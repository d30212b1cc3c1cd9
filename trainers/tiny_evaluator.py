"""Train the tiny evaluator shipped in finger_reward/models/tiny-evaluator, on CPU, in minutes.

A random tiny Qwen2.5-VL (`finger-reward make-tiny-model`) learns to judge the synthetic world
(`finger_reward.synthetic`): SFT with reasons (the cold start, configs/tiny_evaluator_sft.yaml),
then GRPO with accuracy + format rewards (configs/tiny_evaluator_grpo.yaml), each followed by the
held-out answer accuracy on clips it never saw (`finger_reward.evaluation.heldout`).

    python -m finger_reward.trainers.tiny_evaluator --out out/tiny [--install]

`--install` copies the result and its figures into the package, where `--model tiny` finds it.
Extra `--sft KEY=VALUE` / `--grpo KEY=VALUE` options override the recipes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from importlib import resources
from pathlib import Path

from finger_reward import synthetic
from finger_reward.evaluation.heldout import evaluate_instruct, write_eval
from finger_reward.pretrained import SCORING_FILE, TINY_EVALUATOR
from finger_reward.tiny import make_tiny_model

# The clips the evaluator learns from and is tested on: 8 frames at 2 fps, so sampling at the
# engine's 2 fps keeps every frame and a flicker between consecutive frames stays visible.
CLIP = dict(num_frames=8, fps=2.0)
TRAIN_SEED, HELDOUT_SEED = 11, 99
MAX_REASON_TOKENS = 48  # the synthetic reasons are about 20 tokens
SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "processor_config.json", SCORING_FILE)


def _config(name: str) -> str:
    return str(resources.files("finger_reward.configs") / name)


def _overrides(pairs: list[str]) -> list[str]:
    args = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"override {pair!r}: expected KEY=VALUE, e.g. max_steps=100")
        args += [f"--{key}", value]
    return args


def train_tiny_evaluator(out: str | Path, *, train_scenes: int = 60, clips_per_scene: int = 2,
                         heldout_scenes: int = 20, sft: list[str] = (), grpo: list[str] = ()) -> dict:
    """Run the whole recipe into `out` (base/, train/, heldout/, sft/, grpo/); return the held-out figures per stage."""
    import torch

    from finger_reward.trainers import grpo as grpo_trainer
    from finger_reward.trainers import sft as sft_trainer

    out = Path(out)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    base = make_tiny_model(out / "base")
    train = synthetic.make_world(out / "train", num_scenes=train_scenes, clips_per_scene=clips_per_scene,
                                 balanced=True, seed=TRAIN_SEED, progress=True, **CLIP)
    heldout = synthetic.make_world(out / "heldout", num_scenes=heldout_scenes, seed=HELDOUT_SEED, progress=True, **CLIP)
    seconds["data"] = time.perf_counter() - start

    # "From chance": the random model asked exactly as the trained ones are.
    write_eval(evaluate_instruct(str(base), heldout.instruct_path, mode="reason", max_new_tokens=MAX_REASON_TOKENS),
               base / "eval.json")
    paths = ["--data", str(train.instruct_path), "--eval_data", str(heldout.instruct_path)]
    start = time.perf_counter()
    sft_trainer.main(["--config", _config("tiny_evaluator_sft.yaml"), "--model", str(base), *paths,
                      "--output_dir", str(out / "sft"), *_overrides(list(sft))])
    seconds["sft"] = time.perf_counter() - start
    start = time.perf_counter()
    grpo_trainer.main(["--config", _config("tiny_evaluator_grpo.yaml"), "--model", str(out / "sft"), *paths,
                       "--output_dir", str(out / "grpo"), *_overrides(list(grpo))])
    seconds["grpo"] = time.perf_counter() - start

    summary = {"seconds": {k: round(v, 1) for k, v in seconds.items()},
               "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}",
               "train_clips": len(train.clips), "train_records": _lines(train.instruct_path),
               "heldout_records": _lines(heldout.instruct_path)}
    for stage in ("base", "sft", "grpo"):
        summary[stage] = json.loads((out / stage / "eval.json").read_text())["dimensions"]
        summary[stage]["free_completions"] = free_completion_rewards(out / stage, heldout.instruct_path)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def free_completion_rewards(model_dir: str | Path, heldout_jsonl: str | Path, *, limit: int = 200) -> dict:
    """Format and accuracy rewards (rewards.py, FingER Eq. 10-11) of greedy completions written freely,
    without the engine closing the reason for the model, on the first `limit` held-out questions."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from finger_reward.engine.inputs import placeholder_token_ids, processor_inputs
    from finger_reward.instruct import VideoSFTCollator, load_instruct
    from finger_reward.rewards import accuracy_reward, format_reward
    from finger_reward.rope import with_rope_positions

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    collator = VideoSFTCollator(processor, "reason", fps=CLIP["fps"], clip_cache=limit)
    records = load_instruct(heldout_jsonl)[:limit]
    texts = []
    with torch.inference_mode():
        for record in records:
            inputs = processor_inputs(processor, collator.prompt_text(record), collator.load_clip(record))
            out = model.generate(**with_rope_positions(model.config, inputs), max_new_tokens=MAX_REASON_TOKENS, do_sample=False,
                                 suppress_tokens=placeholder_token_ids(processor))
            texts.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    fmt = format_reward(texts)
    acc = accuracy_reward(texts, answer=[r.answer for r in records])
    return {"format": sum(fmt) / len(fmt), "acc": sum(acc) / len(acc), "questions": len(texts)}


def install(out: str | Path, dest: str | Path = TINY_EVALUATOR) -> Path:
    """Copy the trained model (out/grpo) and its figures (out/summary.json) into the package, with a model card."""
    out, dest = Path(out), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_FILES:
        shutil.copy2(out / "grpo" / name, dest / name)
    summary = json.loads((out / "summary.json").read_text())
    (dest / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (dest / "README.md").write_text(model_card(summary, dest))
    return dest


def model_card(summary: dict, model_dir: str | Path) -> str:
    """The model card: what the tiny evaluator is, how it was trained (commands, CPU time), what it scores."""
    from safetensors.torch import load_file

    params = sum(t.numel() for t in load_file(str(Path(model_dir) / "model.safetensors")).values())
    rows = []
    baseline = summary["grpo"]["overall"]
    rows.append(f"| always answer \"fine\" (no model) | {baseline['always_fine_acc']:.3f} | 1.000 | 0.000 | 0.500 | - | - | - |")
    for stage, label in (("base", "random weights"), ("sft", "after SFT with reasons"), ("grpo", "after GRPO")):
        figures, free = summary[stage]["overall"], summary[stage]["free_completions"]
        rows.append(f"| {label} | {figures['acc']:.3f} | {figures['acc_fine']:.3f} | {figures['acc_broken']:.3f} "
                    f"| **{figures['balanced_acc']:.3f}** | {figures['acc_prob']:.3f} | {free['acc']:.3f} | {free['format']:.3f} |")
    per_dim = [(d, f) for d, f in summary["grpo"].items() if d not in ("overall", "free_completions")]
    dims = "\n".join(f"| {d} | {f['acc']:.3f} | {f['acc_fine']:.3f} | {f['acc_broken']:.3f} | {f['balanced_acc']:.3f} "
                     f"| {f['always_fine_acc']:.3f} |" for d, f in per_dim)
    seconds = summary["seconds"]
    return _CARD.format(params=params, rows="\n".join(rows), dims=dims, fine_share=baseline["always_fine_acc"], train=summary["train_records"],
                        clips=f"{summary['train_clips']:,} clips",
                        heldout=summary["heldout_records"], sft=seconds["sft"] / 60, grpo=seconds["grpo"] / 60,
                        machine=summary.get("machine", "CPU"))


_CARD = """# finger-reward tiny evaluator

A {params:,}-parameter model with the Qwen2.5-VL architecture (2-block vision tower, 2-layer
language model of width 64 with 2 heads of 32, a 1,024-token BPE vocabulary), trained on CPU by this package's own
scripts to judge the clips of `finger_reward.synthetic`: one coloured shape moving across a dark
background, with at most one defect (wrong colour, frozen, flicker, noise and blur on washed-out
colours, teleport), each belonging to one FingER dimension. It answers FingER's Yes/No questions
about such clips in reason mode (`<reason>...</reason><answer>Yes|No</answer>`), so
`finger-reward demo` and `finger-reward score --model tiny` give meaningful scores without
downloading anything.

It knows nothing but that world: on real videos its scores mean nothing. It exists so that the
whole pipeline (questions, engine, scores, service, training loops) can be seen working on a
laptop, and as proof that the training scripts teach a model to look at the video.

```python
from finger_reward import FingerReward
reward = FingerReward.from_pretrained("tiny")   # reason mode, 2 fps: from finger_reward.json
```

## Training

{train:,} training questions about {clips} (balanced: per dimension as many "fine" as "broken"
answers), SFT with reasons from random weights, then GRPO with FingER's accuracy + format rewards
(beta 0.04, epsilon 0.2, mu 1; groups of 8), exactly as

```bash
python -m finger_reward.trainers.tiny_evaluator --out out/tiny --install
```

runs it; the step-by-step commands are at the top of `configs/tiny_evaluator_sft.yaml`, the
settings in that file and `configs/tiny_evaluator_grpo.yaml`. Time on {machine}: SFT
{sft:.1f} min, GRPO {grpo:.1f} min.

## Held-out figures

{heldout:,} questions about clips never seen in training (`finger-reward synthetic --scenes 20
--seed 99`, the natural mix: one clip in six has the defect a question asks about).
A question is "fine" when its right answer says the clip is fine (Yes to a positive question, No
to a negative one) and "broken" otherwise; on this mix answering "fine" to everything, with no
model at all, is right {fine_share:.0%} of the time, so the overall accuracy alone says little. The
figure to read is the balanced accuracy: the mean of the accuracy on "fine" and on "broken"
questions (0.5 for any constant answer).

Acc: the hard answer after a greedy reason, as `FingerReward` scores (FingER's "w/o prob"); w/ prob:
P(right answer) > 0.5 (FingER Table 1-2's other reading). Free completions: the model writes the
whole completion greedily (no help closing the reason); format and accuracy rewards (Eq. 10-11)
on the first 200 questions.

| model | acc | acc on "fine" | acc on "broken" | balanced acc | acc w/ prob | free completion acc | format reward |
|---|---|---|---|---|---|---|---|
{rows}

Per dimension after GRPO (w/o prob):

| dimension | acc | acc on "fine" | acc on "broken" | balanced acc | always "fine" |
|---|---|---|---|---|---|
{dims}

Positions: every forward, in training and in scoring, takes the 3-D rope positions of Qwen2.5-VL's
original code (`finger_reward.rope`), as vLLM and checkpoints trained with transformers 4.x use them.

SFT does nearly all of the learning here: GRPO starts from a model that already answers most
training questions right, so most groups of 8 completions agree and carry no advantage (its
log, `log.jsonl`, shows the share of such groups as `frac_reward_zero_std`).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/tiny")
    parser.add_argument("--install", action="store_true", help=f"copy the result into {TINY_EVALUATOR}")
    parser.add_argument("--train-scenes", type=int, default=60, help="scenes of the training world (at most 60)")
    parser.add_argument("--clips-per-scene", type=int, default=2, help="renders of every (scene, defect) for training")
    parser.add_argument("--heldout-scenes", type=int, default=20, help="scenes of the held-out world")
    parser.add_argument("--sft", action="append", default=[], metavar="KEY=VALUE", help="override the SFT recipe")
    parser.add_argument("--grpo", action="append", default=[], metavar="KEY=VALUE", help="override the GRPO recipe")
    args = parser.parse_args(argv)
    summary = train_tiny_evaluator(args.out, train_scenes=args.train_scenes, clips_per_scene=args.clips_per_scene,
                                   heldout_scenes=args.heldout_scenes, sft=args.sft, grpo=args.grpo)
    for stage in ("base", "sft", "grpo"):
        overall = summary[stage]["overall"]
        free = summary[stage]["free_completions"]
        print(f"{stage:>5}: held-out acc {overall['acc']:.3f} (w/o prob), {overall['acc_prob']:.3f} (w/ prob), "
              f"balanced {overall['balanced_acc']:.3f} (always 'fine': {overall['always_fine_acc']:.3f}); "
              f"free greedy completions: format {free['format']:.3f}, acc {free['acc']:.3f}")
    print(f"seconds: {summary['seconds']}")
    if args.install:
        print(f"installed into {install(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
