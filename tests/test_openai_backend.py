"""The OpenAI-compatible backend against a real loopback server running a tiny Qwen2.5-VL.

The server (tests/logprob_server.py) stands in for vLLM: it decodes the video the engine sends,
keeps and resizes frames as vLLM does under the flags it is started with, runs the model on the
rendered chat with finger_reward.rope positions and returns true top-K log-probabilities and
`usage.prompt_tokens`, so the backend's probabilities can be held to the local engine's and each
documented server flag can be shown to matter.
"""

import io
import json
import logging
import math

import numpy as np
import pytest
import torch

from finger_reward.chat_http import DeterministicError, RetryPolicy, post_json
from finger_reward.cli import format_table, main
from finger_reward.engine import TransformersEngine
from finger_reward.engine.openai_backend import (
    DEFAULT_TOP_LOGPROBS, AnswerError, OpenAIEngine, chat_messages, encode_frames, video_data_urls,
)
from finger_reward.engine.server_inputs import pad_frames, serve_commands, vllm_flags
from finger_reward.engine.top_logprobs import NoAnswerToken, answer_from_top_logprobs, reason_span
from finger_reward.errors import BatchError, FingerError
from finger_reward.questions import Question
from finger_reward.results import score_video
from finger_reward.reward import FingerReward
from finger_reward.scoring import answer_probs, answer_token_ids
from finger_reward.video import SlowFast, load_video
from tests.chat_server import Status
from tests.conftest import random_frames
from tests.logprob_server import LogprobServer, kept_frames, server_options

QUESTIONS = [
    "Is the red circle moving from left to right?",
    "Does the video flicker?",
    "Is there a blue square in the video at all times?",
    "Yes or no: is the background dark?",
    "Does the object pass through the wall?",
    "Does the blue square stay still?",
]
FAST = dict(backoff=0.01, timeout=30.0)
FPS, MAX_PIXELS = 2.0, 448 * 448  # load_video's defaults: what the clips below are sampled with


def flags(vocab: int, *, fps: float = FPS, drop: str | None = None) -> dict:
    """The server settings of the documented vLLM command, optionally without one of its flags."""
    given = vllm_flags(fps=fps, max_pixels=MAX_PIXELS, top_logprobs=vocab)
    if drop:
        i = given.index(drop)
        given = given[:i] + given[i + 2:]
    return server_options(given)


@pytest.fixture(scope="module")
def clips(mp4_paths):
    # 2 fps from 8 fps files: 4 frames, 2 frames at 16/9 fps, 6 frames; 5 frames in memory (padded to 6).
    return [load_video(p, name=str(p)) for p in mp4_paths] + [
        load_video(torch.rand(5, 3, 40, 150, generator=torch.Generator().manual_seed(1)), name="tensor")
    ]


@pytest.fixture(scope="module")
def vocab(tiny_model_and_processor):
    return len(tiny_model_and_processor[1].tokenizer)


@pytest.fixture(scope="module")
def server(tiny_model_and_processor, vocab):
    with LogprobServer(*tiny_model_and_processor, **flags(vocab)) as running:
        yield running


def remote(server, processor, **kw) -> OpenAIEngine:
    return OpenAIEngine(server.url, "tiny", processor=processor, **{**FAST, **kw})


