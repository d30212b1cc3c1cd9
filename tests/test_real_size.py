"""One rehearsal at real size: Wan-shaped videos (33 and 81 frames of 480x832 at 16 fps) through every reward path.

The tiny evaluator (answer mode, for CPU time) scores them in process, through the client and a
real server on 127.0.0.1, through TRL's reward function, verl's reward manager and
select_dpo_pairs. Each path must show the model the frames real time gives (4 frames of 2.06 s,
10 of 5.06 s, at 336x588), send sampled frames rather than raw pixels, and never meet a 413.
"""

import json

import numpy as np
import pytest
import torch

from finger_reward import FingerReward
from finger_reward.serve import FingerRewardClient, ServeConfig
from finger_reward.serve.local import LocalServer

PROMPT = "a red circle moves from left to right"
HEIGHT, WIDTH, FPS = 480, 832, 16
SAMPLED = {33: {"frames": 4, "fps": 4 / (33 / 16), "height": 336, "width": 588},
           81: {"frames": 10, "fps": 10 / (81 / 16), "height": 336, "width": 588}}
RAW_81 = 81 * HEIGHT * WIDTH * 3  # 97 MB: what the client used to send, as .npy


def wan_like(seed: int, frames: int) -> np.ndarray:
    """uint8 (frames, 480, 832, 3): a smooth random scene panning 2 px a frame (compresses as video does)."""
    g = torch.Generator().manual_seed(seed)
    field = torch.nn.functional.interpolate(torch.rand(1, 3, 24, 40, generator=g), mode="bicubic",
                                            size=(HEIGHT + 2 * frames, WIDTH + 2 * frames), align_corners=False)
    field = (field.clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    return np.stack([field[2 * t: 2 * t + HEIGHT, 2 * t: 2 * t + WIDTH] for t in range(frames)])


@pytest.fixture(scope="module")
def clips():
    return {33: wan_like(0, 33), 81: wan_like(1, 81)}


@pytest.fixture(scope="module")
def reward():
    return FingerReward.from_pretrained("tiny", mode="answer")


@pytest.fixture(scope="module")
def direct(reward, clips):
    return dict(zip(clips, reward.score(list(clips.values()), PROMPT, video_fps=FPS)))


@pytest.fixture(scope="module")
def server(reward):
    with LocalServer(reward, ServeConfig(port=0, max_wait_ms=5)) as running:  # default limits
        yield running


def assert_same(got, want):
    assert got.ok, got.error
    assert got.sampled == want.sampled
    assert [q.p_yes for q in got.questions] == pytest.approx([q.p_yes for q in want.questions], abs=1e-6)
    assert got.overall == pytest.approx(want.overall, abs=1e-6)


def no_413(server):
    assert 413 not in server.api.telemetry.requests


def test_in_process_sees_real_time(direct):
    for frames, result in direct.items():
        assert result.ok and result.sampled == SAMPLED[frames]


def test_client_and_server_send_sampled_frames(server, clips, direct):
    client = FingerRewardClient(server.url)
    got = client.score(list(clips.values()), PROMPT, video_fps=FPS)
    for frames, result in zip(clips, got):
        assert_same(result, direct[frames])
    assert client.stats.requests == 1
    assert client.stats.bytes_sent < (4 + 10) * 336 * 588 * 3 * 4 / 3 + 10_000  # at most the sampled frames, base64
    assert client.stats.bytes_sent < RAW_81 / 10
    no_413(server)


def test_sixteen_wan_clips_in_one_request(server, clips, direct):
    client = FingerRewardClient(server.url)
    got = client.score([clips[81]] * 16, PROMPT, video_fps=FPS)
    assert client.stats.requests == 1 and client.stats.bytes_sent < server.api.max_payload
    for result in got:
        assert_same(result, direct[81])
    no_413(server)


@pytest.fixture(scope="module")
def wan_pipe():
    """A real tiny WanPipeline whose frames are enlarged to 480x832: Wan-shaped output at CPU cost.

    A subclass of WanPipeline, so `pipeline_fps` finds its rate as it would for Wan."""
    from diffusers import WanPipeline

    from finger_reward.tiny_wan import build_tiny_wan_pipeline

    class WanSize(WanPipeline):
        def __call__(self, prompt=None, num_frames=81, height=HEIGHT, width=WIDTH, output_type="np", **kwargs):
            kwargs.setdefault("num_inference_steps", 2)
            kwargs.setdefault("max_sequence_length", 16)
            kwargs.setdefault("generator", torch.Generator().manual_seed(0))  # the same video for the same text
            kwargs["guidance_scale"] = 1.0  # unguided: the stand-in's frames only need Wan's shape
            out = super().__call__(prompt=prompt, num_frames=num_frames, height=32, width=48, output_type="np",
                                   **kwargs)
            small = torch.from_numpy(out.frames).flatten(0, 1).permute(0, 3, 1, 2)
            big = torch.nn.functional.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)
            out.frames = big.permute(0, 2, 3, 1).reshape(out.frames.shape[0], num_frames, height, width, 3).numpy()
            return out

    return WanSize(**build_tiny_wan_pipeline(seed=0).components)


