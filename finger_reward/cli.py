"""The `finger-reward` command: score videos, run the demo, build a tiny model."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from finger_reward.errors import FingerError
from finger_reward.questions import DIMENSIONS

MODEL_ENV = "FINGER_REWARD_MODEL"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (FingerError, FileNotFoundError, ImportError) as err:
        print(f"finger-reward: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finger-reward", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    score = commands.add_parser("score", help="score videos against a prompt")
    score.add_argument("videos", nargs="+", metavar="VIDEO", help="video files")
    score.add_argument("--prompt", required=True, help="the text prompt the videos were generated from")
    score.add_argument("--questions", required=True, help="question bank JSONL holding the prompt's questions")
    _add_model_options(score)
    score.add_argument("--json", action="store_true", help="print one JSON object per video instead of tables")
    score.set_defaults(run=_score)

    demo = commands.add_parser("demo", help="score synthetic clips (clean and defective) with a tiny model")
    demo.add_argument("--out", help="where to write clips and the tiny model (default: a new temporary directory)")
    _add_model_options(demo, model_required=False)
    demo.add_argument("--json", action="store_true", help="print one JSON object per video instead of tables")
    demo.set_defaults(run=_demo)

    tiny = commands.add_parser("make-tiny-model", help="write a tiny random-weight Qwen2.5-VL checkpoint")
    tiny.add_argument("out_dir", help="directory to write the checkpoint to")
    tiny.add_argument("--arch", choices=["qwen2_5_vl", "qwen3_vl"], default="qwen2_5_vl")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_make_tiny)
    return parser


def _add_model_options(parser: argparse.ArgumentParser, model_required: bool = True) -> None:
    where = f"(default: ${MODEL_ENV})" if model_required else "(default: a tiny random model)"
    parser.add_argument("--model", default=os.environ.get(MODEL_ENV) if model_required else None,
                        help=f"checkpoint directory or hub id {where}")
    parser.add_argument("--mode", choices=["answer", "reason"], default="answer")
    parser.add_argument("--aggregate", choices=["mean", "sum"], default="mean")
    parser.add_argument("--weights", type=_weights, help="dimension weights, e.g. visual_quality=2,text_alignment=1")
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--max-pixels", type=int, default=448 * 448)
    parser.add_argument("--max-new-tokens", type=int, default=256, help="reason length limit in reason mode")
    parser.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: cuda when present)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: bf16 on GPU, fp32 on CPU")


def _weights(text: str) -> dict[str, float]:
    weights = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in DIMENSIONS:
            raise argparse.ArgumentTypeError(f"{item!r}: expected dimension=weight with dimension in {', '.join(DIMENSIONS)}")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: weight {value!r} is not a number") from None
    return weights


def _load_reward(args, model: str, questions):
    from finger_reward.reward import FingerReward

    return FingerReward.from_pretrained(
        model, questions=questions, mode=args.mode, max_new_tokens=args.max_new_tokens,
        aggregate=args.aggregate, weights=args.weights, fps=args.fps, max_pixels=args.max_pixels,
        device=args.device, dtype=args.dtype, on_error="nan", progress=len(getattr(args, "videos", ())) > 4,
    )


def _score(args) -> int:
    if not args.model:
        raise FingerError(f"no model given: pass --model PATH or set ${MODEL_ENV}")
    reward = _load_reward(args, args.model, args.questions)
    return _report(reward.score(args.videos, args.prompt), as_json=args.json)


def _demo(args) -> int:
    from finger_reward import synthetic
    from finger_reward.tiny import make_tiny_model

    out = Path(args.out or tempfile.mkdtemp(prefix="finger-demo-"))
    world = synthetic.make_world(out, num_scenes=1)
    model = args.model or str(make_tiny_model(out / "tiny-model"))
    print(f"demo files in {out}" + ("" if args.model else " (tiny random model: scores are not meaningful)"),
          file=sys.stderr)
    reward = _load_reward(args, model, world.bank_path)
    clips = world.clips
    return _report(reward.score([c.path for c in clips], [c.prompt for c in clips]), as_json=args.json, details=False)


def _make_tiny(args) -> int:
    from finger_reward.tiny import make_tiny_model

    print(make_tiny_model(args.out_dir, arch=args.arch, seed=args.seed))
    return 0


def _report(results, as_json: bool, details: bool = True) -> int:
    """Print results (JSON lines, or tables); failures go to stderr, one line each, and exit 1."""
    for result in results:
        if not result.ok:
            print(f"finger-reward: error: {result.error}", file=sys.stderr)
        elif as_json:
            print(json.dumps(result.to_dict()))
        elif details:
            print(format_table(result))
    scored = [r for r in results if r.ok]
    if not as_json and scored and (len(scored) > 1 or not details):
        print(format_summary(scored))
    return 0 if len(scored) == len(results) else 1


def format_table(result) -> str:
    """A readable block per video: overall, per-dimension scores, then each question."""
    lines = [f"{result.video}", f"  prompt:  {result.prompt}",
             f"  overall: {result.overall:.3f}   (w/o prob: {result.hard_overall:.3f})"]
    for dim in DIMENSIONS:
        if dim in result.dimensions:
            count = sum(q.dimension == dim for q in result.questions)
            lines.append(f"    {dim:<22} {result.dimensions[dim]:.3f}   ({count} questions)")
    for q in result.questions:
        sign = "+" if q.positive else "-"
        lines.append(f"    [{sign}] {q.answer:<3} P(Yes)={q.p_yes:.3f} score={q.score:.3f}  {q.question}")
        if q.reason:
            lines.append(f"          reason: {q.reason}")
    return "\n".join(lines) + "\n"


def format_summary(results) -> str:
    """One row per video: overall and the five dimension scores."""
    heads = ["overall"] + [d.split("_")[0][:8] for d in DIMENSIONS]
    width = max(len(Path(r.video).name) for r in results)
    lines = [f"{'video':<{width}}  " + "  ".join(f"{h:>8}" for h in heads)]
    for r in results:
        cells = [r.overall] + [r.dimensions.get(d, float("nan")) for d in DIMENSIONS]
        lines.append(f"{Path(r.video).name:<{width}}  " + "  ".join(f"{c:8.3f}" for c in cells))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
