"""finger_reward.jsonl: the one JSONL reader (lines named, torn tails) and the repair before appending."""

from __future__ import annotations

import json
import logging

import pytest

from finger_reward.errors import FingerError
from finger_reward.jsonl import JsonlError, drop_torn_tail, read_jsonl

ROW = {"prompt": "a red ball", "score": 0.5}


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_values_come_with_path_and_line_and_blank_lines_count(tmp_path):
    path = write(tmp_path / "a.jsonl", b'\xef\xbb\xbf{"a": 1}\n\n  \r\n"text"\r\n[1, 2]\n\n')
    assert list(read_jsonl(path)) == [(f"{path}, line 1", {"a": 1}), (f"{path}, line 4", "text"),
                                      (f"{path}, line 5", [1, 2])]


def test_invalid_json_names_path_and_line(tmp_path):
    path = write(tmp_path / "b.jsonl", b'{"a": 1}\n\n{"a": }\n{"a": 3}\n')
    with pytest.raises(JsonlError) as info:
        list(read_jsonl(path))
    err = info.value
    assert isinstance(err, FingerError) and isinstance(err, ValueError)
    assert err.where == f"{path}, line 3" and err.reason.startswith("not valid JSON (Expecting value")
    assert str(err) == f"{path}, line 3: {err.reason}" and "column 7" in err.reason


def test_lines_are_read_one_at_a_time(tmp_path):
    path = write(tmp_path / "c.jsonl", b'{"a": 1}\nnot json\n')
    rows = read_jsonl(path)
    assert next(rows) == (f"{path}, line 1", {"a": 1})  # the bad line 2 is not read yet
    with pytest.raises(JsonlError, match="line 2: not valid JSON"):
        next(rows)


def test_non_utf8_line_is_named(tmp_path):
    path = write(tmp_path / "d.jsonl", b'{"a": 1}\n' + '{"prompt": "café"}\n'.encode("latin-1"))
    with pytest.raises(JsonlError) as info:
        list(read_jsonl(path))
    assert info.value.where == f"{path}, line 2"
    assert "not UTF-8 text (byte 0xe9 at offset 15 of the line)" in str(info.value) and "utf-8" in str(info.value)


def test_objects_only(tmp_path):
    path = write(tmp_path / "e.jsonl", b'{"a": 1}\n["a"]\n')
    assert len(list(read_jsonl(path))) == 2
    with pytest.raises(JsonlError, match=r"e\.jsonl, line 2: expected a JSON object, got list"):
        list(read_jsonl(path, objects=True))


@pytest.mark.parametrize("tail", [b'{"prompt": "a re', '{"prompt": "café"}'.encode()[:16]], ids=["json", "utf8"])
def test_torn_tail_is_an_error_or_skipped(tmp_path, caplog, tail):
    path = write(tmp_path / "f.jsonl", ((json.dumps(ROW) + "\n") * 2 + "\n").encode() + tail)
    with pytest.raises(JsonlError, match=r"f\.jsonl, line 4: not"):
        list(read_jsonl(path))
    with caplog.at_level(logging.WARNING, logger="finger_reward.jsonl"):
        assert [row for _, row in read_jsonl(path, torn_tail="skip")] == [ROW, ROW]
    assert f"{path}, line 4: skipping an unfinished last line" in caplog.text


def test_skip_tolerates_only_the_last_line(tmp_path):
    middle = write(tmp_path / "g.jsonl", b'{"a": 1}\n{"a": \n{"a": 3}')
    with pytest.raises(JsonlError, match="line 2"):
        list(read_jsonl(middle, torn_tail="skip"))
    complete = write(tmp_path / "h.jsonl", b'{"a": 1}\n{"a": 3}')  # no newline, but whole: a value like any other
    assert [row for _, row in read_jsonl(complete, torn_tail="skip")] == [{"a": 1}, {"a": 3}]
    with pytest.raises(ValueError, match="torn_tail='drop'; expected one of error, skip"):
        read_jsonl(complete, torn_tail="drop")  # at the call, before any line is read