def ranks(server, clip, question) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's log-probabilities at the answer position, and each token's rank (0 = most likely)."""
    logprobs = server.next_logprobs(chat_messages(question, "answer", clip, video_data_urls(clip)))
    rank = torch.empty_like(logprobs, dtype=torch.long)
    rank[logprobs.argsort(descending=True)] = torch.arange(len(logprobs))
    return logprobs, rank


def expected_top_k(logprobs, rank, k, yes_ids, no_ids):
    """Eq. 1 over the variants ranked inside the top k, and the flag; None when none is."""
    yes = [i for i in yes_ids if rank[i] < k]
    no = [i for i in no_ids if rank[i] < k]
    if not yes and not no:
        return None
    mass = logprobs[yes + no].softmax(-1)
    partial = len(yes) + len(no) < len(yes_ids) + len(no_ids)
    flag = "yes" if not yes else "no" if not no else "partial" if partial else None
    return [float(mass[: len(yes)].sum()), float(mass[len(yes):].sum())], flag


def decoded(url: str) -> tuple[np.ndarray, float]:
    import base64

    import av

    with av.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as container:
        stream = container.streams.video[0]
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)]), float(stream.average_rate)


# ---- probabilities equal the local engine's -----------------------------------------------------


def test_probabilities_match_local_engine(tiny_model_and_processor, server, clips, vocab):
    local = TransformersEngine(*tiny_model_and_processor)
    engine = remote(server, tiny_model_and_processor[1], top_logprobs=vocab, concurrency=4)
    answers = engine.answer_many(clips, [QUESTIONS] * len(clips))
    for clip, answer in zip(clips, answers):
        assert not isinstance(answer, Exception), answer
        expected = local.answer(clip, QUESTIONS).probs
        torch.testing.assert_close(answer.probs, expected, atol=1e-5, rtol=0)
        assert answer.missing_variant is None and answer.reasons is None
    # The model must react to the question and to the video, or equality proves little.
    assert answers[0].probs[:, 0].std() > 1e-2 and (answers[0].probs - answers[2].probs).abs().max() > 1e-3


def test_requests_carry_what_the_server_needs(tiny_model_and_processor, server, clips, vocab):
    clip = clips[3]  # 5 frames: sent as 6, the last repeated, as transformers pads it
    start = len(server.requests)
    remote(server, tiny_model_and_processor[1], top_logprobs=vocab).answer(clip, QUESTIONS[:3])
    sent = server.requests[start:]
    assert sent[0]["question"] == QUESTIONS[0] and sorted(r["question"] for r in sent) == sorted(QUESTIONS[:3])
    assert len({tuple(r["videos"]) for r in sent}) == 1  # identical video bytes every time: prefix caching
    for r in sent:
        system, user = r["messages"]
        assert system["role"] == "system" and [p["type"] for p in user["content"]] == ["video_url", "text"]
        assert r["body"] == {"model": "tiny", "temperature": 0.0, "logprobs": True, "top_logprobs": vocab,
                             "max_tokens": 1}  # nothing per request that a default vLLM refuses
    first = sent[0]  # sent alone (and checked): the others start after it has finished
    assert all(r["start"] >= first["end"] for r in sent[1:])
    frames, fps = decoded(sent[0]["messages"][1]["content"][0]["video_url"]["url"])
    assert fps == clip.fps and frames.shape[0] == 6
    np.testing.assert_array_equal(frames, pad_frames(clip.frames).permute(0, 2, 3, 1).numpy())


def test_slowfast_clip_matches_local_engine(tiny_model_and_processor, vocab):
    frames = random_frames(3, 4, 112, 112).repeat(4, axis=0)  # each frame held 4 times: slow and fast frames
    clip = load_video(frames, fps=8, source_fps=8, slowfast=SlowFast(), name="slowfast")
    assert len(clip.pathways) == 2
    expected = TransformersEngine(*tiny_model_and_processor).answer(clip, QUESTIONS[:3]).probs
    with LogprobServer(*tiny_model_and_processor, **flags(vocab, fps=8)) as server:  # served for 8 fps clips
        got = remote(server, tiny_model_and_processor[1], top_logprobs=vocab).answer(clip, QUESTIONS[:3]).probs
        assert len(server.requests[-1]["videos"]) == 2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("frames", [1, 3])
def test_odd_and_single_frame_clips_are_padded_and_match(tiny_model_and_processor, server, vocab, frames):
    clip = load_video(random_frames(frames, frames, 56, 84), name=f"{frames}-frame")
    start = len(server.requests)
    got = remote(server, tiny_model_and_processor[1], top_logprobs=vocab).answer(clip, QUESTIONS[:2])
    expected = TransformersEngine(*tiny_model_and_processor).answer(clip, QUESTIONS[:2]).probs
    torch.testing.assert_close(got.probs, expected, atol=1e-5, rtol=0)
    sent, _ = decoded(server.requests[start]["messages"][1]["content"][0]["video_url"]["url"])
    assert sent.shape[0] == frames + 1


def test_an_unpadded_single_frame_fails_once_repeated_not_four_times(server, tiny_model_and_processor):
    import httpx

    frame = torch.from_numpy(random_frames(0, 1, 56, 84)).permute(0, 3, 1, 2)
    url = "data:video/mp4;base64," + __import__("base64").b64encode(encode_frames(frame, 2.0)).decode()
    question = "a single frame?"
    messages = chat_messages(question, "answer", load_video(frame, name="one"), [url])
    with httpx.Client(timeout=30) as client, pytest.raises(DeterministicError, match="division by zero") as caught:
        post_json(client, f"{server.url}/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 1},
                  policy=RetryPolicy(max_retries=4, backoff=0.01))
    assert server.count(question) == 2 and "2 attempts" in str(caught.value)


# ---- the documented server flags, and the first-request check -----------------------------------


@pytest.mark.parametrize("drop, clip_fps, named", [
    ("--mm-processor-kwargs", 2.0, "--mm-processor-kwargs"),  # 56x84 frames enlarged to 128*28*28 pixels
    ("--media-io-kwargs", 8.0, "--media-io-kwargs"),  # an 8 fps clip re-sampled at 2 fps
])
def test_a_server_without_a_documented_flag_is_refused_by_name(tiny_model_and_processor, mp4_paths, vocab, drop,
                                                               clip_fps, named):
    clip = load_video(mp4_paths[0], fps=clip_fps, name=str(mp4_paths[0]))
    with LogprobServer(*tiny_model_and_processor, **flags(vocab, drop=drop)) as wrong:
        with pytest.raises(AnswerError) as caught:
            remote(wrong, tiny_model_and_processor[1], top_logprobs=vocab).answer(clip, QUESTIONS[:3])
        assert len(wrong.requests) == 1  # the check runs on the first request, before the others go
    message = str(caught.value)
    assert str(mp4_paths[0]) in message and QUESTIONS[0] in message and named in message
    assert ("enlarged the frames" if drop == "--mm-processor-kwargs" else "re-sampled") in message


def test_without_max_logprobs_the_refusal_names_the_flag(tiny_model_and_processor, clips, vocab):
    with LogprobServer(*tiny_model_and_processor, **flags(vocab, drop="--max-logprobs")) as default_limit:
        with pytest.raises(AnswerError, match="--max-logprobs 512") as caught:
            remote(default_limit, tiny_model_and_processor[1]).answer(clips[0], QUESTIONS[:1])
        assert default_limit.count(QUESTIONS[0]) == 1  # a 400 is not retried
    assert "HTTP 400" in str(caught.value)


def test_request_mm_kwargs_need_the_trust_flag(tiny_model_and_processor, clips, vocab):
    settings = flags(vocab, drop="--mm-processor-kwargs")
    extra = {"mm_processor_kwargs": {"min_pixels": 784, "max_pixels": MAX_PIXELS}}
    with LogprobServer(*tiny_model_and_processor, **settings) as untrusting:
        with pytest.raises(AnswerError, match="--trust-request-mm-kwargs"):
            remote(untrusting, tiny_model_and_processor[1], top_logprobs=vocab, extra_body=extra).answer(
                clips[0], QUESTIONS[:1])
    with LogprobServer(*tiny_model_and_processor, **{**settings, "trust_request_mm_kwargs": True}) as trusting:
        got = remote(trusting, tiny_model_and_processor[1], top_logprobs=vocab, extra_body=extra).answer(
            clips[0], QUESTIONS[:2])
    expected = TransformersEngine(*tiny_model_and_processor).answer(clips[0], QUESTIONS[:2]).probs
    torch.testing.assert_close(got.probs, expected, atol=1e-5, rtol=0)


def test_serve_commands_hold_the_checkpoint_settings():
    commands = serve_commands("/ckpt", fps=2.0, max_pixels=200704, top_logprobs=512)
    import shlex

    words = shlex.split(commands["vllm"])
    assert words[:3] == ["vllm", "serve", "/ckpt"]
    assert server_options(words) == {"mm_processor_kwargs": {"min_pixels": 784, "max_pixels": 200704},
                                     "video_io": {"num_frames": -1, "fps": 2.0}, "max_logprobs": 512,
                                     "trust_request_mm_kwargs": False}
    sglang = shlex.split(commands["sglang"])
    config = json.loads(sglang[sglang.index("--mm-process-config") + 1])
    assert config == {"video": {"fps": 2.0, "min_pixels": 784, "max_pixels": 200704}}


def test_the_stand_in_keeps_frames_as_vllm_does():
    assert kept_frames(16, 8.0) == [0, 5, 10, 15]  # 2 fps by default, whatever the count
    assert kept_frames(48, 2.0) == list(np.linspace(0, 47, 32).astype(int))  # at most 32 frames by default
    assert kept_frames(5, 2.0) == [0, 1, 2, 3]  # odd rounded down
    assert kept_frames(48, 2.0, num_frames=-1, fps=2.0) == list(range(48))
    with pytest.raises(ZeroDivisionError):
        kept_frames(1, 2.0)


def test_without_a_processor_the_inputs_are_unchecked_and_it_says_so(tiny_model_and_processor, clips, vocab, caplog):
    with LogprobServer(*tiny_model_and_processor, **flags(vocab, drop="--mm-processor-kwargs")) as wrong:
        with caplog.at_level(logging.WARNING, "finger_reward.engine.openai_backend"):
            got = remote(wrong, None, top_logprobs=vocab).answer(clips[0], QUESTIONS[:2])
    assert got.probs.shape == (2, 2)  # scored on enlarged frames: exactly what processor= prevents
    assert "not checked" in caplog.text


# ---- reason mode --------------------------------------------------------------------------------


def test_reason_span_finds_the_answer_the_model_wrote():
    tokens = ["<reason>", "ok", "</", "reason", "><", "answer", ">", "Yes", "</"]
    assert reason_span(tokens, 64) == reason_span(tokens, 7) == (7, 7)  # "<answer>" ends at token 7: stop, read next
    split = ["<reason>", "ok", "</reason>", "<answer>", "No"]
    assert reason_span(split, 8) == (3, 4)  # stopped at "</reason>"; "<answer>" follows exactly
    assert reason_span(split, 2) == (2, None)  # out of tokens before "</reason>": closed by the tags instead
    assert reason_span(["<reason>", "ok", "</reason>", "\n", "<answer>", "No"], 8) == (3, None)  # something between
    assert reason_span(["<reason>", "ok", "<|im_end|>"], 8) == (2, None)  # end of turn
    assert reason_span(["<reason>", "ok", "</reason>", "<ans"], 8) == (3, None)  # ran out inside the tags


def test_reason_answer_comes_from_the_same_generation(tmp_path):
    """The trained tiny evaluator closes most of its reasons itself: those questions take one request each and
    equal local scoring; the few it ends with end-of-turn right after </reason> take one re-read each."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from finger_reward.pretrained import TINY_EVALUATOR
    from finger_reward.synthetic import make_world

    world = make_world(tmp_path, num_scenes=1, defects=(None, "flicker"))
    bank = str(world.bank_path)
    model = AutoModelForImageTextToText.from_pretrained(TINY_EVALUATOR).eval()
    processor = AutoProcessor.from_pretrained(TINY_EVALUATOR)
    videos = [str(c.path) for c in world.clips]
    prompts = [c.scene.prompt for c in world.clips]
    local = FingerReward.from_pretrained("tiny", questions=bank).score(videos, prompts)
    settings = server_options(vllm_flags(fps=2.0, max_pixels=200704, top_logprobs=DEFAULT_TOP_LOGPROBS))
    with LogprobServer(model, processor, **settings) as served:
        reward = FingerReward.from_openai(served.url, "tiny", processor="tiny", questions=bank)
        assert reward.engine.mode == "reason"  # from the checkpoint's finger_reward.json
        got = reward.score(videos, prompts)
        asked = sum(len(v.questions) for v in got)
        reread = [r["question"] for r in served.requests if r["body"].get("continue_final_message")]
        assert len(served.requests) == asked + len(reread)  # one request per question, a second only to re-read
        assert len(reread) < asked / 2
    for mine, theirs in zip(got, local):
        assert [q.reason for q in mine.questions] == [q.reason for q in theirs.questions]
        same_generation = [(a, b) for a, b in zip(mine.questions, theirs.questions) if a.question not in reread]
        assert same_generation
        diff = max(abs(a.p_yes - b.p_yes) for a, b in same_generation)
        assert diff < 1e-5, diff


