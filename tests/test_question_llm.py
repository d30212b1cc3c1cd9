"""LLM question generators against a real loopback chat server and a tiny real chat model."""

import json
import pickle

import pytest

from finger_reward import FingerReward, QuestionBank
from finger_reward.errors import BatchError
from finger_reward.questions import (
    DIMENSIONS,
    GenerationError,
    OpenAIGenerator,
    QuestionGenerator,
    TransformersGenerator,
    fill_bank,
    load_question_config,
)
from finger_reward.questions.llm import build_messages
from finger_reward.questions.parse import parse_questions
from finger_reward.questions.template import TemplateGenerator
from tests.chat_server import ChatServer, Slow, Status

CAT = "a black cat jumps onto a wooden table"
DOG = "a dog runs on the beach"
FAIL = "an unlucky prompt"


def reply_for(entity: str, extra: int = 0) -> str:
    """A realistic reply: a preamble, fenced JSON with a trailing comma, a closing remark."""
    questions = [
        {"dimension": "Visual Quality", "entity": entity, "question": f"Is the {entity} sharp?", "positive": True},
        {"dimension": "temporal_consistency", "entity": entity, "question": f"Does the {entity} flicker?", "positive": False},
        {"dimension": "dynamic degree", "entity": entity, "question": f"Does the {entity} move?", "positive": "yes"},
        {"dimension": "Text-to-Video Alignment", "entity": entity, "question": f"Is there a {entity}?", "positive": True},
        {"dimension": "factual_consistency", "entity": entity, "question": f"Does the {entity} float?", "positive": "negative"},
    ]
    questions += [{"dimension": "visual_quality", "entity": entity, "question": f"Is detail {i} of the {entity} clean?",
                   "positive": True} for i in range(extra)]
    body = json.dumps({"entities": [entity], "questions": questions}, indent=1)
    body = body[: body.rindex("}", 0, len(body) - 1) + 1] + ",\n ]\n}"  # a trailing comma, as LLMs write
    return f"Sure! Here are the questions:\n```json\n{body}\n```\nLet me know if you need more."


def generator(server, **kw):
    options = dict(api_key="sk-test", concurrency=2, max_retries=2, backoff=0.01, timeout=5.0)
    return OpenAIGenerator("judge-llm", base_url=server.url, **{**options, **kw})


# ---- parsing real-looking replies -----------------------------------------------------------------

MESSY = [
    (reply_for("cat"), 5, 0),
    ('[{"dimension": "aesthetics", "entity": "cat", "question": "Nice?", "positive": true},'
     ' {"dimension": "visual", "entity": "cat", "question": "Is it clear?", "positive": 1}]', 1, 1),
    ("{'questions': [{'dimension': 'temporal', 'entity': 'cat', 'question': \"Does the cat's fur change?\", 'positive': False}]}", 1, 0),
    ('{"visual_quality": [{"entity": "dog", "question": "Is the dog blurry?", "positive": false}],'
     ' "dynamic_degree": ["Does the dog run?"]}', 1, 1),
    ('{"questions": [{"dimension": "visual_quality", "entity": "cat", "question": "Is it sharp?", "positive": true},'
     ' {"dimension": "visual_', 1, 1),
    ("I'm sorry, I can't help with that request.", 0, 1),
    ("", 0, 1),
    ('{"questions": [{"dimension": "dynamic_degree", "entity": "cat", "positive": true}]}', 0, 1),
    ('Answer: {"questions": [{"dimension": "motion", "entity": "cat", "question": "Does it jump?", "polarity": "Positive"}]} hope that helps', 1, 0),
]


@pytest.mark.parametrize("text, n_questions, has_problems", MESSY)
def test_parser_on_messy_replies(text, n_questions, has_problems):
    questions, problems = parse_questions(text, CAT)
    assert len(questions) == n_questions
    assert bool(problems) == bool(has_problems)
    assert all(q.prompt == CAT and q.dimension in DIMENSIONS for q in questions)


def test_messages_follow_the_config():
    config = load_question_config()
    messages = build_messages(CAT, config)
    assert messages[0]["role"] == "system" and all(d in messages[0]["content"] for d in DIMENSIONS)
    assert messages[-1] == {"role": "user", "content": f"Prompt: {CAT}"}
    assert len(messages) == 2 + 2 * len(config.examples)
    assert json.loads(messages[2]["content"])["questions"] == config.examples[0]["questions"]


# ---- the OpenAI-compatible generator over real HTTP ----------------------------------------------

def test_openai_generator_parses_dedupes_and_caps():
    scripts = {CAT: [reply_for("cat", extra=5)], DOG: [reply_for("dog")]}
    with ChatServer(scripts) as server:
        result = generator(server, max_per_dimension=3).generate_questions([CAT, DOG, CAT])
    assert set(result) == {CAT, DOG}
    cat = result[CAT]
    assert {q.dimension for q in cat} == set(DIMENSIONS)
    assert sum(q.dimension == "visual_quality" for q in cat) == 3
    assert all(q.prompt == CAT and q.entity == "cat" for q in cat)
    assert [q.positive for q in cat if q.dimension == "factual_consistency"] == [False]
    assert server.count(CAT) == 1 and server.count(DOG) == 1
    request = server.requests[0]
    assert request["auth"] == "Bearer sk-test" and request["body"]["model"] == "judge-llm"
    assert request["body"]["temperature"] == 0.0


def test_unusable_reply_is_retried_with_sampling():
    with ChatServer({CAT: ["Here you go: (nothing)", reply_for("cat")]}) as server:
        result = generator(server).generate_questions([CAT])
    assert len(result[CAT]) == 5 and server.count(CAT) == 2
    assert server.requests[1]["body"]["temperature"] == pytest.approx(0.7)


