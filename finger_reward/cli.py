"""The `finger-reward` command: score videos, run the demo, build a tiny model."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from finger_reward.errors import FingerError
from finger_reward.jsonl import read_jsonl
from finger_reward.pretrained import SLOWFAST_THRESHOLD, slowfast_threshold
from finger_reward.questions import DIMENSIONS
from finger_reward.results import json_safe

MODEL_ENV = "FINGER_REWARD_MODEL"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from finger_reward.scorefile import Interrupted

    try:
        return args.run(args)
    except Interrupted as err:
        print(f"finger-reward: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("finger-reward: interrupted", file=sys.stderr)
        return 130
    except (FingerError, FileNotFoundError, ImportError) as err:
        print(f"finger-reward: error: {err}", file=sys.stderr)
        return 2


# eval --help: each benchmark's data format, two lines of it
EVAL_FORMATS = """data formats (video paths are relative to --video-root, default the data file's folder):
  --benchmark finger: FingER-Instruct JSONL, one human-answered question per line (`finger-reward synthetic` writes one)
    {"prompt": "a dog runs", "dimension": "dynamic_degree", "entity": "dog", "question": "Does the dog run?", "positive": true, "video": "v/1.mp4", "answer": "Yes"}
    {"prompt": "a dog runs", "dimension": "visual_quality", "entity": "dog", "question": "Is the dog blurry?", "positive": false, "video": "v/1.mp4", "answer": "No"}
  --benchmark genai (ratings): genai_video.json or its folder; a video is ROOT/<model>/<prompt id>.mp4
    {"00001": {"prompt": "a dog runs", "models": {"ModelA": [4, 5, 4], "ModelB": [2, 3]}},
     "00002": {"prompt": "a cat sleeps", "models": {"ModelA": [3, 3, 4], "ModelB": [5, 4]}}}
  --benchmark genai (arena votes): JSONL, CSV or parquet rows; vote_type leftvote|rightvote|tievote|bothbad_vote
    {"prompt": "a dog runs", "left_video": "a/1.mp4", "right_video": "b/1.mp4", "vote_type": "leftvote"}
    {"prompt": "a cat sleeps", "left_video": "a/2.mp4", "right_video": "b/2.mp4", "vote_type": "tievote"}
  --benchmark videogen-rewardbench: CSV; Overall, VQ, MQ, TA in A|B|same
    path_A,path_B,prompt,Overall,VQ,MQ,TA
    a/1.mp4,b/1.mp4,a dog runs,A,A,same,B
  --benchmark monetbench: JSONL or CSV rows; standard_answer video1|video2|tie
    {"prompt": "a dog runs", "video1_path": "a/1.mp4", "video2_path": "b/1.mp4", "standard_answer": "video1"}
    {"prompt": "a cat sleeps", "video1_path": "a/2.mp4", "video2_path": "b/2.mp4", "standard_answer": "tie"}
"""

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finger-reward", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    score = commands.add_parser("score", help="score videos against a prompt")
    score.add_argument("videos", nargs="+", metavar="VIDEO", help="video files")
    score.add_argument("--prompt", required=True, help="the text prompt the videos were generated from")
    score.add_argument("--questions", help="question bank JSONL holding the prompt's questions (default: template questions)")
    _add_model_options(score)
    _add_server_options(score)
    score.add_argument("--json", action="store_true", help="print one JSON object per video instead of tables")
    score.set_defaults(run=_score)

    score_dir = commands.add_parser("score-dir", help="score many videos, writing results as it goes (resumable)")
    score_dir.add_argument("video_dir", help="directory the prompts file's video paths are relative to")
    score_dir.add_argument("--prompts", required=True, help='JSONL: {"video": "relative/path.mp4", "prompt": "..."} per line')
    score_dir.add_argument("--questions", help="question bank JSONL (default: template questions)")
    score_dir.add_argument("--out", required=True, help="results JSONL; videos already scored in it are skipped "
                                                        "(a video is known by its path relative to VIDEO_DIR)")
    score_dir.add_argument("--chunk", type=int, default=16, help="videos per scoring call (results are saved per chunk)")
    _add_resume_options(score_dir)
    _add_model_options(score_dir)
    _add_server_options(score_dir)
    on_ray = score_dir.add_argument_group("scoring on Ray Data with a pool of model replicas")
    on_ray.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                        help="run on Ray: alone, a local Ray (or $RAY_ADDRESS); 'auto' or an address joins a cluster; "
                             "--chunk videos per batch, results written as they arrive")
    on_ray.add_argument("--workers", type=int, help="model replicas (default: one per GPU of the cluster, else 1)")
    on_ray.add_argument("--gpus-per-worker", type=float, help="default: 1 when the cluster has GPUs, else 0")
    on_ray.add_argument("--cpus-per-worker", type=float, help="default: 1 (also a CPU worker's torch threads)")
    score_dir.set_defaults(run=_score_dir)

    questions = commands.add_parser("questions", help="generate a question bank from prompts (resumable)")
    questions.add_argument("--prompts", required=True, help="prompts: .txt (one per line) or .jsonl ({\"prompt\": ...} per line)")
    questions.add_argument("--out", required=True, help="question bank JSONL; prompts already in it are skipped")
    questions.add_argument("--generator", choices=sorted(GENERATORS), default="template")
    questions.add_argument("--model", help="LLM name (openai) or checkpoint (transformers)")
    questions.add_argument("--base-url", help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL or OpenAI)")
    questions.add_argument("--api-key", help="default: $OPENAI_API_KEY")
    questions.add_argument("--config", help="question-generation YAML (default: the packaged configs/questions.yaml)")
    questions.add_argument("--max-per-dimension", type=int, help="cap per dimension (default: from the config)")
    questions.add_argument("--fallback", choices=["template", "none"], default="none",
                           help="what prompts the LLM fails on get (default: reported as errors)")
    questions.add_argument("--chunk", type=int, default=16, help="prompts per request round; each round is saved")
    questions.set_defaults(run=_questions)

    serve = commands.add_parser("serve", help="serve FingerReward over HTTP (one process, or Ray Serve with --replicas)")
    serve.add_argument("--config", help="YAML of ServeConfig fields (see configs/serve.yaml); flags override it")
    serve.add_argument("--model", help="checkpoint directory or hub id")
    serve.add_argument("--questions", help="question bank JSONL (default: template questions for new prompts)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="default 8000")
    serve.add_argument("--replicas", type=int, help="run on Ray Serve with this many model replicas")
    serve.add_argument("--token", help="require 'Authorization: Bearer <token>'")
    serve.add_argument("--allow-path", help="accept videos by path inside this directory")
    serve.add_argument("--mode", choices=["answer", "reason"])
    serve.add_argument("--video-fps", type=float,
                       help="frame rate of in-memory frames a request sends without one (a request's video_fps wins)")
    _add_slowfast_option(serve)
    serve.set_defaults(run=_serve)

    evaluate = commands.add_parser("eval", help="agreement with human judgements on a benchmark (the paper's tables)",
                                   epilog=EVAL_FORMATS, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_argument("--benchmark", required=True, help="finger | genai | pairs (or a loader name)")
    evaluate.add_argument("--data", required=True, help="the benchmark's annotation file")
    evaluate.add_argument("--video-root", help="directory the annotation's video paths are relative to (default: its folder)")
    evaluate.add_argument("--video-map", help="videos named by URL or file name -> local paths: a JSON object, or "
                                              "CSV/JSONL rows with url and path (GenAI-Bench arena rows may carry URLs)")
    evaluate.add_argument("--questions", help="question bank for rating/pair benchmarks (default: template questions)")
    evaluate.add_argument("--out", help="write the figures as JSON here")
    evaluate.add_argument("--scores", help="per-video results JSONL; an existing file is resumed (default: next to --out)")
    evaluate.add_argument("--report", help="also write an HTML report with human scores here")
    _add_resume_options(evaluate)
    _add_model_options(evaluate)
    _add_server_options(evaluate)
    evaluate.set_defaults(run=_eval)

    report = commands.add_parser("report", help="an HTML page of results: frames, scores, questions, plots")
    report.add_argument("results", help="results JSONL (from score --json or eval --scores)")
    report.add_argument("--out", required=True, help="HTML file to write")
    report.set_defaults(run=_report_html)

    curves = commands.add_parser("plot-training", help="training curves (rewards, losses, KL) of a trainer's output_dir as a PNG")
    curves.add_argument("run_dir", metavar="RUN", help="a trainer's output_dir, or its metrics.jsonl / log.jsonl / trainer_state.json")
    curves.add_argument("--out", required=True, help="PNG file to write")
    curves.add_argument("--keys", type=lambda text: [k.strip() for k in text.split(",") if k.strip()],
                        help="comma-separated metrics to plot (default: every metric logged at two or more steps)")
    curves.set_defaults(run=_plot_training)

    pairs = commands.add_parser("select-pairs", help="generate candidates per prompt and keep Diffusion-DPO pairs")
    pairs.add_argument("--pipeline", required=True, help="diffusers video pipeline directory or hub id (e.g. Wan 2.1)")
    pairs.add_argument("--prompts", required=True, help="prompts: .txt (one per line) or .jsonl")
    pairs.add_argument("--num-candidates", type=int, default=4)
    pairs.add_argument("--out", required=True, help="output directory (videos/, pairs.jsonl); an existing run resumes")
    pairs.add_argument("--strategy", choices=["best_worst", "all_pairs", "round_robin"], default="best_worst")
    pairs.add_argument("--margin", type=float, default=0.0, help="minimum score gap of a pair")
    pairs.add_argument("--dimension", choices=DIMENSIONS, help="select by this dimension's score instead of overall")
    pairs.add_argument("--seed", type=int, default=0, help="candidate k of every prompt uses seed + k")
    pairs.add_argument("--num-frames", type=int, default=33)
    pairs.add_argument("--height", type=int, default=480)
    pairs.add_argument("--width", type=int, default=832)
    pairs.add_argument("--steps", type=int, default=30, help="pipeline inference steps")
    pairs.add_argument("--video-fps", type=float,
                       help="frame rate the candidates are written at (default: the pipeline's own: Wan 16, LTX-Video 24)")
    pairs.add_argument("--reward-url", help="score through a running finger-reward service")
    pairs.add_argument("--reward-token", default=os.environ.get("FINGER_REWARD_TOKEN"),
                       help="the service's token (default: $FINGER_REWARD_TOKEN)")
    pairs.add_argument("--questions", help="question bank JSONL (default: template questions)")
    pairs.add_argument("--model", default=os.environ.get(MODEL_ENV), help=f"FingER checkpoint (default: ${MODEL_ENV})")
    pairs.set_defaults(run=_select_pairs)

    demo = commands.add_parser("demo", help="score synthetic clips (clean and defective) with the tiny evaluator "
                                                 "(--model random: an untrained tiny model; or any checkpoint)")
    demo.add_argument("--out", help="where to write the clips (default: a new temporary directory)")
    _add_model_options(demo, model_required=False)
    demo.add_argument("--json", action="store_true", help="print one JSON object per video instead of tables")
    demo.add_argument("--seed", type=int, default=0, help="which synthetic scene to draw")
    demo.set_defaults(run=_demo)

    world = commands.add_parser("synthetic", help="write a synthetic world: clips with known defects, a question "
                                                  "bank and FingER-Instruct JSONL (training and test data)")
    world.add_argument("out_dir", help="directory for videos/, questions.jsonl and instruct.jsonl")
    world.add_argument("--scenes", type=int, default=10, help="distinct scenes (colour, shape, direction), at most 60")
    world.add_argument("--clips-per-scene", type=int, default=1, help="renders of every (scene, defect), each seeded")
    world.add_argument("--frames", type=int, default=8, help="frames per clip")
    world.add_argument("--fps", type=float, default=2.0, help="frame rate of the written clips")
    world.add_argument("--balanced", action="store_true",
                       help="instruct JSONL with as many fine as broken answers per dimension (for training)")
    world.add_argument("--seed", type=int, default=0)
    world.set_defaults(run=_synthetic)

    tiny = commands.add_parser("make-tiny-model", help="write a tiny random-weight Qwen2.5-VL checkpoint")
    tiny.add_argument("out_dir", help="directory to write the checkpoint to")
    tiny.add_argument("--arch", choices=["qwen2_5_vl", "qwen3_vl"], default="qwen2_5_vl")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_make_tiny)
    return parser


def _add_model_options(parser: argparse.ArgumentParser, model_required: bool = True) -> None:
    where = f"(default: ${MODEL_ENV})" if model_required else "(default: tiny)"
    parser.add_argument("--model", default=os.environ.get(MODEL_ENV) if model_required else "tiny",
                        help=f"checkpoint directory, hub id, or 'tiny' (the trained tiny evaluator shipped with "
                             f"the package) {where}")
    parser.add_argument("--mode", choices=["answer", "reason"],
                        help="default: the checkpoint's finger_reward.json, else answer")
    parser.add_argument("--aggregate", choices=["mean", "sum"], default="mean")
    parser.add_argument("--weights", type=_weights, help="dimension weights, e.g. visual_quality=2,text_alignment=1")
    parser.add_argument("--fps", type=float, help="frames sampled per second (default: the checkpoint's, else 2)")
    parser.add_argument("--max-pixels", type=int, help="pixels per frame (default: the checkpoint's, else 448x448)")
    _add_slowfast_option(parser)
    parser.add_argument("--max-new-tokens", type=int, default=256, help="reason length limit in reason mode")
    parser.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: cuda when present)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: bf16 on GPU, fp32 on CPU")


def _add_resume_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--retry-failed", action=argparse.BooleanOptionalAction, default=True,
                        help="score again the videos whose rows in the results file failed, replacing those rows "
                             "(default; --no-retry-failed keeps them)")
    parser.add_argument("--max-failures", type=_max_failures, default=("share", 0.1), metavar="N|P%",
                        help="exit 1 when more videos than this fail: a count, or a share such as 10%% (default 10%%); "
                             "the exit is 1 whenever every video failed")


def _max_failures(text: str) -> tuple[str, float]:
    """A --max-failures value: ("share", P) for 'P%' or a fraction below 1, ("count", N) for a whole number."""
    try:
        value = float(text.strip().rstrip("%"))
    except ValueError:
        value = -1.0
    if text.strip().endswith("%") and 0 <= value <= 100:
        return ("share", value / 100)
    if 0 <= value < 1:
        return ("share", value)
    if value >= 1 and value.is_integer():
        return ("count", value)
    raise argparse.ArgumentTypeError(f"{text!r}: expected a count of videos (e.g. 5) or a share (e.g. 10% or 0.1)")


def _add_slowfast_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slowfast", type=_slowfast, nargs="?", const=SLOWFAST_THRESHOLD, metavar="THRESHOLD",
                        help="Q-Save SlowFast frames: a frame whose patch similarity to the last full-size frame "
                             f"exceeds THRESHOLD (default {SLOWFAST_THRESHOLD}) goes in at a quarter of the pixels; "
                             "logs the tokens saved. 'off': plain frames (default: as the checkpoint was trained)")


def _slowfast(text: str) -> float | bool:
    """A --slowfast value: a threshold in (0, 1], or False for 'off'."""
    if text.strip().lower() == "off":
        return False
    try:
        return slowfast_threshold(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a patch similarity threshold in (0, 1], e.g. 0.9, "
                                         "or 'off'") from None


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
    from finger_reward.pretrained import as_slowfast
    from finger_reward.reward import FingerReward

    options = dict(
        questions=questions, max_new_tokens=args.max_new_tokens, aggregate=args.aggregate, weights=args.weights,
        on_error="nan", progress=len(getattr(args, "videos", ())) > 4,
    )
    # Left unset, these come from the checkpoint (finger_reward.json) or the library defaults.
    options.update({k: v for k, v in dict(mode=args.mode, fps=args.fps, max_pixels=args.max_pixels).items()
                    if v is not None})
    if args.slowfast is not None:  # "off" (False): plain frames, whatever the checkpoint was trained on
        options["slowfast"] = as_slowfast(args.slowfast or None)
    if getattr(args, "base_url", None):
        if args.device or args.dtype:
            raise FingerError("--device and --dtype are for a local model; the server at --base-url chooses its own")
        reward = FingerReward.from_openai(args.base_url, model, api_key=args.api_key, processor=args.processor,
                                          top_logprobs=args.top_logprobs, concurrency=args.concurrency, **options)
    elif getattr(args, "processor", None):
        raise FingerError("--processor checks a server's inputs: it goes with --base-url")
    else:
        try:
            reward = FingerReward.from_pretrained(model, device=args.device, dtype=args.dtype, **options)
        except OSError as err:  # transformers / huggingface_hub: no such repo, offline, missing weights
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise FingerError(f"--model {model}: cannot be loaded ({first}); expected a checkpoint directory "
                              "(config.json and weights) or a Hugging Face hub id") from None
    if reward.video_options["slowfast"] is not None:
        _log_info_to_stderr("finger_reward.reward")  # its per-video SlowFast token counts
    return reward


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scoring through an OpenAI-compatible server (vLLM, SGLang)")
    group.add_argument("--base-url", help="the server's URL, e.g. http://gpu-box:8000/v1; --model is then the served model name")
    group.add_argument("--processor", metavar="DIR",
                       help="the served checkpoint's directory (or 'tiny'): checks each video's first request against "
                            "the local processor, and gives mode, fps and max_pixels from its finger_reward.json")
    group.add_argument("--api-key", help="default: $OPENAI_API_KEY")
    group.add_argument("--top-logprobs", type=int,
                       help="K of top_logprobs (default 512: a random-weight tiny model scores; the server must allow "
                            "it, vLLM --max-logprobs; 20 is enough for a trained checkpoint)")
    group.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")


def _log_info_to_stderr(name: str) -> None:
    log = logging.getLogger(name)
    for old in [h for h in log.handlers if getattr(h, "finger_cli", False)]:  # an earlier main() call's stderr
        log.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("finger-reward: %(message)s"))
    handler.finger_cli = True
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def _check_model(args) -> None:
    """Refuse, before anything loads, a --model that cannot be a checkpoint and a --device this machine lacks."""
    if not args.model:
        raise FingerError(f"no model given: pass --model PATH or set ${MODEL_ENV}")
    if getattr(args, "base_url", None):
        return  # the served model's name: the server checks it
    _check_model_path(args.model)
    if args.device:
        _check_device(args.device)


def _check_model_path(model: str) -> None:
    if model in ("tiny", "random"):
        return
    path = Path(model).expanduser()
    expected = "expected a checkpoint directory (config.json and weights) or a Hugging Face hub id"
    if path.is_file():
        raise FingerError(f"--model {model}: is a file; {expected}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FingerError(f"--model {model}: directory has no config.json, so it is not a checkpoint; {expected}")
        return
    hub_like = not path.is_absolute() and not model.startswith((".", "~")) and model.count("/") <= 1 and \
        all(part and all(c.isalnum() or c in "-_." for c in part) for part in model.split("/"))
    if not hub_like:
        raise FingerError(f"--model {model}: no such directory; {expected}")
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "config.json"), str):
            raise FingerError(f"--model {model}: no such local directory, and the hub id is not in the Hugging Face "
                              f"cache while offline (HF_HUB_OFFLINE); {expected}")


def _hub_offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise FingerError(f"--device {device}: not a device; expected cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise FingerError(f"--device {device}: no CUDA GPU is visible on this machine "
                              "(torch.cuda.is_available() is False); expected --device cpu, or leave --device out")
        if parsed.index is not None and parsed.index >= count:
            raise FingerError(f"--device {device}: this machine has {count} CUDA GPU(s); expected cuda:0 to "
                              f"cuda:{count - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise FingerError(f"--device {device}: MPS is not available on this machine; expected --device cpu")


def _read_questions(path: str | None, fixed=None):
    """The question bank at `path` read now (before any model loads), or None for template questions;
    says once on stderr which questions the command uses."""
    from finger_reward.questions import QuestionBank

    if fixed is not None:
        print(f"finger-reward: questions: the benchmark's own ({len(fixed.prompts)} prompt(s))", file=sys.stderr)
        return fixed
    if path is None:
        print("finger-reward: questions: template generator (no --questions given)", file=sys.stderr)
        return None
    if not Path(path).is_file():
        what = "is a directory" if Path(path).is_dir() else "not found"
        raise FingerError(f"--questions {path}: {what}; expected a question bank JSONL "
                          "(finger-reward questions --prompts PROMPTS --out BANK writes one)")
    bank = QuestionBank.from_jsonl(path)
    print(f"finger-reward: questions: {path} ({len(bank.prompts)} prompt(s))", file=sys.stderr)
    return bank


def _check_video_root(root, option: str, expected: str) -> None:
    if not Path(root).is_dir():
        what = "is a file" if Path(root).exists() else "no such directory"
        raise FingerError(f"{option} {root}: {what}; expected {expected}")


def _score(args) -> int:
    _check_model(args)
    questions = _read_questions(args.questions)
    reward = _load_reward(args, args.model, questions)
    return _report(reward.score(args.videos, args.prompt), as_json=args.json)


def _score_dir(args) -> int:
    from finger_reward.scorefile import Progress, score_to_file

    _check_video_root(args.video_dir, "VIDEO_DIR", "the directory the prompts file's video paths are relative to")
    keys = read_video_prompts(args.prompts, args.video_dir)
    _check_model(args)
    questions = _read_questions(args.questions)
    progress = Progress()
    if args.ray is not None:
        _score_dir_on_ray(args, keys, questions, progress)
    else:
        ray_only = [name for name in ("workers", "gpus_per_worker", "cpus_per_worker") if getattr(args, name) is not None]
        if ray_only:
            raise FingerError(f"--{ray_only[0].replace('_', '-')} is an option of --ray: add --ray or drop it")
        score_to_file(_load_reward(args, args.model, questions), keys, args.out, root=args.video_dir,
                      retry_failed=args.retry_failed, chunk=args.chunk, progress=progress)
    hint = f"the prompts file's video paths are read relative to VIDEO_DIR ({args.video_dir})"
    return _summarise(progress, args.out, args.max_failures, hint)


def _score_dir_on_ray(args, keys, bank, progress):
    """`score-dir --ray`: every Ray actor builds its reward as `_load_reward` does, with the bank read here;
    videos are identified and retried as without Ray (keys relative to VIDEO_DIR)."""
    import functools

    from finger_reward.offline import score_on_ray

    if args.base_url:
        raise FingerError("--ray runs model replicas and --base-url scores through one server: pass one of them")
    _log_info_to_stderr("finger_reward.offline")  # the pool it starts, and how many videos each worker scored
    load = functools.partial(_load_reward, args, args.model, bank)
    score_on_ray(keys, args.out, load, address=args.ray or None, workers=args.workers,
                 gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker or 1.0,
                 batch_size=args.chunk, root=args.video_dir, retry_failed=args.retry_failed, progress=progress)


def _error_kind(error: str) -> str:
    """The kind of a video's error, without the file's name: 'file not found', 'not a video file', ..."""
    problem = error.split(": ", 1)[1] if error.startswith("video ") and ": " in error else error
    problem = problem.removeprefix("cannot be decoded: ")
    return problem.split(" (")[0].split(": ")[0].strip()


def _summarise(progress, out, max_failures: tuple[str, float], hint: str) -> int:
    """The last lines of score-dir and eval: counts, the first error of each kind, and the exit status
    (1 when every video failed, or more than --max-failures)."""
    kinds: dict[str, tuple[int, str]] = {}
    for error in progress.failed.values():
        count, first = kinds.get(_error_kind(error), (0, error))
        kinds[_error_kind(error)] = (count + 1, first)
    for kind, (count, first) in kinds.items():
        print(f"finger-reward: error: {count} x {kind}; the first: {first}", file=sys.stderr)
    if "file not found" in kinds:
        print(f"finger-reward: hint: {hint}", file=sys.stderr)
    failed = len(progress.failed)
    print(f"finger-reward: {progress.scored} scored, {failed} failed, {progress.skipped} skipped (already scored) "
          f"of {progress.total} video(s); results in {out}", file=sys.stderr)
    how, limit = max_failures
    allowed = limit * progress.total if how == "share" else limit
    return 1 if failed and (progress.scored + progress.skipped == 0 or failed > allowed) else 0


def read_video_prompts(path: str | Path, video_dir: str | Path) -> list[tuple[str, str]]:
    """(video path, prompt) pairs from a JSONL of {"video": ..., "prompt": ...}, paths joined to `video_dir`."""
    path, pairs = Path(path), []
    if not path.is_file():
        raise FingerError(f"prompts file {path} not found")
    for where, record in read_jsonl(path, objects=True):
        try:
            pairs.append((str(Path(video_dir) / record["video"]), str(record["prompt"])))
        except (KeyError, TypeError):
            raise FingerError(f'{where}: expected {{"video": ..., "prompt": ...}}') from None
    return pairs


def _demo(args) -> int:
    from finger_reward import synthetic
    from finger_reward.tiny import make_tiny_model

    _check_model(args)
    out = Path(args.out or tempfile.mkdtemp(prefix="finger-demo-"))
    # Clips as the tiny evaluator saw in training: 8 frames at 2 fps, every frame sampled.
    world = synthetic.make_world(out, num_scenes=1, num_frames=8, fps=2.0, seed=args.seed)
    model = args.model if args.model != "random" else str(make_tiny_model(out / "tiny-model"))
    note = {"tiny": " (the tiny evaluator trained on this synthetic world)",
            "random": " (a tiny random model: scores are not meaningful)"}.get(args.model, "")
    print(f"demo files in {out}{note}", file=sys.stderr)
    reward = _load_reward(args, model, world.bank_path)
    clips = world.clips
    return _report(reward.score([c.path for c in clips], [c.prompt for c in clips]), as_json=args.json, details=False)


def _template(args, config):
    from finger_reward.questions.template import TemplateGenerator

    return TemplateGenerator(max_per_dimension=args.max_per_dimension or config.max_per_dimension)


def _openai(args, config):
    from finger_reward.questions import OpenAIGenerator

    if not args.model:
        raise FingerError("--generator openai needs --model (the LLM's name at the endpoint)")
    return OpenAIGenerator(args.model, base_url=args.base_url, api_key=args.api_key, config=config,
                           max_per_dimension=args.max_per_dimension, fallback=_fallback(args, config))


def _transformers(args, config):
    from finger_reward.questions import TransformersGenerator

    if not args.model:
        raise FingerError("--generator transformers needs --model (a chat model checkpoint)")
    return TransformersGenerator(args.model, config=config, max_per_dimension=args.max_per_dimension,
                                 fallback=_fallback(args, config))


def _fallback(args, config):
    return _template(args, config) if args.fallback == "template" else None


GENERATORS = {"template": _template, "openai": _openai, "transformers": _transformers}


def _questions(args) -> int:
    from tqdm.auto import tqdm

    from finger_reward.questions import GenerationError, QuestionBank, load_question_config
    from finger_reward.questions.bank import append_jsonl

    config = load_question_config(args.config)
    generator = GENERATORS[args.generator](args, config)
    out = Path(args.out)
    done = QuestionBank.from_jsonl(out) if out.exists() else QuestionBank()
    todo = [p for p in dict.fromkeys(read_prompts(args.prompts)) if p not in done]
    failures = {}
    with tqdm(total=len(todo), desc="questions", unit="prompt") as bar:
        for start in range(0, len(todo), args.chunk):
            chunk = todo[start : start + args.chunk]
            try:
                results = generator.generate_questions(chunk)
            except GenerationError as err:
                results = err.results
                failures.update(err.failures)
            append_jsonl(out, (q for p in chunk for q in results.get(p, [])))
            bar.update(sum(p in results for p in chunk))  # the bar counts prompts that got questions
    for prompt, why in failures.items():
        print(f"finger-reward: error: prompt {prompt!r}: {why}", file=sys.stderr)
    print(f"{len(todo) - len(failures)} prompt(s) added to {out} ({len(done)} were there already)", file=sys.stderr)
    return 1 if failures else 0


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .txt file (one per line) or a .jsonl file ({"prompt": ...} or a string per line)."""
    path = Path(path)
    if not path.is_file():
        raise FingerError(f"prompts file {path} not found")
    if path.suffix != ".jsonl":
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = []
    for where, record in read_jsonl(path):
        prompt = record.get("prompt") if isinstance(record, dict) else record
        if not isinstance(prompt, str):
            raise FingerError(f'{where}: expected a JSON string or an object with a "prompt" string')
        prompts.append(prompt)
    return prompts


def _serve(args) -> int:
    from finger_reward.serve.config import ServeConfig

    overrides = {k: getattr(args, k)
                 for k in ("model", "questions", "host", "port", "replicas", "token", "allow_path", "mode", "slowfast",
                           "video_fps")}
    try:
        config = ServeConfig.from_yaml(args.config, **overrides)
    except (ValueError, OSError) as err:
        raise FingerError(str(err)) from None
    if not config.model:
        raise FingerError("no model given: pass --model PATH or set model: in --config")
    _check_model_path(str(config.model))
    _read_questions(config.questions)  # a bad path fails here, before the model loads
    if config.replicas:
        from finger_reward.serve.ray_app import run_ray

        run_ray(config)
        return 0
    from finger_reward.serve.local import LocalServer

    server = LocalServer(config.build_reward(), config)
    print(f"finger-reward: serving {config.model} on http://{config.host}:{config.port} (Ctrl-C stops)", file=sys.stderr)
    server.run()
    return 0


def _eval(args) -> int:
    from finger_reward.evaluation import evaluate as ev
    from finger_reward.evaluation.loaders import load_benchmark
    from finger_reward.evaluation.tables import load_video_map

    from finger_reward.scorefile import Progress

    if args.video_root is not None:
        _check_video_root(args.video_root, "--video-root", "the directory the data file's video paths are relative to")
    video_map = load_video_map(args.video_map) if args.video_map else None
    bench = load_benchmark(args.benchmark, args.data, args.video_root, video_map=video_map)
    _check_model(args)
    scores_path = Path(args.scores or (Path(args.out).with_suffix(".scores.jsonl") if args.out
                                       else Path(tempfile.mkdtemp(prefix="finger-eval-")) / "scores.jsonl"))
    questions = _read_questions(args.questions, fixed=ev.benchmark_bank(bench))
    reward = _load_reward(args, args.model, questions)
    root = args.video_root if args.video_root is not None else Path(args.data).parent
    progress = Progress()
    scored = ev.score_benchmark(reward, bench, scores_path, root=root, retry_failed=args.retry_failed,
                                progress=progress)
    figures = ev.agreement(bench, scored)
    figures["scores"] = str(scores_path)
    print(ev.format_table(figures))
    if args.out:
        Path(args.out).write_text(json.dumps(json_safe(figures), indent=2, allow_nan=False))
    if args.report:
        from finger_reward.report import write_report

        human = ev.human_by_video(bench)
        write_report([(result, human.get(key)) for key, result in scored.items()], args.report,
                     summary=ev.format_table(figures))
    hint = (f"the data file's video paths are read relative to {root}"
            + ("" if args.video_root is not None else " (its folder); pass --video-root DIR where the videos are"))
    return _summarise(progress, scores_path, args.max_failures, hint)


def _report_html(args) -> int:
    from finger_reward.report import load_results, write_report

    print(write_report(load_results(args.results), args.out))
    return 0


def _plot_training(args) -> int:
    from finger_reward.training_curves import plot_training

    names = plot_training(args.run_dir, args.out, keys=args.keys)
    print(f"{args.out}: {len(names)} curve(s): {', '.join(names)}")
    return 0


def _select_pairs(args) -> int:
    from diffusers import DiffusionPipeline

    from finger_reward.dpo_pairs import select_dpo_pairs

    if bool(args.reward_url) == bool(args.model):
        raise FingerError("pass exactly one of --reward-url URL or --model PATH")
    if args.reward_url:
        from finger_reward.serve import FingerRewardClient

        reward = FingerRewardClient(args.reward_url, token=args.reward_token)
    else:
        from finger_reward.reward import FingerReward

        reward = FingerReward.from_pretrained(args.model, questions=args.questions)
    pipeline = DiffusionPipeline.from_pretrained(args.pipeline)
    if hasattr(pipeline, "to"):
        import torch

        pipeline = pipeline.to("cuda" if torch.cuda.is_available() else "cpu")
    out = select_dpo_pairs(
        pipeline, read_prompts(args.prompts), reward, args.out, num_candidates=args.num_candidates,
        strategy=args.strategy, margin=args.margin, dimension=args.dimension, seed=args.seed,
        pipeline_kwargs=dict(num_frames=args.num_frames, height=args.height, width=args.width,
                             num_inference_steps=args.steps),
        video_fps=args.video_fps,
    )
    print(out)
    return 0


def _synthetic(args) -> int:
    from finger_reward import synthetic

    world = synthetic.make_world(args.out_dir, num_scenes=args.scenes, clips_per_scene=args.clips_per_scene,
                                 num_frames=args.frames, fps=args.fps, balanced=args.balanced, seed=args.seed,
                                 progress=True)
    print(f"{len(world.clips)} clips in {Path(args.out_dir) / 'videos'}; bank {world.bank_path}; "
          f"instruct {world.instruct_path}; prompts {world.prompts_path}")
    print(f"score them: finger-reward score-dir {args.out_dir} --prompts {world.prompts_path} --model tiny "
          f"--out {Path(args.out_dir) / 'results.jsonl'}")
    return 0


def _make_tiny(args) -> int:
    from finger_reward.tiny import make_tiny_model

    print(make_tiny_model(args.out_dir, arch=args.arch, seed=args.seed))
    return 0


def _report(results, as_json: bool, details: bool = True) -> int:
    """Print results (a JSON line per video, failed ones with `error`, or tables); failures also go to
    stderr, one line each, and exit 1."""
    for result in results:
        if as_json:  # a row for every input; a failed one carries its error
            print(json.dumps(json_safe(result.to_dict()), allow_nan=False))
        if not result.ok:
            print(f"finger-reward: error: {result.error}", file=sys.stderr)
        elif details and not as_json:
            print(format_table(result))
    scored = [r for r in results if r.ok]
    if not as_json and scored and (len(scored) > 1 or not details):
        print(format_summary(scored))
    return 0 if len(scored) == len(results) else 1


_MISSING = {"yes": "no Yes", "no": "no No", "partial": "not every Yes/No spelling"}


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
        flag = f"  ({_MISSING[q.missing_variant]} in the server's top tokens)" if q.missing_variant else ""
        lines.append(f"    [{sign}] {q.answer:<3} P(Yes)={q.p_yes:.3f} score={q.score:.3f}  {q.question}{flag}")
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