def test_reason_that_does_not_reach_the_answer_is_closed_and_reread(tiny_model_and_processor, server, clips, vocab,
                                                                     caplog):
    model, processor = tiny_model_and_processor
    local = TransformersEngine(model, processor, mode="reason", max_new_tokens=8).answer(clips[0], QUESTIONS[:3])
    start = len(server.requests)
    with caplog.at_level(logging.WARNING, "finger_reward.engine.openai_backend"):
        got = remote(server, processor, mode="reason", max_new_tokens=8, top_logprobs=vocab, concurrency=1).answer(
            clips[0], QUESTIONS[:3])
    assert got.reasons == local.reasons  # greedy decoding, token for token
    assert "did not reach <answer>" in caplog.text and QUESTIONS[0] in caplog.text
    sent = server.requests[start:]
    generate = [r for r in sent if not r["body"].get("continue_final_message")]
    reread = [r for r in sent if r["body"].get("continue_final_message")]
    assert len(generate) == len(reread) == 3  # random weights never write the tags themselves
    assert all(r["body"]["max_tokens"] == 8 + 16 and r["body"]["logprobs"] for r in generate)
    # The answer is read where the local engine reads it: after the reason closed by "</reason><answer>".
    # The server re-tokenizes the reason text, so compare with a full forward over that exact text.
    yes_ids, no_ids = answer_token_ids(processor.tokenizer)
    for r in reread:
        prefill = r["messages"][-1]["content"]
        assert r["messages"][-1]["role"] == "assistant" and prefill.endswith("</reason><answer>")
        assert r["body"]["add_generation_prompt"] is False and r["body"]["max_tokens"] == 1
        logprobs = server.next_logprobs(r["messages"], continue_final=True)
        row = QUESTIONS[:3].index(r["question"])
        torch.testing.assert_close(got.probs[row], answer_probs(logprobs, yes_ids, no_ids), atol=1e-5, rtol=0)