def test_http_errors_and_timeouts_are_retried():
    scripts = {CAT: [Status(429, retry_after=0), Status(503), reply_for("cat")],
               DOG: [Slow(1.0, reply_for("dog")), reply_for("dog")]}
    with ChatServer(scripts) as server:
        result = generator(server, timeout=0.4).generate_questions([CAT, DOG])
    assert set(result) == {CAT, DOG}
    assert server.count(CAT) == 3 and server.count(DOG) == 2


def test_failed_prompt_is_reported_alone():
    scripts = {CAT: [reply_for("cat")], FAIL: ["```json\n{not json at all\n```"], DOG: [Status(401)]}
    with ChatServer(scripts) as server:
        with pytest.raises(GenerationError) as caught:
            generator(server, max_retries=1).generate_questions([CAT, FAIL, DOG])
    err = caught.value
    assert set(err.failures) == {FAIL, DOG} and set(err.results) == {CAT}
    assert "unparseable JSON" in err.failures[FAIL] and "2 attempt(s)" in err.failures[FAIL]
    assert "HTTP 401" in err.failures[DOG]
    assert repr(FAIL) in str(err)


def test_fallback_to_template():
    with ChatServer({CAT: ["no idea"]}) as server:
        result = generator(server, max_retries=0, fallback=TemplateGenerator()).generate_questions([CAT])
    assert {q.dimension for q in result[CAT]} == set(DIMENSIONS)


def test_environment_variables_and_pickling(monkeypatch):
    with ChatServer({CAT: [reply_for("cat")]}) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
        gen = pickle.loads(pickle.dumps(OpenAIGenerator("judge-llm")))
        assert isinstance(gen, QuestionGenerator)
        gen.generate_questions([CAT])
    assert server.requests[0]["auth"] == "Bearer sk-env"


def test_bank_is_a_cache():
    bank = QuestionBank()
    with ChatServer({CAT: [reply_for("cat")], DOG: [reply_for("dog")]}) as server:
        gen = generator(server)
        assert fill_bank(bank, [CAT, CAT, DOG], gen) == {}
        assert fill_bank(bank, [DOG, CAT], gen) == {}
    assert len(server.requests) == 2 and len(bank.questions_for(CAT)) == 5


def test_finger_reward_asks_once_per_prompt(tiny_model_dir, mp4_paths):
    with ChatServer({CAT: [reply_for("cat")], FAIL: ["nope"]}) as server:
        reward = FingerReward.from_pretrained(tiny_model_dir, question_generator=generator(server, max_retries=0))
        group = [mp4_paths[0]] * 4
        scores = reward(group, CAT)
        assert len(scores) == 4 and server.count(CAT) == 1
        with pytest.raises(BatchError) as caught:
            reward.score([mp4_paths[0], mp4_paths[1]], [FAIL, CAT])
        assert server.count(CAT) == 1  # cached
    err = caught.value
    assert sorted(err.failures) == [0] and FAIL in str(err.failures[0]) and err.results[1].ok


def test_template_is_the_default(tiny_model_dir, mp4_paths):
    reward = FingerReward.from_pretrained(tiny_model_dir)
    result = reward.score(mp4_paths[:1], "a red kite flies over a hill")[0]
    assert result.ok and set(result.dimensions) == set(DIMENSIONS)


# ---- a local transformers chat model --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_chat_model():
    from finger_reward.tiny import build_chat_model

    return build_chat_model()


def test_transformers_generator_garbage_is_a_clear_error(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    gen = TransformersGenerator(model, tokenizer, max_new_tokens=12, max_retries=1, batch_size=2)
    with pytest.raises(GenerationError) as caught:
        gen.generate_questions([CAT, DOG, FAIL])
    assert set(caught.value.failures) == {CAT, DOG, FAIL}
    assert all("2 attempt(s)" in why for why in caught.value.failures.values())


def test_transformers_generator_falls_back_to_template(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    gen = TransformersGenerator(model, tokenizer, max_new_tokens=8, max_retries=0, fallback=TemplateGenerator())
    result = gen.generate_questions([CAT])
    assert {q.dimension for q in result[CAT]} == set(DIMENSIONS)


def test_a_refusing_server_is_reported_once_without_a_retry_storm():
    with ChatServer({CAT: [Status(503, retry_after=0, message="overloaded")], DOG: [reply_for("dog")]}) as server:
        with pytest.raises(GenerationError) as caught:
            generator(server, max_retries=3).generate_questions([CAT, DOG])
        asked = server.count(CAT)
    why = caught.value.failures[CAT]
    assert "HTTP 503" in why and why.count("attempt(s)") == 1, why
    assert asked == 4  # the request's own 1 + 3 retries, not re-asked by the prompt loop (was 16)
    assert set(caught.value.results) == {DOG}


def test_cli_progress_counts_only_prompts_that_got_questions(tmp_path):
    import subprocess
    import sys

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{CAT}\n{DOG}\n")
    with ChatServer({CAT: [Status(503, retry_after=0)], DOG: [reply_for("dog")]}) as server:
        done = subprocess.run([sys.executable, "-m", "finger_reward.cli", "questions", "--prompts", str(prompts),
                               "--out", str(tmp_path / "bank.jsonl"), "--generator", "openai", "--model", "m",
                               "--base-url", server.url, "--api-key", "k"],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "1/2" in done.stderr and "2/2" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("finger-reward: error")]
    assert len(errors) == 1 and repr(CAT) in errors[0] and errors[0].count("attempt(s)") == 1, errors
