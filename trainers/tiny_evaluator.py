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
import shutil
import time
from importlib import resources
from pathlib import Path

from finger_reward import synthetic
from finger_reward.evaluation.heldout import evaluate_instruct, write_eval
from finger_reward.pretrained import SCORING_FILE, TINY_EVALUATOR, write_scoring_defaults
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
    from finger_reward.trainers import grpo as grpo_trainer
    from finger_reward.trainers import sft as sft_trainer

    out = Path(out)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    base = make_tiny_model(out / "base")
    write_scoring_defaults(base, mode="reason", fps=CLIP["fps"])
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
               "train_records": sum(1 for _ in train.instruct_path.open()),
               "heldout_records": sum(1 for _ in heldout.instruct_path.open())}
    for stage in ("base", "sft", "grpo"):
        summary[stage] = json.loads((out / stage / "eval.json").read_text())["dimensions"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def install(out: str | Path, dest: str | Path = TINY_EVALUATOR) -> Path:
    """Copy the trained model (out/grpo) and the figures (out/summary.json) into the package."""
    out, dest = Path(out), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_FILES:
        shutil.copy2(out / "grpo" / name, dest / name)
    shutil.copy2(out / "summary.json", dest / "training_summary.json")
    return dest


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
        print(f"{stage:>5}: held-out acc {overall['acc']:.3f} (w/o prob), {overall['acc_prob']:.3f} (w/ prob)")
    print(f"seconds: {summary['seconds']}")
    if args.install:
        print(f"installed into {install(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
