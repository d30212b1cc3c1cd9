"""`finger-reward` run as a subprocess, as a user runs it."""

import json
import subprocess
import sys

import pytest

from finger_reward import DIMENSIONS, Question, QuestionBank

PROMPT = "a red circle moves from left to right"


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "finger_reward.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def bank_path(tmp_path_factory):
    questions = [Question(PROMPT, dim, "red circle", f"Is the red circle fine in {dim}?", i % 2 == 0)
                 for i, dim in enumerate(DIMENSIONS)]
    return QuestionBank(questions).to_jsonl(tmp_path_factory.mktemp("cli") / "bank.jsonl")


def test_score_json(tiny_model_dir, bank_path, mp4_paths):
    done = run("score", *mp4_paths[:2], "--prompt", PROMPT, "--questions", bank_path, "--model", tiny_model_dir,
               "--json", "--weights", "visual_quality=2,text_alignment=1")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["video"] for r in rows] == [str(p) for p in mp4_paths[:2]]
    for row in rows:
        assert set(row["dimensions"]) == set(DIMENSIONS) and len(row["questions"]) == 5
        expected = (2 * row["dimensions"]["visual_quality"] + row["dimensions"]["text_alignment"]) / 3
        assert row["overall"] == pytest.approx(expected)
        assert {"p_yes", "p_no", "score", "answer", "positive"} <= set(row["questions"][0])


def test_score_table_and_reason_mode(tiny_model_dir, bank_path, mp4_paths):
    done = run("score", mp4_paths[0], "--prompt", PROMPT, "--questions", bank_path, "--model", tiny_model_dir,
               "--mode", "reason", "--max-new-tokens", "4")
    assert done.returncode == 0, done.stderr
    assert "overall:" in done.stdout and "reason:" in done.stdout and "text_alignment" in done.stdout


def test_bad_inputs_exit_nonzero_with_one_line(tiny_model_dir, bank_path, mp4_paths, tmp_path):
    missing = tmp_path / "nope.mp4"
    done = run("score", mp4_paths[0], missing, "--prompt", PROMPT, "--questions", bank_path, "--model", tiny_model_dir, "--json")
    assert done.returncode == 1
    rows = [json.loads(line) for line in done.stdout.splitlines()]  # a row for every input, the good one scored
    assert [r["error"] is None for r in rows] == [True, False] and "file not found" in rows[1]["error"]
    errors = [line for line in done.stderr.splitlines() if line.startswith("finger-reward: error")]
    assert len(errors) == 1 and "nope.mp4" in errors[0] and "file not found" in errors[0]

    done = run("score", mp4_paths[0], "--prompt", PROMPT, "--questions", tmp_path / "none.jsonl", "--model", tiny_model_dir)
    assert done.returncode == 2 and "none.jsonl" in done.stderr and "Traceback" not in done.stderr

    done = run("score", mp4_paths[0], "--prompt", PROMPT, "--questions", bank_path, "--weights", "colour=1",
               "--model", tiny_model_dir)
    assert done.returncode == 2 and "colour=1" in done.stderr

    env = {k: v for k, v in __import__("os").environ.items() if k != "FINGER_REWARD_MODEL"}
    done = run("score", mp4_paths[0], "--prompt", PROMPT, "--questions", bank_path, env=env)
    assert done.returncode == 2 and "--model" in done.stderr


def test_demo_scores_the_clean_clip_highest_with_the_tiny_evaluator(tmp_path):
    done = run("demo", "--out", tmp_path, "--json")
    assert done.returncode == 0, done.stderr
    assert "tiny evaluator" in done.stderr
    rows = {r["video"].rsplit("/", 1)[-1]: r for r in map(json.loads, done.stdout.splitlines())}
    assert len(rows) == 6 and all(0 <= r["overall"] <= 1 for r in rows.values())
    clean = rows.pop("0_clean.mp4")
    assert all(r["overall"] < clean["overall"] for r in rows.values()), (clean, rows)
    assert rows["0_noise.mp4"]["dimensions"]["visual_quality"] < clean["dimensions"]["visual_quality"]


def test_demo_with_a_random_model(tmp_path):
    done = run("demo", "--out", tmp_path, "--json", "--model", "random")
    assert done.returncode == 0, done.stderr
    assert "not meaningful" in done.stderr and (tmp_path / "tiny-model" / "config.json").is_file()
    assert len(done.stdout.splitlines()) == 6


def test_make_tiny_model(tmp_path):
    done = run("make-tiny-model", tmp_path / "m")
    assert done.returncode == 0, done.stderr
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "m")
    assert model.config.model_type == "qwen2_5_vl"
    text = model.config.text_config
    assert text.head_dim >= 32  # vLLM's CPU attention serves no head size below 32
    assert sum(text.rope_parameters["mrope_section"]) * 2 == text.head_dim