def test_answer_works_inside_a_running_event_loop(tiny_model_and_processor, server, clips, vocab):
    import asyncio

    processor = tiny_model_and_processor[1]

    async def host_loop():  # e.g. an async reward function of TRL calling a sync scorer
        return remote(server, processor, top_logprobs=vocab).answer(clips[0], QUESTIONS[:2])

    direct = remote(server, processor, top_logprobs=vocab).answer(clips[0], QUESTIONS[:2])
    torch.testing.assert_close(asyncio.run(host_loop()).probs, direct.probs, atol=0, rtol=0)


# ---- missing variants ---------------------------------------------------------------------------


def test_default_top_k_scores_a_random_weight_model(tiny_model_and_processor, server, clips):
    settings = flags(len(tiny_model_and_processor[1].tokenizer))
    assert settings["max_logprobs"] >= DEFAULT_TOP_LOGPROBS
    start = len(server.requests)
    answers = remote(server, tiny_model_and_processor[1]).answer_many(clips, [QUESTIONS] * len(clips))
    assert all(not isinstance(a, Exception) for a in answers), answers
    assert {r["body"]["top_logprobs"] for r in server.requests[start:]} == {DEFAULT_TOP_LOGPROBS}
    assert all(torch.isfinite(a.probs).all() for a in answers)