def test_drop_torn_tail_cuts_an_unfinished_line(tmp_path, caplog):
    good = (json.dumps(ROW) + "\n").encode() * 3
    path = write(tmp_path / "i.jsonl", good + b'{"prompt": "a bl')
    with caplog.at_level(logging.WARNING, logger="finger_reward.jsonl"):
        drop_torn_tail(path)
    assert path.read_bytes() == good
    assert "dropping an unfinished last line (16 bytes)" in caplog.text
    with path.open("a") as out:
        out.write(json.dumps(ROW) + "\n")
    assert [row for _, row in read_jsonl(path)] == [ROW] * 4


def test_drop_torn_tail_leaves_whole_lines(tmp_path):
    good = (json.dumps(ROW) + "\n").encode() * 2
    path = write(tmp_path / "j.jsonl", good)
    drop_torn_tail(path)
    assert path.read_bytes() == good
    write(path, good + b'{"a": 1}')  # whole but without its newline: the newline is added, nothing is lost
    drop_torn_tail(path)
    assert path.read_bytes() == good + b'{"a": 1}\n'
    for data in (b"", b'{"a"'):  # an empty file stays empty; a lone torn line leaves an empty file
        drop_torn_tail(write(path, data))
        assert path.read_bytes() == b""
    drop_torn_tail(tmp_path / "missing.jsonl")
    assert not (tmp_path / "missing.jsonl").exists()


def test_drop_torn_tail_finds_a_line_break_far_back(tmp_path):
    long_row = (json.dumps({"reason": "x" * 200_000}) + "\n").encode()  # longer than one look-back block
    path = write(tmp_path / "k.jsonl", long_row * 2 + long_row[:150_000])
    drop_torn_tail(path)
    assert path.read_bytes() == long_row * 2
    write(path, long_row[:150_000])
    drop_torn_tail(path)
    assert path.read_bytes() == b""


# ---- every JSONL input of the package reads through it, keeping its own error type ----------------


def _readers():
    from finger_reward.cli import read_prompts, read_video_prompts
    from finger_reward.dpo_pairs import _done_prompts
    from finger_reward.errors import QuestionError
    from finger_reward.evaluation.records import BenchmarkError
    from finger_reward.evaluation.tables import read_rows
    from finger_reward.instruct import InstructError, load_instruct
    from finger_reward.questions import QuestionBank
    from finger_reward.report import load_results
    from finger_reward.scorefile import load_scores
    from finger_reward.trainers.cooloff import read_rollouts
    from finger_reward.trainers.diffusion_dpo import read_pairs

    return {
        "question bank": (QuestionBank.from_jsonl, QuestionError),
        "instruct": (load_instruct, InstructError),
        "benchmark rows": (lambda p: list(read_rows(p)), BenchmarkError),
        "rollouts": (lambda p: list(read_rollouts(p)), InstructError),
        "dpo pairs": (read_pairs, ValueError),
        "video prompts": (lambda p: read_video_prompts(p, p.parent), FingerError),
        "prompts": (read_prompts, FingerError),
        "report results": (load_results, ValueError),
        "scores": (load_scores, FingerError),
        "done prompts": (_done_prompts, ValueError),
    }


@pytest.mark.parametrize("bad, reason", [(b'{"prompt": \n', "not valid JSON (Expecting value at column 12)"),
                                         (b'"caf\xe9"\n', "not UTF-8 text (byte 0xe9")], ids=["json", "utf8"])
@pytest.mark.parametrize("name", ["question bank", "instruct", "benchmark rows", "rollouts", "dpo pairs", "video prompts",
                                  "prompts", "report results", "scores", "done prompts"])
def test_each_reader_names_the_bad_line_in_its_own_error(tmp_path, name, bad, reason):
    read, error = _readers()[name]
    path = write(tmp_path / "data.jsonl", b"\n" + bad + b"\n")
    with pytest.raises(error) as info:
        read(path)
    assert str(info.value).startswith(f"{path}, line 2: {reason}")
