"""The OpenAI-compatible backend against a real loopback server running the tiny Qwen2.5-VL.

The server (tests/logprob_server.py) decodes the video the engine sends, runs the model on the
rendered chat and returns true top-K log-probabilities, so the backend's probabilities can be
held to the local engine's, and missing-variant cases are chosen from the model's real ranking.
"""

import json
import math

import numpy as np
import pytest
import torch

from finger_reward.cli import format_table, main
from finger_reward.engine import TransformersEngine
from finger_reward.engine.openai_backend import (
    AnswerError, OpenAIEngine, chat_messages, closing, encode_frames, video_data_urls,
)
from finger_reward.engine.top_logprobs import NoAnswerToken, answer_from_top_logprobs
from finger_reward.errors import BatchError
from finger_reward.questions import Question
from finger_reward.results import score_video
from finger_reward.reward import FingerReward
from finger_reward.scoring import answer_probs, answer_token_ids
from finger_reward.video import SlowFast, load_video
from tests.chat_server import Status
from tests.conftest import random_frames
from tests.logprob_server import LogprobServer

QUESTIONS = [
    "Is the red circle moving from left to right?",
    "Does the video flicker?",
    "Is there a blue square in the video at all times?",
    "Yes or no: is the background dark?",
    "Does the object pass through the wall?",
    "Does the blue square stay still?",
]
FAST = dict(backoff=0.01, timeout=30.0)


@pytest.fixture(scope="module")
def clips(mp4_paths):
    # 2 fps from 8 fps files: 4 frames, 2 frames at 16/9 fps, 6 frames; and in-memory frames.
    return [load_video(p, name=str(p)) for p in mp4_paths] + [
        load_video(torch.rand(5, 3, 40, 150, generator=torch.Generator().manual_seed(1)), name="tensor")
    ]


@pytest.fixture(scope="module")
def server(tiny_model_and_processor):
    with LogprobServer(*tiny_model_and_processor) as running:
        yield running


@pytest.fixture(scope="module")
def vocab(tiny_model_and_processor):
    return len(tiny_model_and_processor[1].tokenizer)


def remote(server, **kw) -> OpenAIEngine:
    return OpenAIEngine(server.url, "tiny", **{**FAST, **kw})


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
    return [float(mass[: len(yes)].sum()), float(mass[len(yes):].sum())], ("yes" if not yes else "no" if not no else None)


# ---- probabilities equal the local engine's -----------------------------------------------------


def test_probabilities_match_local_engine(tiny_model_and_processor, server, clips, vocab):
    local = TransformersEngine(*tiny_model_and_processor)
    answers = remote(server, top_logprobs=vocab, concurrency=4).answer_many(clips, [QUESTIONS] * len(clips))
    for clip, answer in zip(clips, answers):
        expected = local.answer(clip, QUESTIONS).probs
        torch.testing.assert_close(answer.probs, expected, atol=1e-4, rtol=0)
        assert answer.missing_variant is None and answer.reasons is None
    # The model must react to the question and to the video, or equality proves little.
    assert answers[0].probs[:, 0].std() > 1e-2 and (answers[0].probs - answers[2].probs).abs().max() > 1e-3


def test_requests_are_laid_out_for_prefix_caching(server, clips, vocab):
    start = len(server.requests)
    remote(server, top_logprobs=vocab).answer(clips[0], QUESTIONS[:3])
    sent = server.requests[start:]
    assert sent[0]["question"] == QUESTIONS[0] and sorted(r["question"] for r in sent) == sorted(QUESTIONS[:3])
    assert len({tuple(r["videos"]) for r in sent}) == 1  # identical video bytes every time
    for r in sent:
        system, user = r["messages"]
        assert system["role"] == "system" and [p["type"] for p in user["content"]] == ["video_url", "text"]
        assert r["body"]["max_tokens"] == 1 and r["body"]["temperature"] == 0 and r["body"]["top_logprobs"] == vocab
    first = sent[0]  # sent alone: the others start after it has finished
    assert all(r["start"] >= first["end"] for r in sent[1:])


def test_slowfast_clip_matches_local_engine(tiny_model_and_processor, server):
    frames = random_frames(3, 4, 112, 112).repeat(4, axis=0)  # each frame held 4 times: slow and fast frames
    clip = load_video(frames, fps=8, source_fps=8, slowfast=SlowFast(), name="slowfast")
    assert len(clip.pathways) == 2
    expected = TransformersEngine(*tiny_model_and_processor).answer(clip, QUESTIONS[:3]).probs
    got = remote(server, top_logprobs=len(tiny_model_and_processor[1].tokenizer)).answer(clip, QUESTIONS[:3]).probs
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert len(server.requests[-1]["videos"]) == 2


