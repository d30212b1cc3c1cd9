"""The plain one-question-per-forward loop against the engine, answer and reason mode, in one process.

    python benchmarks/engine.py --config small                 # CPU: the issue #3 done-when figures
    python benchmarks/engine.py --config tiny --videos 8       # the test model, seconds
    python benchmarks/engine.py --config 7b --videos 64        # GPU only: Qwen2.5-VL-7B architecture

Both paths score the same real .mp4 clips (finger_reward.synthetic, 448x448, decoded for real)
through `FingerReward.score`, so the engine's prefetch pipeline decodes chunk k+1 while the
model runs chunk k. Weights are random: throughput does not depend on them, and in reason mode
every question then writes `--max-new-tokens` tokens. Prints videos/s, the engine / plain ratio,
peak memory (CPU: the process's peak RSS; CUDA: max_memory_allocated), the share of wall time
the model waited on preprocessing, the largest P(Yes) difference between the two paths, the
achieved TFLOP/s (estimated FLOPs / time, `estimate_flops`) and, on a known GPU or with
--peak-tflops, its fraction of the dense bf16 peak.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finger_reward import FingerReward, Question
from finger_reward.engine import TransformersEngine, default_device_dtype
from finger_reward.synthetic import DEFECTS, questions_for, random_scene, render, write_video
from finger_reward.tiny import SPECIAL_TOKENS, build_model, build_processor
from measure import device_name, peak_mb, peak_reset

# Random-weight configurations. "small" keeps the 7B's proportions (MLP 5.3x hidden, grouped KV
# heads, a vision tower costing about a third of the decoder's prefill) at a size a CPU runs.
CONFIGS = {
    "small": dict(
        text=dict(hidden_size=512, intermediate_size=2752, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64, mrope_section=[8, 12, 12]),
        vision=dict(depth=4, hidden_size=128, intermediate_size=342, num_heads=2, fullatt_block_indexes=[1, 3]),
    ),
    # Qwen2.5-VL-7B-Instruct's config.json.
    "7b": dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, head_dim=128, mrope_section=[16, 24, 24], vocab_size=152064),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                    fullatt_block_indexes=[7, 15, 23, 31]),
    ),
}
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "A100": 312.0}  # dense


def build(name: str, processor, device, dtype, attn: str | None):
    """The named model with random weights, on `device` in `dtype`."""
    if name == "tiny":
        return build_model(processor.tokenizer).to(device, dtype)
    import transformers as tf

    spec = CONFIGS[name]
    ids = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = {k: v for k, v in spec["text"].items() if k != "mrope_section"}
    text = dict({"vocab_size": len(processor.tokenizer), **text}, max_position_embeddings=32768,
                bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": spec["text"]["mrope_section"]})
    vision = dict(spec["vision"], out_hidden_size=text["hidden_size"], window_size=112)
    config = tf.Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForImageTextToText.from_config(config, dtype=dtype, **({"attn_implementation": attn} if attn else {}))
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model.eval()


def write_clips(root: Path, count: int, size: int, seconds: float) -> tuple[list[Path], list[str], list[Question]]:
    """Synthetic clips at 8 fps as .mp4, their prompts, and 16 questions per prompt (10 + 6 rephrased)."""
    rng = np.random.default_rng(0)
    defects = [None, *DEFECTS.values()]
    paths, prompts, bank = [], [], {}
    for i in range(count):
        scene = random_scene(rng)
        frames = render(scene, defects[i % len(defects)], num_frames=int(seconds * 8), height=size, width=size, seed=i)
        paths.append(write_video(frames, root / f"clip{i}.mp4", fps=8))
        prompts.append(scene.prompt)
        if scene.prompt not in bank:
            base = questions_for(scene)
            bank[scene.prompt] = base + [Question(q.prompt, q.dimension, q.entity, "Looking closely, " + q.question[0].lower()
                                                  + q.question[1:], q.positive) for q in base[:6]]
    return paths, prompts, [q for qs in bank.values() for q in qs]


@dataclass
class Run:
    videos_per_s: float
    peak_mb: float
    wait_share: float
    p_yes: list[float]
    flops: float


def timed_score(reward: FingerReward, paths, prompts, device) -> tuple[float, float, list]:
    reward.score(paths[:1], prompts[:1])  # warm-up: first-call allocations and kernels
    peak_reset(device)
    start = time.perf_counter()
    results = reward.score(paths, prompts)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, peak_mb(device), results


# ---- FLOPs ----------------------------------------------------------------------------------------


def estimate_flops(model, prefix: int, grid: tuple[int, int, int], suffixes: list[int], *, generated: int = 0,
                   plain: bool) -> float:
    """Estimated FLOPs to answer one video's questions: 2 x parameters x tokens, plus attention, ViT included.

    `prefix` tokens (system + video), the video's patch `grid` (t, h, w), one suffix length per question,
    `generated` reason tokens per question (plus the ~5 tokens that close the reason). The engine
    encodes the video once and scores each question's suffix over the shared cache; the plain loop
    encodes the whole prompt (vision tower included) per question, and in reason mode generates and
    then runs one more full forward over prompt + reason. The LM head counts once per scored row
    and per generated token.
    """
    text, vision = model.config.text_config, model.config.vision_config
    lm = sum(p.numel() for n, p in model.model.language_model.named_parameters() if "embed_tokens" not in n)
    vit = sum(p.numel() for p in model.model.visual.parameters())
    head = 2 * text.hidden_size * text.vocab_size
    attn = 4 * text.num_hidden_layers * text.num_attention_heads * (text.hidden_size // text.num_attention_heads)

    def decoder(tokens: int, context_before: int) -> float:  # `tokens` new tokens after `context_before` cached
        return 2 * lm * tokens + attn * tokens * (context_before + (tokens + 1) / 2)

    full = set(vision.fullatt_block_indexes)
    patches, per_frame = grid[0] * grid[1] * grid[2], grid[1] * grid[2]  # full attention spans one temporal patch
    window = (vision.window_size // vision.patch_size) ** 2  # window attention: 8x8 patches
    vit_attn = sum(4 * vision.hidden_size * patches * (per_frame if i in full else window) for i in range(vision.depth))
    video = 2 * vit * patches + vit_attn
    closing = 5 if generated else 0
    if plain:
        total = 0.0
        for s in suffixes:
            total += video + decoder(prefix + s, 0) + head
            if generated:
                total += sum(decoder(1, prefix + s + g) + head for g in range(generated))
                total += video + decoder(prefix + s + generated + closing, 0) + head
        return total
    total = video + decoder(prefix, 0)
    for s in suffixes:
        total += decoder(s, prefix) + head
        total += sum(decoder(1, prefix + s + g) + head for g in range(generated))
        total += decoder(closing, prefix + s + generated) + (head if generated else 0)
    return total


def peak_tflops(device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


# ---- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["tiny", "small", "7b"], default="small")
    parser.add_argument("--modes", default="answer,reason", help="comma-separated: answer, reason")
    parser.add_argument("--videos", type=int, help="clips scored per run (default: tiny 8, small 4, 7b 64)")
    parser.add_argument("--plain-videos", type=int, help="clips for the plain loop, the first of the engine's "
                        "(default: as many; 7b: 16)")
    parser.add_argument("--size", type=int, default=448, help="frame height and width (448: the paper's setting)")
    parser.add_argument("--seconds", type=float, default=5.0, help="clip length; sampled at 2 fps")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="reason length (random weights never stop early)")
    parser.add_argument("--max-batch-tokens", default="auto", help="the engine's token budget, or 'auto'")
    parser.add_argument("--chunk-size", type=int, help="videos per model call (default: tiny/small 2, 7b 32)")
    parser.add_argument("--prefetch", type=int, help="decoding threads (default: FingerReward's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the engine's model")
    parser.add_argument("--attn", help="attn_implementation for small/7b (default: transformers'; e.g. flash_attention_2)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: looked up by name)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device, dtype = default_device_dtype(args.device)
    if args.config == "7b" and device.type != "cuda":
        parser.error("--config 7b needs a CUDA GPU (about 17 GB of bf16 weights)")
    videos = args.videos or {"tiny": 8, "small": 4, "7b": 64}[args.config]
    plain_videos = min(videos, args.plain_videos or (16 if args.config == "7b" else videos))
    chunk = args.chunk_size or (32 if args.config == "7b" else 2)
    budget = args.max_batch_tokens if args.max_batch_tokens == "auto" else int(args.max_batch_tokens)
    processor = build_processor()
    model = build(args.config, processor, device, dtype, args.attn)
    params = sum(p.numel() for p in model.parameters())
    peak = peak_tflops(device, args.peak_tflops)

    with tempfile.TemporaryDirectory() as tmp:
        paths, prompts, bank = write_clips(Path(tmp), videos, args.size, args.seconds)
        print(f"config={args.config} params={params / 1e6:.1f}M device={device} ({device_name(device)}) dtype={dtype} "
              f"videos={videos} plain_videos={plain_videos} clip={args.size}x{args.size}, {args.seconds:g} s at 2 fps "
              f"chunk_size={chunk} max_batch_tokens={budget} compile={args.compile}")
        for mode in args.modes.split(","):
            options = dict(mode=mode, max_new_tokens=args.max_new_tokens)
            engines = {
                "plain": TransformersEngine(model, processor, share_prefix=False, **options),
                "engine": TransformersEngine(model, processor, max_batch_tokens=budget, compile=args.compile, **options),
            }
            runs, shape = {}, None
            for name, engine in engines.items():
                n = plain_videos if name == "plain" else videos
                reward = FingerReward(engine, questions=bank, max_pixels=args.size * args.size, fps=2.0,
                                      prefetch=args.prefetch, chunk_size=chunk)
                shape = shape or shapes(engines["engine"], reward, paths[0], prompts[0])
                seconds, memory, results = timed_score(reward, paths[:n], prompts[:n], device)
                flops = n * estimate_flops(model, *shape, generated=args.max_new_tokens if mode == "reason" else 0,
                                           plain=name == "plain")
                runs[name] = Run(n / seconds, memory, reward.stats.wait_share,
                                 [q.p_yes for r in results for q in r.questions], flops / seconds)
            report(mode, runs, plain_videos, shape, peak, device)


def shapes(engine: TransformersEngine, reward: FingerReward, path, prompt) -> tuple[int, tuple, list[int]]:
    """(prefix tokens, video patch grid (t, h, w), suffix tokens per question) of one clip, for the FLOP estimate."""
    job = reward._prepare_one(path, prompt, str(path), {})
    inputs = engine.preprocess(job.clip)
    grid = tuple(int(x) for x in inputs["video_grid_thw"][0])
    return inputs["input_ids"].shape[1], grid, [len(engine._suffix_ids(q.question)) for q in job.questions]


def report(mode: str, runs: dict[str, Run], plain_videos: int, shape, peak: float | None, device) -> None:
    plain, engine = runs["plain"], runs["engine"]
    prefix, grid, suffixes = shape
    patches = grid[0] * grid[1] * grid[2]
    same = min(len(plain.p_yes), len(engine.p_yes))
    diff = max(abs(a - b) for a, b in zip(plain.p_yes[:same], engine.p_yes[:same]))
    print(f"\n[{mode}] prefix {prefix} tokens ({patches} patches), {len(suffixes)} questions of "
          f"{min(suffixes)}-{max(suffixes)} tokens; max |dP(Yes)| engine vs plain = {diff:.1e}")
    for name, run in runs.items():
        line = (f"  {name:6s}: {run.videos_per_s:8.3f} videos/s   peak {'GPU' if device.type == 'cuda' else 'RSS'} "
                f"{run.peak_mb:8.0f} MiB   model waited on preprocessing {100 * run.wait_share:5.1f}% of wall time")
        line += f"   {run.flops / 1e12:7.3f} TFLOP/s"
        line += f" ({100 * run.flops / 1e12 / peak:4.1f}% of {peak:g} bf16 peak)" if peak else ""
        print(line)
    print(f"  engine / plain: {engine.videos_per_s / plain.videos_per_s:.2f}x")


if __name__ == "__main__":
    main()