def test_trl_reward_takes_the_pipeline_rate(server, reward, wan_pipe):
    from finger_reward.integrations.trl import FingerVideoReward

    fn = FingerVideoReward(FingerRewardClient(server.url), pipeline=wan_pipe, pipeline_kwargs=dict(num_frames=33))
    assert fn.video_fps == 16.0  # from the pipeline, not told
    rewards = fn(prompts=["p"], completions=["a red circle"], original_prompt=[PROMPT])
    video = wan_pipe(prompt=["a red circle"], num_frames=33).frames[0]
    want = reward.score([np.clip(np.rint(video * 255), 0, 255).astype(np.uint8)], PROMPT, video_fps=FPS)[0]
    assert want.sampled == SAMPLED[33]
    assert rewards == pytest.approx([want.overall], abs=1e-6)
    no_413(server)


def test_verl_manager(server, clips, direct, tiny_model_dir):
    pytest.importorskip("verl", reason="needs the verl extra")
    import asyncio

    from omegaconf import OmegaConf

    import finger_reward.integrations.verl as finger_verl
    from tests.test_integration_verl import make_batch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cls = finger_verl.finger_reward_manager_class()
    config = OmegaConf.create({"reward": {"reward_kwargs": {"reward_url": server.url, "video_fps": FPS, "max_batch": 2}}})
    manager = cls(config, tokenizer, None, video_fn=lambda text: clips[81 if "long" in text else 33], max_wait_ms=50)
    data = make_batch(tokenizer, [{"extra_info": {"prompt": PROMPT}}] * 2, responses=["short take", "long take"])

    async def step():
        return await asyncio.gather(*(manager.run_single(data[i: i + 1]) for i in range(2)))

    outputs = manager.loop.run_until_complete(step())
    assert outputs[0]["reward_score"] == pytest.approx(direct[33].overall, abs=1e-6)
    assert outputs[1]["reward_score"] == pytest.approx(direct[81].overall, abs=1e-6)
    assert manager.client.stats.requests == 1 and manager.client.stats.bytes_sent < RAW_81 / 10
    no_413(server)


def test_select_dpo_pairs_writes_at_the_pipeline_rate(reward, wan_pipe, tmp_path):
    from finger_reward.dpo_pairs import select_dpo_pairs
    from finger_reward.video import _open

    out = select_dpo_pairs(wan_pipe, [PROMPT], reward, tmp_path, num_candidates=2, progress=False,
                           pipeline_kwargs=dict(num_frames=81, height=HEIGHT, width=WIDTH))
    assert json.loads((tmp_path / "settings.json").read_text())["fps"] == 16.0
    reader = _open(tmp_path / "videos" / "0" / "0.mp4", "candidate")
    assert (reader.num_frames, reader.fps) == (81, 16.0)
    written = [json.loads(line) for path in (out, tmp_path / "done.jsonl") if path.exists()
               for line in path.read_text().splitlines()]
    assert written and all(w["prompt"] == PROMPT for w in written)
    result = reward.score([tmp_path / "videos" / "0" / "0.mp4"], PROMPT)[0]
    assert result.sampled == SAMPLED[81]