def test_reason_mode_reads_the_answer_after_the_closed_reason(tiny_model_and_processor, server, clips, vocab):
    model, processor = tiny_model_and_processor
    local = TransformersEngine(model, processor, mode="reason", max_new_tokens=8).answer(clips[0], QUESTIONS[:3])
    start = len(server.requests)
    got = remote(server, mode="reason", max_new_tokens=8, top_logprobs=vocab, concurrency=1).answer(clips[0], QUESTIONS[:3])
    assert got.reasons == local.reasons  # greedy decoding, token for token
    sent = server.requests[start:]
    generate = [r for r in sent if r["body"].get("stop")]
    close = [r for r in sent if r["body"].get("continue_final_message")]
    assert len(generate) == len(close) == 3
    assert all(r["body"]["max_tokens"] == 8 and r["body"]["stop"] == ["</reason>", "<answer>"] for r in generate)
    # The answer is read where the local engine reads it: after the reason closed by "</reason><answer>".
    # The server re-tokenizes the reason text, so compare with a full forward over that exact text.
    yes_ids, no_ids = answer_token_ids(processor.tokenizer)
    for i, r in enumerate(close):
        prefill = r["messages"][-1]["content"]
        assert r["messages"][-1]["role"] == "assistant" and prefill.endswith("</reason><answer>")
        assert r["body"]["add_generation_prompt"] is False and r["body"]["max_tokens"] == 1
        logprobs = server.next_logprobs(r["messages"], continue_final=True)
        row = QUESTIONS[:3].index(r["question"])
        torch.testing.assert_close(got.probs[row], answer_probs(logprobs, yes_ids, no_ids), atol=1e-5, rtol=0)


def test_reason_is_closed_as_the_local_engine_closes_it():
    assert closing("looks fine", "</reason>") == "</reason><answer>"  # the server trimmed "</reason>"
    assert closing("looks fine", "<answer>") == "<answer>"  # stopped at "<answer>" without "</reason>"
    assert closing("looks fine", None) == "</reason><answer>"  # out of tokens, or end of turn
    assert closing("looks fine</reason>", "</reason>") == "<answer>"  # a server that keeps stop strings
    assert closing("looks fine</reason><answer>", "<answer>") == ""


def test_answer_works_inside_a_running_event_loop(server, clips, vocab):
    import asyncio

    async def host_loop():  # e.g. an async reward function of TRL calling a sync scorer
        return remote(server, top_logprobs=vocab).answer(clips[0], QUESTIONS[:2])

    direct = remote(server, top_logprobs=vocab).answer(clips[0], QUESTIONS[:2])
    torch.testing.assert_close(asyncio.run(host_loop()).probs, direct.probs, atol=0, rtol=0)


# ---- missing variants ---------------------------------------------------------------------------


def test_missing_variant_is_flagged_and_renormalised_over_what_is_present(tiny_model_and_processor, server, clips):
    yes_ids, no_ids = answer_token_ids(tiny_model_and_processor[1].tokenizer)
    clip = clips[1]
    ranked = [ranks(server, clip, q) for q in QUESTIONS]
    best = [(int(rank[yes_ids].min()), int(rank[no_ids].min())) for _, rank in ranked]
    # Smallest K that leaves some variant of every question in: some question then misses one set.
    k = max(min(y, n) for y, n in best) + 1
    assert any(max(y, n) >= k for y, n in best), "the tiny model ranks Yes and No too close to test a missing set"
    answer = remote(server, top_logprobs=k).answer(clip, QUESTIONS)
    expected = [expected_top_k(lp, rank, k, yes_ids, no_ids) for lp, rank in ranked]
    torch.testing.assert_close(answer.probs, torch.tensor([probs for probs, _ in expected]), atol=1e-5, rtol=0)
    assert answer.missing_variant == [flag for _, flag in expected]
    flagged = [i for i, flag in enumerate(answer.missing_variant) if flag]
    assert flagged and all(answer.probs[i].max() == 1.0 for i in flagged)  # from the one set present, never 0.5
    # The flag reaches the per-question results and the CLI's table.
    bank = [Question("p", "visual_quality", "clip", q, True) for q in QUESTIONS]
    result = score_video(clip.name, "p", bank, answer.probs, missing_variants=answer.missing_variant)
    i = flagged[0]
    assert result.questions[i].missing_variant == answer.missing_variant[i]
    assert f"(no {answer.missing_variant[i].capitalize()} in the server's top tokens)" in format_table(result)


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
    reward = FingerReward(remote(server, top_logprobs=k), questions=bank, on_error="nan")
    scored, failed = reward.score(mp4_paths[:2], ["prompt a", "prompt b"])
    assert scored.ok and math.isfinite(scored.overall)
    assert not failed.ok and math.isnan(failed.overall)
    assert str(mp4_paths[1]) in failed.error and bad in failed.error and f"top {k} tokens" in failed.error