def test_missing_variants_are_flagged_and_renormalised_over_what_is_present(tiny_model_and_processor, server, clips):
    processor = tiny_model_and_processor[1]
    yes_ids, no_ids = answer_token_ids(processor.tokenizer)
    clip = clips[1]
    ranked = [ranks(server, clip, q) for q in QUESTIONS]
    best = [(int(rank[yes_ids].min()), int(rank[no_ids].min())) for _, rank in ranked]
    # Smallest K that leaves some variant of every question in: some question then misses one set.
    k = max(min(y, n) for y, n in best) + 1
    assert any(max(y, n) >= k for y, n in best), "the tiny model ranks Yes and No too close to test a missing set"
    answer = remote(server, processor, top_logprobs=k).answer(clip, QUESTIONS)
    expected = [expected_top_k(lp, rank, k, yes_ids, no_ids) for lp, rank in ranked]
    torch.testing.assert_close(answer.probs, torch.tensor([probs for probs, _ in expected]), atol=1e-5, rtol=0)
    assert answer.missing_variant == [flag for _, flag in expected]
    whole = [i for i, flag in enumerate(answer.missing_variant) if flag in ("yes", "no")]
    assert whole and all(answer.probs[i].max() == 1.0 for i in whole)  # from the one set present, never 0.5
    # The flag reaches the per-question results and the CLI's table.
    bank = [Question("p", "visual_quality", "clip", q, True) for q in QUESTIONS]
    result = score_video(clip.name, "p", bank, answer.probs, missing_variants=answer.missing_variant)
    i = whole[0]
    assert result.questions[i].missing_variant == answer.missing_variant[i]
    assert f"(no {answer.missing_variant[i].capitalize()} in the server's top tokens)" in format_table(result)


