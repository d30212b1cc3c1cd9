"""Question records and the question bank: validation, JSONL loading with line-numbered errors, round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finger_reward.errors import FingerError, QuestionError
from finger_reward.questions import DIMENSIONS, Question, QuestionBank, as_bank

PROMPT_A = "a red circle moves from left to right on a dark background"
PROMPT_B = "a blue square moves from top to bottom on a dark background"
PROMPT_C = "une tasse de café fume sur la table"


def record(prompt=PROMPT_A, dimension="visual_quality", entity="red circle", question="Is the video clear?",
           positive=True, **extra) -> dict:
    return {"prompt": prompt, "dimension": dimension, "entity": entity, "question": question,
            "positive": positive, **extra}


def question(**fields) -> Question:
    return Question(**record(**fields))


def write_lines(path: Path, lines: list) -> Path:
    """Each item a dict (written as JSON) or a raw string (written as is)."""
    text = "".join((json.dumps(line) if isinstance(line, dict) else line) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")
    return path


def expect_question_error(*parts: str):
    """Context manager: QuestionError whose message contains every part."""

    class _Expect:
        def __enter__(self):
            self.info = pytest.raises(QuestionError)
            self.raised = self.info.__enter__()
            return self.raised

        def __exit__(self, *exc):
            handled = self.info.__exit__(*exc)
            message = str(self.raised.value)
            for part in parts:
                assert part in message, f"{part!r} not in {message!r}"
            return handled

    return _Expect()


# ---- Question -----------------------------------------------------------------------------------


def test_question_holds_its_fields_and_is_hashable():
    q = question()
    assert (q.prompt, q.dimension, q.entity, q.question, q.positive) == (
        PROMPT_A, "visual_quality", "red circle", "Is the video clear?", True)
    assert q == question() and hash(q) == hash(question())
    assert q != question(positive=False)
    assert q.to_dict() == record()
    with pytest.raises(AttributeError):
        q.positive = False  # frozen


@pytest.mark.parametrize("dimension", DIMENSIONS)
def test_every_dimension_is_accepted(dimension):
    assert question(dimension=dimension).dimension == dimension


def test_unknown_dimension_lists_the_valid_ones():
    with expect_question_error("unknown dimension 'motion_quality'", "expected one of", *DIMENSIONS):
        question(dimension="motion_quality")
    with expect_question_error("unknown dimension 'Visual_Quality'"):
        question(dimension="Visual_Quality")


@pytest.mark.parametrize("field", ["prompt", "question"])
@pytest.mark.parametrize("value", ["", "   \n"])
def test_empty_prompt_or_question_is_rejected(field, value):
    with expect_question_error(f"field {field!r} must be a non-empty string", repr(value)):
        question(**{field: value})


def test_entity_may_be_empty_but_must_be_a_string():
    assert question(entity="").entity == ""  # a whole-video question names no entity
    with expect_question_error("field 'entity' must be a non-empty string, got None"):
        question(entity=None)
    with expect_question_error("field 'question' must be a non-empty string, got 5"):
        question(question=5)


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, None, 2.5])
def test_positive_must_be_a_bool(value):
    with expect_question_error("field 'positive' must be true or false", f"got {value!r}"):
        question(positive=value)


def test_from_dict_accepts_0_and_1_as_the_papers_q_stat():
    yes = Question.from_dict(record(positive=1))
    no = Question.from_dict(record(positive=0))
    assert yes.positive is True and no.positive is False
    assert yes == question(positive=True)
    with expect_question_error("field 'positive' must be true or false, got 2"):
        Question.from_dict(record(positive=2))
    with expect_question_error("got 'no'"):
        Question.from_dict(record(positive="no"))


def test_from_dict_ignores_extra_keys_and_names_missing_fields():
    q = Question.from_dict(record(answer="Yes", video="a.mp4", reason="It is clear."))
    assert q == question()
    partial = record()
    del partial["entity"], partial["positive"]
    with expect_question_error("missing field(s) entity, positive"):
        Question.from_dict(partial)
    with expect_question_error("expected a JSON object, got list"):
        Question.from_dict([PROMPT_A])


def test_question_error_is_a_finger_error_and_a_value_error():
    with pytest.raises(FingerError):
        question(dimension="nope")
    with pytest.raises(ValueError):
        question(dimension="nope")


# ---- QuestionBank.from_jsonl --------------------------------------------------------------------


def test_from_jsonl_keeps_order_drops_duplicates_ignores_extras_and_blank_lines(tmp_path):
    a1 = record(question="Is the video clear?")
    a2 = record(dimension="dynamic_degree", question="Does the red circle move?", positive=False)
    b1 = record(prompt=PROMPT_B, entity="blue square", dimension="text_alignment", question="Is the square blue?")
    c1 = record(prompt=PROMPT_C, entity="tasse", dimension="factual_consistency", question="La tasse fume-t-elle ?",
                positive=1)
    path = write_lines(tmp_path / "bank.jsonl", [
        b1,
        "",
        {**a1, "answer": "Yes", "video": "videos/0.mp4", "reason": "clean"},
        "   \t",
        a2,
        a1,  # duplicate of line 3 without the extras: dropped
        c1,
        b1,  # duplicate
        "",
    ])
    bank = QuestionBank.from_jsonl(path)
    assert bank.prompts == [PROMPT_B, PROMPT_A, PROMPT_C]  # first-seen order
    assert len(bank) == 3
    assert [q.question for q in bank.questions_for(PROMPT_A)] == ["Is the video clear?", "Does the red circle move?"]
    assert bank.questions_for(PROMPT_A)[1].positive is False
    assert bank.questions_for(PROMPT_B) == [Question.from_dict(b1)]
    assert bank.questions_for(PROMPT_C)[0].positive is True
    assert len(list(bank)) == 4
    assert PROMPT_A in bank and "something else" not in bank
    # questions_for returns a copy: callers cannot change the bank
    bank.questions_for(PROMPT_A).clear()
    assert len(bank.questions_for(PROMPT_A)) == 2


def test_from_jsonl_accepts_a_str_path(tmp_path):
    path = write_lines(tmp_path / "bank.jsonl", [record()])
    assert list(QuestionBank.from_jsonl(str(path))) == [question()]


@pytest.mark.parametrize(
    "bad_line, parts",
    [
        ('{"prompt": "a", "dimension": ', ["Expecting value"]),
        ("not json at all", ["Expecting value"]),
        (json.dumps(record(dimension="beauty")), ["unknown dimension 'beauty'", "visual_quality"]),
        (json.dumps({k: v for k, v in record().items() if k != "question"}), ["missing field(s) question"]),
        (json.dumps({k: v for k, v in record().items() if k not in ("prompt", "positive")}),
         ["missing field(s) prompt, positive"]),
        (json.dumps(record(question="")), ["field 'question' must be a non-empty string"]),
        (json.dumps(record(positive="yes")), ["field 'positive' must be true or false"]),
        (json.dumps([record()]), ["expected a JSON object, got list"]),
        ('"just a string"', ["expected a JSON object, got str"]),
        ("42", ["expected a JSON object, got int"]),
    ],
)
def test_bad_line_is_reported_with_file_and_line_number(tmp_path, bad_line, parts):
    path = write_lines(tmp_path / "questions.jsonl", [record(), "", record(prompt=PROMPT_B), bad_line, record()])
    with expect_question_error(f"{path}, line 4: ", *parts) as info:
        QuestionBank.from_jsonl(path)
    assert str(info.value).startswith(f"{path}, line 4: ")


def test_non_utf8_line_is_reported_with_file_and_line_number(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((json.dumps(record()) + "\n").encode() + '{"prompt": "café"}\n'.encode("latin-1"))
    with expect_question_error(f"{path}, line 2: ", "utf-8"):
        QuestionBank.from_jsonl(path)


def test_missing_bank_file(tmp_path):
    path = tmp_path / "no_such_bank.jsonl"
    with expect_question_error(f"question bank {path} not found"):
        QuestionBank.from_jsonl(path)
    with expect_question_error(f"question bank {tmp_path} not found"):
        QuestionBank.from_jsonl(tmp_path)  # a directory is not a bank file


def test_empty_file_gives_an_empty_bank(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    bank = QuestionBank.from_jsonl(path)
    assert len(bank) == 0 and list(bank) == []


# ---- questions_for, add, to_jsonl ----------------------------------------------------------------


def test_questions_for_an_unknown_prompt_names_it():
    bank = QuestionBank([question(), question(prompt=PROMPT_B)])
    with expect_question_error("no questions for prompt 'a green triangle'", "in the question bank (2 prompts)"):
        bank.questions_for("a green triangle")
    long_prompt = "x" * 300
    with expect_question_error("x" * 117 + "...") as info:
        bank.questions_for(long_prompt)
    assert "x" * 118 not in str(info.value)
    with expect_question_error("no questions for prompt", "(0 prompts)"):
        QuestionBank().questions_for(PROMPT_A)


def test_bank_rejects_non_question_records():
    with expect_question_error("expected Question records, got dict"):
        QuestionBank([record()])
    bank = QuestionBank()
    with expect_question_error("got str"):
        bank.add(["Is the video clear?"])


def test_to_jsonl_round_trip(tmp_path):
    original = QuestionBank([
        question(),
        question(dimension="temporal_consistency", question="Does the circle flicker?", positive=False),
        question(prompt=PROMPT_C, entity="tasse", question="La tasse est-elle blanche ?"),
        question(prompt=PROMPT_B, entity="", dimension="visual_quality", question="Is it sharp?"),
    ])
    path = original.to_jsonl(tmp_path / "nested" / "dir" / "bank.jsonl")
    assert path == tmp_path / "nested" / "dir" / "bank.jsonl" and path.is_file()
    text = path.read_text(encoding="utf-8")
    assert "café" in text  # written as UTF-8, not \u escapes
    assert len(text.splitlines()) == 4
    assert json.loads(text.splitlines()[0]) == record()
    loaded = QuestionBank.from_jsonl(path)
    assert list(loaded) == list(original)
    assert loaded.prompts == original.prompts == [PROMPT_A, PROMPT_C, PROMPT_B]


# ---- as_bank ------------------------------------------------------------------------------------


def test_as_bank_accepts_a_path_a_bank_and_records(tmp_path):
    questions = [question(), question(prompt=PROMPT_B, entity="blue square")]
    path = QuestionBank(questions).to_jsonl(tmp_path / "bank.jsonl")
    for source in (path, str(path)):
        bank = as_bank(source)
        assert isinstance(bank, QuestionBank) and list(bank) == questions
    bank = QuestionBank(questions)
    assert as_bank(bank) is bank
    for source in (questions, tuple(questions), (q for q in questions)):
        assert list(as_bank(source)) == questions


def test_as_bank_rejects_other_types_clearly(tmp_path):
    with expect_question_error("questions must be a JSONL path, a QuestionBank or a list of Question, got int"):
        as_bank(42)
    with expect_question_error("got NoneType"):
        as_bank(None)
    with expect_question_error("expected Question records, got dict"):
        as_bank([record()])
    with expect_question_error(f"question bank {tmp_path / 'missing.jsonl'} not found"):
        as_bank(str(tmp_path / "missing.jsonl"))