def test_top_logprobs_parsing_is_exact():
    top = [{"token": "\u0120Yes", "logprob": -0.5}, {"token": "the", "logprob": -1.0},
           {"token": " no", "logprob": -2.0}, {"token": " Yes", "logprob": -3.0},  # a repeat of " Yes": ignored
           {"token": "No", "logprob": -9999.0}, {"token": "YES", "logprob": float("-inf")}]
    answer = answer_from_top_logprobs(top)
    p_yes = math.exp(-0.5) / (math.exp(-0.5) + math.exp(-2.0) + math.exp(-9999.0))
    assert answer.p_yes == pytest.approx(p_yes, abs=1e-12) and answer.p_yes + answer.p_no == pytest.approx(1.0)
    assert answer.missing_variant is None
    assert answer_from_top_logprobs([{"token": "\u2581no", "logprob": -4.0}]).missing_variant == "yes"
    with pytest.raises(NoAnswerToken, match="top 2 tokens"):
        answer_from_top_logprobs([{"token": "Yesterday", "logprob": -0.1}, {"token": "Nope", "logprob": -0.2}])


# ---- HTTP behaviour -----------------------------------------------------------------------------


def test_429_is_retried_then_answered(tiny_model_and_processor, clips, vocab):
    question = QUESTIONS[1]
    with LogprobServer(*tiny_model_and_processor, failures={question: [Status(429, retry_after=0.05), None]}) as flaky:
        got = remote(flaky, top_logprobs=vocab).answer(clips[0], QUESTIONS[:2])
        assert flaky.count(question) == 2 and flaky.count(QUESTIONS[0]) == 1
    expected = TransformersEngine(*tiny_model_and_processor).answer(clips[0], QUESTIONS[:2]).probs
    torch.testing.assert_close(got.probs, expected, atol=1e-4, rtol=0)


def test_persistent_500_names_the_video_and_spares_the_others(tiny_model_and_processor, mp4_paths, vocab):
    bank = [Question("prompt a", "text_alignment", "circle", QUESTIONS[0], True),
            Question("prompt b", "visual_quality", "square", QUESTIONS[1], True)]
    with LogprobServer(*tiny_model_and_processor, failures={QUESTIONS[1]: [Status(500)]}) as broken:
        reward = FingerReward(remote(broken, top_logprobs=vocab, max_retries=2), questions=bank)
        with pytest.raises(BatchError) as caught:
            reward.score(mp4_paths[:2], ["prompt a", "prompt b"])
        assert broken.count(QUESTIONS[1]) == 3  # the first try and 2 retries
    err = caught.value
    assert sorted(err.failures) == [1] and err.results[0].ok
    message = str(err.failures[1])
    assert str(mp4_paths[1]) in message and QUESTIONS[1] in message and "HTTP 500" in message and "3 attempt" in message


def test_server_without_logprobs_gives_a_clear_error(tiny_model_and_processor, clips):
    with LogprobServer(*tiny_model_and_processor, logprobs=False) as plain:
        with pytest.raises(AnswerError, match="no top log-probabilities") as caught:
            remote(plain).answer(clips[0], QUESTIONS[:1])
    assert caught.value.video == clips[0].name


def test_concurrency_bound_is_respected(tiny_model_and_processor, clips, vocab):
    with LogprobServer(*tiny_model_and_processor, delay=0.3) as slow:
        answers = remote(slow, top_logprobs=vocab, concurrency=3).answer_many(clips[:3], [QUESTIONS[:4]] * 3)
        assert slow.max_in_flight == 3 and len(slow.requests) == 12
    assert all(a.probs.shape == (4, 2) for a in answers)


# ---- video encoding, entry points ---------------------------------------------------------------


def test_encoding_keeps_frames_and_frame_rate(clips):
    import io

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


def test_from_openai_and_cli_score(tiny_model_and_processor, server, mp4_paths, vocab, tmp_path, capsys):
    question = Question("a red circle", "text_alignment", "circle", QUESTIONS[0], True)
    bank = tmp_path / "bank.jsonl"
    bank.write_text(json.dumps(question.to_dict()) + "\n")
    local = FingerReward(TransformersEngine(*tiny_model_and_processor), questions=[question]).score(mp4_paths[:1], "a red circle")
    reward = FingerReward.from_openai(server.url, "tiny", questions=[question], top_logprobs=vocab)
    assert reward([str(mp4_paths[0])], "a red circle") == pytest.approx([local[0].overall], abs=1e-4)
    code = main(["score", str(mp4_paths[0]), "--prompt", "a red circle", "--questions", str(bank), "--model", "tiny",
                 "--base-url", server.url, "--top-logprobs", str(vocab), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["questions"][0]["p_yes"] == pytest.approx(local[0].questions[0].p_yes, abs=1e-4)
    assert result["questions"][0]["missing_variant"] is None


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="video_codec"):
        OpenAIEngine("http://127.0.0.1:1/v1", "m", video_codec="vp9")
    with pytest.raises(ValueError, match="top_logprobs"):
        OpenAIEngine("http://127.0.0.1:1/v1", "m", top_logprobs=0)
    with pytest.raises(ValueError, match="model"):
        OpenAIEngine("http://127.0.0.1:1/v1", "")