def test_a_partly_missing_set_is_flagged(tiny_model_and_processor, server, clips, caplog):
    """Both sets present but some spellings below the K-th token: the question says so (it used to pass unflagged)."""
    processor = tiny_model_and_processor[1]
    yes_ids, no_ids = answer_token_ids(processor.tokenizer)
    ranked = [ranks(server, clips[0], q) for q in QUESTIONS]
    # The smallest K with both sets present for some question, while a spelling of it is still outside.
    options = [(max(int(r[yes_ids].min()), int(r[no_ids].min())) + 1, q) for (_, r), q in zip(ranked, QUESTIONS)
               if max(int(r[yes_ids].min()), int(r[no_ids].min())) + 1 <= int(r[yes_ids + no_ids].max())]
    assert options, "every question has all its spellings together at the top"
    k, question = min(options)
    with caplog.at_level(logging.WARNING, "finger_reward.engine.openai_backend"):
        answer = remote(server, processor, top_logprobs=k).answer(clips[0], [question])
    assert answer.missing_variant == ["partial"] and 0 < answer.probs[0, 0] < 1
    assert "not in the top" in caplog.text and question in caplog.text
    full = remote(server, processor, top_logprobs=len(processor.tokenizer)).answer(clips[0], [question])
    assert full.missing_variant is None