def test_questions_template_resumes(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red kite flies over a hill\n\na man rides a bicycle\n")
    out = tmp_path / "bank.jsonl"
    done = run("questions", "--prompts", prompts, "--out", out)
    assert done.returncode == 0, done.stderr
    bank = QuestionBank.from_jsonl(out)
    assert bank.prompts == ["a red kite flies over a hill", "a man rides a bicycle"]
    lines = out.read_text().splitlines()
    prompts.write_text("a man rides a bicycle\na cat sleeps on a sofa\n")
    done = run("questions", "--prompts", prompts, "--out", out)
    assert done.returncode == 0, done.stderr
    assert out.read_text().splitlines()[: len(lines)] == lines  # nothing rewritten
    assert QuestionBank.from_jsonl(out).prompts[-1] == "a cat sleeps on a sofa"
    assert "1 prompt(s) added" in done.stderr


def test_questions_openai_end_to_end(tmp_path):
    from tests.chat_server import ChatServer
    from tests.test_question_llm import CAT, FAIL, reply_for

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": CAT}) + "\n" + json.dumps(FAIL) + "\n")
    out = tmp_path / "bank.jsonl"
    with ChatServer({CAT: [reply_for("cat")], FAIL: ["no JSON here"]}) as server:
        args = ["questions", "--prompts", prompts, "--out", out, "--generator", "openai", "--model", "m",
                "--base-url", server.url, "--api-key", "k"]
        done = run(*args)
        assert done.returncode == 1
        assert f"prompt {FAIL!r}" in done.stderr and "no JSON found" in done.stderr
        assert QuestionBank.from_jsonl(out).prompts == [CAT]
        done = run(*args, "--fallback", "template")
        assert done.returncode == 0, done.stderr
        assert server.count(CAT) == 1  # resumed: the cached prompt was not asked again
    assert QuestionBank.from_jsonl(out).prompts == [CAT, FAIL]


def test_questions_bad_prompts_file(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    done = run("questions", "--prompts", prompts, "--out", tmp_path / "b.jsonl")
    assert done.returncode == 2 and "p.jsonl, line 2" in done.stderr


def test_score_dir_resumes_after_a_kill(tiny_model_dir, bank_path, mp4_paths, tmp_path):
    from finger_reward import FingerReward

    root = mp4_paths[0].parent
    prompts = tmp_path / "prompts.jsonl"
    records = [{"video": p.name, "prompt": PROMPT} for p in mp4_paths] + [{"video": "missing.mp4", "prompt": PROMPT}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "results.jsonl"
    args = ["score-dir", root, "--prompts", prompts, "--questions", bank_path, "--model", tiny_model_dir, "--out", out, "--chunk", "2"]
    done = run(*args)
    assert done.returncode == 1 and "missing.mp4" in done.stderr and "3 scored, 1 failed, 0 skipped" in done.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 4
    direct = FingerReward.from_pretrained(tiny_model_dir, questions=bank_path).score(mp4_paths, PROMPT)
    written = {json.loads(line)["video"]: json.loads(line)["overall"] for line in lines}
    for path, result in zip(mp4_paths, direct):
        assert written[str(path)] == pytest.approx(result.overall, abs=1e-6)

    # A kill in the middle of writing: the last line is cut short. The rerun repairs and finishes the file.
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])
    done = run(*args)
    assert "unfinished last line" in done.stderr
    again = out.read_text().splitlines()
    assert len(again) == 4 and again[:2] == lines[:2]
    assert sorted(json.loads(line)["video"] for line in again) == sorted(json.loads(line)["video"] for line in lines)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"video": "a.mp4"}\n')
    done = run("score-dir", root, "--prompts", bad, "--model", tiny_model_dir, "--out", tmp_path / "x.jsonl")
    assert done.returncode == 2 and "bad.jsonl, line 1" in done.stderr


def test_score_without_questions_uses_the_template_generator_and_says_so(tiny_model_dir, mp4_paths):
    done = run("score", mp4_paths[0], "--prompt", PROMPT, "--model", tiny_model_dir, "--json")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("questions: template generator") == 1
    assert json.loads(done.stdout)["questions"]


def one_line_error(done, *needles):
    """Exit 2 with one error line naming every needle, no traceback, and no model loaded."""
    errors = [line for line in done.stderr.splitlines() if line.startswith("finger-reward: error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr
    assert "Traceback" not in done.stderr and "Loading weights" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def test_bad_model_device_questions_and_root_fail_in_one_line_before_loading(tiny_model_dir, bank_path, mp4_paths,
                                                                              tmp_path):
    import os

    score = ["score", mp4_paths[0], "--prompt", PROMPT]
    one_line_error(run(*score, "--model", tmp_path / "no-such-model"), "no-such-model", "no such directory",
                   "expected a checkpoint directory")
    (tmp_path / "empty").mkdir()
    one_line_error(run(*score, "--model", tmp_path / "empty"), "empty", "no config.json")
    one_line_error(run(*score, "--model", bank_path), "bank.jsonl", "is a file")
    offline = {**os.environ, "HF_HUB_OFFLINE": "1"}
    one_line_error(run(*score, "--model", "nobody-here/no-such-model-17", env=offline),
                   "nobody-here/no-such-model-17", "offline")
    one_line_error(run(*score, "--model", tiny_model_dir, "--device", "gpu"), "--device gpu", "expected cpu")
    import torch

    if not torch.cuda.is_available():
        one_line_error(run(*score, "--model", tiny_model_dir, "--device", "cuda"), "--device cuda", "no CUDA GPU")
    one_line_error(run(*score, "--model", tiny_model_dir, "--questions", tmp_path / "none.jsonl"),
                   "none.jsonl", "not found", "expected a question bank")

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"video": "a.mp4", "prompt": PROMPT}) + "\n")
    one_line_error(run("score-dir", tmp_path / "no-root", "--prompts", prompts, "--model", tiny_model_dir,
                       "--out", tmp_path / "r.jsonl"), "no-root", "no such directory", "expected the directory")
    one_line_error(run("eval", "--benchmark", "finger", "--data", prompts, "--video-root", tmp_path / "no-root",
                       "--model", tiny_model_dir), "--video-root", "no-root", "no such directory")
