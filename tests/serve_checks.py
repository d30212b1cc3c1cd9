"""Checks the one-process server and the Ray Serve deployment must both pass, written once."""

import base64
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from finger_reward import BatchError, Question, QuestionBank
from finger_reward.questions import DIMENSIONS


def assert_same(got, want, tol: float = 1e-6):
    """A result from the service equals direct scoring: overall, every question, every dimension."""
    assert got.ok, got.error
    assert got.overall == pytest.approx(want.overall, abs=tol)
    assert [q.p_yes for q in got.questions] == pytest.approx([q.p_yes for q in want.questions], abs=tol)
    assert got.dimensions == pytest.approx(want.dimensions, abs=tol)
    assert got.sampled == want.sampled  # the same frames, at the same rate and size


def corrupt_video_fails_alone(client, url, token, mp4_paths, direct, bad_prompt, good_prompt, junk, n_good, tol=1e-6):
    """A request with a corrupt video among good ones, beside concurrent good requests: only that video fails."""
    def bad():
        return client.score([mp4_paths[0], junk, mp4_paths[2]], bad_prompt)

    def good(i):
        return client.score([mp4_paths[i % 3]], good_prompt)[0]

    with ThreadPoolExecutor(4) as pool:
        failing = pool.submit(bad)
        others = list(pool.map(good, range(n_good)))
        with pytest.raises(BatchError) as caught:
            failing.result()
    err = caught.value
    assert sorted(err.failures) == [1] and "cannot be decoded" in str(err.failures[1])
    assert_same(err.results[0], direct[(str(mp4_paths[0]), bad_prompt)], tol)
    assert_same(err.results[2], direct[(str(mp4_paths[2]), bad_prompt)], tol)
    for i, result in enumerate(others):
        assert_same(result, direct[(str(mp4_paths[i % 3]), good_prompt)], tol)
    raw = httpx.post(f"{url}/v1/score", headers={"Authorization": f"Bearer {token}"}, timeout=60,
                     json={"videos": [base64.b64encode(junk).decode()], "prompts": bad_prompt})
    assert raw.status_code == 400
    body = raw.json()
    assert "#0" in body["error"]["failures"]["0"] and body["results"][0]["overall"] is None
    assert client.score([mp4_paths[1]], good_prompt)[0].ok  # still serving


def write_bank(path, prompts):
    """A question bank at `path`: for each prompt one question per dimension, polarities alternating."""
    questions = [Question(p, dim, "thing", f"Q{k} about {p} in {dim}?", k % 2 == 0)
                 for p in prompts for k, dim in enumerate(DIMENSIONS)]
    return QuestionBank(questions).to_jsonl(path)


def direct_scores(model_dir, bank_path, videos, prompts) -> dict:
    """What the service must answer, computed without it: {(video path, prompt): VideoScore}."""
    from finger_reward import FingerReward

    reward = FingerReward.from_pretrained(model_dir, questions=bank_path)
    return {(str(p), prompt): reward.score([p], prompt)[0] for p in videos for prompt in prompts}