def test_no_variant_fails_that_video_only(tiny_model_and_processor, server, mp4_paths, clips):
    yes_ids, no_ids = answer_token_ids(tiny_model_and_processor[1].tokenizer)
    best = {(c, q): int(ranks(server, clips[c], q)[1][yes_ids + no_ids].min()) for c in (0, 1) for q in QUESTIONS}
    # A K that keeps a variant for some questions of video 0 and none for some question of video 1.
    k = next((k for k in sorted({v + 1 for v in best.values()})
              if any(best[0, q] < k for q in QUESTIONS) and any(best[1, q] >= k for q in QUESTIONS)), None)
    assert k is not None, f"no K separates the two videos' best variant ranks {best}"
    good = [q for q in QUESTIONS if best[0, q] < k]
    bad = next(q for q in QUESTIONS if best[1, q] >= k)
    bank = [Question("prompt a", "text_alignment", "circle", q, True) for q in good]
    bank.append(Question("prompt b", "visual_quality", "square", bad, False))
    engine = remote(server, tiny_model_and_processor[1], top_logprobs=k)
    reward = FingerReward(engine, questions=bank, on_error="nan")
    scored, failed = reward.score(mp4_paths[:2], ["prompt a", "prompt b"])
    assert scored.ok and math.isfinite(scored.overall)
    assert not failed.ok and math.isnan(failed.overall)
    assert str(mp4_paths[1]) in failed.error and bad in failed.error and f"top {k} tokens" in failed.error


def test_top_logprobs_parsing_is_exact():
    top = [{"token": "\u0120Yes", "logprob": -0.5}, {"token": "the", "logprob": -1.0},
           {"token": " no", "logprob": -2.0}, {"token": " Yes", "logprob": -3.0},  # a repeat of " Yes": ignored
           {"token": "No", "logprob": -9999.0}, {"token": "YES", "logprob": float("-inf")}]
    answer = answer_from_top_logprobs(top, expected={" Yes", "YES", " no", "No"})
    p_yes = math.exp(-0.5) / (math.exp(-0.5) + math.exp(-2.0) + math.exp(-9999.0))
    assert answer.p_yes == pytest.approx(p_yes, abs=1e-12) and answer.p_yes + answer.p_no == pytest.approx(1.0)
    assert answer.missing_variant is None  # every expected spelling listed (YES at -inf: its share is known, 0)
    partial = answer_from_top_logprobs(top)  # all twelve spellings expected
    assert partial.missing_variant == "partial" and "yes" in partial.absent and " NO" in partial.absent
    assert partial.p_yes == answer.p_yes
    assert answer_from_top_logprobs([{"token": "\u2581no", "logprob": -4.0}]).missing_variant == "yes"
    with pytest.raises(NoAnswerToken, match="top 2 tokens"):
        answer_from_top_logprobs([{"token": "Yesterday", "logprob": -0.1}, {"token": "Nope", "logprob": -0.2}])


# ---- HTTP behaviour -----------------------------------------------------------------------------


def test_429_is_retried_then_answered(tiny_model_and_processor, clips, vocab):
    question = QUESTIONS[1]
    failures = {question: [Status(429, retry_after=0.05), None]}
    with LogprobServer(*tiny_model_and_processor, **flags(vocab), failures=failures) as flaky:
        got = remote(flaky, tiny_model_and_processor[1], top_logprobs=vocab).answer(clips[0], QUESTIONS[:2])
        assert flaky.count(question) == 2 and flaky.count(QUESTIONS[0]) == 1
    expected = TransformersEngine(*tiny_model_and_processor).answer(clips[0], QUESTIONS[:2]).probs
    torch.testing.assert_close(got.probs, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("script, attempts", [
    ([Status(500, message="boom")], 2),  # the same body twice: deterministic, given up at once
    ([Status(500, message="a"), Status(500, message="b"), Status(500, message="c")], 3),  # different: every retry
    ([Status(400, message="bad")], 1),  # a 4xx is never retried
])
def test_errors_name_the_video_and_spare_the_others(tiny_model_and_processor, mp4_paths, vocab, script, attempts):
    bank = [Question("prompt a", "text_alignment", "circle", QUESTIONS[0], True),
            Question("prompt b", "visual_quality", "square", QUESTIONS[1], True)]
    with LogprobServer(*tiny_model_and_processor, **flags(vocab), failures={QUESTIONS[1]: script}) as broken:
        engine = remote(broken, tiny_model_and_processor[1], top_logprobs=vocab, max_retries=2)
        with pytest.raises(BatchError) as caught:
            FingerReward(engine, questions=bank).score(mp4_paths[:2], ["prompt a", "prompt b"])
        assert broken.count(QUESTIONS[1]) == attempts
    err = caught.value
    assert sorted(err.failures) == [1] and err.results[0].ok
    message = str(err.failures[1])
    assert str(mp4_paths[1]) in message and QUESTIONS[1] in message and f"HTTP {script[0].code}" in message


def test_server_without_logprobs_gives_a_clear_error(tiny_model_and_processor, clips, vocab):
    with LogprobServer(*tiny_model_and_processor, **flags(vocab), logprobs=False) as plain:
        with pytest.raises(AnswerError, match="no top log-probabilities") as caught:
            remote(plain, tiny_model_and_processor[1]).answer(clips[0], QUESTIONS[:1])
    assert caught.value.video == clips[0].name


def test_concurrency_bound_is_respected(tiny_model_and_processor, clips, vocab):
    with LogprobServer(*tiny_model_and_processor, **flags(vocab), delay=0.3) as slow:
        engine = remote(slow, tiny_model_and_processor[1], top_logprobs=vocab, concurrency=3)
        answers = engine.answer_many(clips[:3], [QUESTIONS[:4]] * 3)
        assert slow.max_in_flight == 3 and len(slow.requests) == 12
    assert all(a.probs.shape == (4, 2) for a in answers)


# ---- video encoding, entry points ---------------------------------------------------------------


def test_encoding_keeps_frames_and_frame_rate(clips):
    import av

    clip = clips[1]
    assert abs(clip.fps - 16 / 9) < 1e-9
    for codec, mean_error in (("lossless", 0), ("h264", 10)):
        with av.open(io.BytesIO(encode_frames(clip.frames, clip.fps, codec))) as container:
            stream = container.streams.video[0]
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
            assert abs(float(stream.average_rate) - clip.fps) < 1e-9
        diff = np.abs(frames.astype(int) - clip.frames.permute(0, 2, 3, 1).numpy().astype(int))
        assert frames.shape[0] == clip.frames.shape[0] and diff.mean() <= mean_error
        assert codec == "h264" or diff.max() == 0


def test_from_openai_and_cli_score(tiny_model_and_processor, tiny_model_dir, server, mp4_paths, vocab, tmp_path, capsys):
    question = Question("a red circle", "text_alignment", "circle", QUESTIONS[0], True)
    bank = tmp_path / "bank.jsonl"
    bank.write_text(json.dumps(question.to_dict()) + "\n")
    local = FingerReward(TransformersEngine(*tiny_model_and_processor), questions=[question]).score(mp4_paths[:1], "a red circle")
    reward = FingerReward.from_openai(server.url, "tiny", processor=str(tiny_model_dir), questions=[question],
                                      top_logprobs=vocab)
    assert reward.engine.processor is not None
    assert reward([str(mp4_paths[0])], "a red circle") == pytest.approx([local[0].overall], abs=1e-5)
    code = main(["score", str(mp4_paths[0]), "--prompt", "a red circle", "--questions", str(bank), "--model", "tiny",
                 "--base-url", server.url, "--processor", str(tiny_model_dir), "--top-logprobs", str(vocab), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["questions"][0]["p_yes"] == pytest.approx(local[0].questions[0].p_yes, abs=1e-5)
    assert result["questions"][0]["missing_variant"] is None
    code = main(["score", str(mp4_paths[0]), "--prompt", "a red circle", "--questions", str(bank), "--model",
                 str(tiny_model_dir), "--processor", str(tiny_model_dir)])
    assert code == 2 and "--processor" in capsys.readouterr().err


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="video_codec"):
        OpenAIEngine("http://127.0.0.1:1/v1", "m", video_codec="vp9")
    with pytest.raises(ValueError, match="top_logprobs"):
        OpenAIEngine("http://127.0.0.1:1/v1", "m", top_logprobs=0)
    with pytest.raises(ValueError, match="model"):
        OpenAIEngine("http://127.0.0.1:1/v1", "")
    assert issubclass(AnswerError, FingerError)
