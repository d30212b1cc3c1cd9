"""The offline template question generator: entity extraction, question invariants, errors, pickling."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest

from finger_reward.errors import QuestionError
from finger_reward.questions import DIMENSIONS, QuestionBank, fill_bank
from finger_reward.questions.generate import GenerationError, QuestionGenerator
from finger_reward.questions.entities import (
    CONJUNCTIONS, DETERMINERS, DIRECTION_WORDS, PREPOSITIONS, VERB_PAST, VERB_S, Entity, extract_entities, is_plural)
from finger_reward.questions.template import TemplateGenerator

PROMPTS = [
    "A young woman in a red coat walks her golden retriever along a snowy street at dusk.",
    "Two horses gallop across a green meadow while the camera tracks them from the side.",
    "A glass of water tips over on a wooden table and the water spills across the surface.",
    'A neon sign reading "OPEN 24 HOURS" flickers on above the door of a small diner at night.',
    "The camera slowly zooms in on an old clock tower as pigeons fly past it.",
    "the camera pans left over a city",
    "A CHEF POURS HOT COFFEE INTO A WHITE MUG, THEN IT SPILLS ONTO THE COUNTER!!!",
    "A ball falls off a shelf and bounces on the floor.",
    "Close up of a hummingbird's wings beating rapidly",
    "Aerial view of a winding river through a forest",
    "In a busy market at noon, an old man in a straw hat sells ripe mangoes to tourists, while children chase "
    "a red kite, pigeons scatter across the square, and the camera slowly dollies forward through the crowd.",
    "A cat and a dog play together in the garden",
    "A man with a red umbrella is walking in the rain",
    "Zoom in on a flower",
    "A robot writes 'hello' on a whiteboard",
    '"HELLO WORLD"',
    "sunset",
    "Running!!!",
    "jump",
    "!!!",
    "une tasse de café fume sur la table",
    "一只猫在草地上奔跑",
    "Ein Hund läuft über die Straße im Schnee",
]


def names(prompt: str) -> list[str]:
    return [e.name for e in extract_entities(prompt)]


def entity(prompt: str, name: str) -> Entity:
    found = {e.name: e for e in extract_entities(prompt)}
    assert name in found, f"{name!r} not among {list(found)}"
    return found[name]


def questions(prompt: str, **options) -> list:
    return TemplateGenerator(**options).generate_questions([prompt])[prompt]


def texts(prompt: str, dimension: str, entity_name: str | None = None) -> list[str]:
    return [q.question for q in questions(prompt)
            if q.dimension == dimension and (entity_name is None or q.entity == entity_name)]


# ---- what every prompt gets ---------------------------------------------------------------------


@pytest.mark.parametrize("max_per_dimension", [2, 4, 7])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_every_prompt_gets_both_polarities_in_all_five_dimensions(prompt, max_per_dimension):
    result = questions(prompt, max_per_dimension=max_per_dimension)
    for dimension in DIMENSIONS:
        kept = [q for q in result if q.dimension == dimension]
        assert {q.positive for q in kept} == {True, False}, (dimension, [q.question for q in kept])
        assert len(kept) <= max_per_dimension
    for q in result:
        assert q.prompt == prompt
        assert q.entity.strip() and q.entity.lower().split()[-1] in q.question.lower(), q  # the head noun
        assert q.question.endswith("?") and "{" not in q.question and "  " not in q.question, q
    keys = [re.sub(r"[^a-z0-9]+", " ", q.question.lower()).strip() for q in result]
    assert len(set(q.question for q in result)) == len(result) and len(set(keys)) == len(set(keys))


def test_a_larger_cap_keeps_more_questions_and_the_default_is_four():
    prompt = PROMPTS[0]
    assert max(sum(q.dimension == d for q in questions(prompt)) for d in DIMENSIONS) == 4
    assert len(questions(prompt, max_per_dimension=8)) > len(questions(prompt))
    assert "Is the coat red?" not in texts(prompt, "text_alignment")
    wider = [q.question for q in questions(prompt, max_per_dimension=6)]
    assert "Is the coat red?" in wider
    assert "Does the red coat keep the same colour throughout the video?" in wider


# ---- the benchmark-style prompt set (tests/data/template_prompts.txt) ----------------------------


def _load_prompt_set() -> list[tuple[str, list[str]]]:
    """(prompt, key nouns) per line of the data file; comment and blank lines skipped."""
    rows = []
    for line in (Path(__file__).parent / "data" / "template_prompts.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            prompt, _, nouns = line.partition(" | ")
            rows.append((prompt, [n.strip() for n in nouns.split(",") if n.strip()]))
    return rows


PROMPT_SET = _load_prompt_set()


def _has_words(text: str, words: str) -> bool:
    return re.search(rf"(?<![\w']){re.escape(words.lower())}(?![\w'])", text.lower()) is not None


def test_the_prompt_set_is_large_and_varied():
    assert len(PROMPT_SET) >= 40 and all(nouns for _, nouns in PROMPT_SET)
    assert len({p for p, _ in PROMPT_SET}) == len(PROMPT_SET)


@pytest.mark.parametrize("prompt, key_nouns", PROMPT_SET, ids=[p[:40] for p, _ in PROMPT_SET])
def test_each_key_noun_is_an_entity_that_questions_ask_about(prompt, key_nouns):
    entities = extract_entities(prompt)
    asked = " ".join(q.question for q in questions(prompt, max_per_dimension=10))
    for noun in key_nouns:
        assert any(_has_words(e.name, noun) for e in entities), (noun, [e.name for e in entities])
        assert _has_words(asked, noun.split()[-1]), (noun, asked)


@pytest.mark.parametrize("prompt, key_nouns", PROMPT_SET, ids=[p[:40] for p, _ in PROMPT_SET])
def test_no_verb_inside_an_entity_and_no_cut_off_question(prompt, key_nouns):
    for e in extract_entities(prompt):
        # "blue square spins": a verb after the noun's first word; a leading word may be a noun ("waves")
        inside = [w for w in e.name.split()[1:] if w in VERB_S or w in VERB_PAST]
        assert not inside, (e.name, inside)
    for q in questions(prompt, max_per_dimension=10):
        words = re.findall(r"[\w'\"-]+", q.question.lower())
        assert words[-1] not in PREPOSITIONS | DETERMINERS | CONJUNCTIONS, q.question
        for i, w in enumerate(words[:-1]):  # "from left" without its "to right"
            side = words[i + 2] if words[i + 1] == "the" and i + 2 < len(words) else words[i + 1]
            if w == "from" and side in DIRECTION_WORDS:
                assert "to" in words[i + 2:i + 5], q.question


@pytest.mark.parametrize("prompt, key_nouns", PROMPT_SET, ids=[p[:40] for p, _ in PROMPT_SET])
def test_every_question_agrees_with_its_entity_in_number(prompt, key_nouns):
    for q in questions(prompt, max_per_dimension=10):
        plural = is_plural(q.entity.split())
        wrong = ("Is the ", "Does the ") if plural else ("Are the ", "Do the ")
        for start in wrong:
            assert not q.question.startswith(start + q.entity + " "), q.question
        if q.question.startswith(("Is the ", "Are the ")) and q.question.split()[2] != "video":
            assert plural == q.question.startswith("Are"), q.question


@pytest.mark.parametrize("prompt, expected", [
    ("a blue square spins", "Does the blue square spin?"),
    ("a red circle moves from left to right", "Does the red circle move from left to right?"),
    ("A golden retriever runs back and forth on a snowy street", "Does the golden retriever run back and forth?"),
    ("a golden retriever runs on a snowy street", "Is the street snowy?"),
    ("A bus stops in front of a school", "Does the bus stop in front of a school?"),
    ("Three red apples fall from a tree", "Are the apples red?"),
    ("A goldfish swims in a glass bowl", "Does the goldfish swim in a glass bowl?"),
])
def test_questions_read_as_a_person_would_write_them(prompt, expected):
    assert expected in [q.question for q in questions(prompt, max_per_dimension=10)]


def test_the_known_bad_outputs_are_gone():
    assert names("a blue square spins") == ["blue square"]
    asked = [q.question for q in questions("a blue square spins", max_per_dimension=10)]
    assert not any("spins" in q for q in asked)
    assert names("a golden retriever runs on a snowy street") == ["golden retriever", "snowy street"]
    assert not any(q.endswith("from left?") for q in texts("a red circle moves from left to right", "dynamic_degree"))


# ---- entity extraction --------------------------------------------------------------------------


def test_people_clothing_animals_and_scene_with_actions():
    prompt = PROMPTS[0]
    assert names(prompt) == ["young woman", "red coat", "golden retriever", "snowy street"]
    woman = entity(prompt, "young woman")
    assert woman.kind == "subject" and woman.attributes == ("young",)
    assert woman.actions and woman.actions[0].split()[0] == "walks"
    assert entity(prompt, "red coat").attributes == ("red",)
    retriever = entity(prompt, "golden retriever")
    assert retriever.actions == () and retriever.attributes == ()  # a breed: golden is part of the name
    assert entity(prompt, "snowy street").kind == "scene"  # "dusk" is a time, not an entity
    assert "Does the young woman walk her golden retriever?" in texts(prompt, "dynamic_degree")


def test_plural_subject_with_a_count_and_a_bare_verb():
    prompt = PROMPTS[1]
    horses = entity(prompt, "two horses")
    assert horses.actions == ("gallop across a green meadow",)
    assert "Does the video show exactly two horses?" in texts(prompt, "text_alignment")
    assert "Do the two horses gallop across a green meadow?" in texts(prompt, "dynamic_degree")
    assert entity(prompt, "camera").kind == "camera"


def test_quoted_text_becomes_a_text_entity_with_spelling_questions():
    prompt = PROMPTS[3]
    text = entity(prompt, 'text "OPEN 24 HOURS"')
    assert text.kind == "text"
    assert "reading" not in " ".join(entity(prompt, "neon sign").actions)
    alignment = [q for q in questions(prompt) if q.dimension == "text_alignment" and q.entity == text.name]
    assert {q.positive for q in alignment} == {True, False}
    assert 'Does the video show the text "OPEN 24 HOURS" spelled correctly?' in [q.question for q in alignment]
    assert entity("A robot writes 'hello' on a whiteboard", 'text "hello"').kind == "text"
    assert entity("A man's dog barks", "man's dog").actions == ("barks",)  # an apostrophe is not a quote


@pytest.mark.parametrize("prompt, motion", [
    ("The camera zooms in", "Does the camera zoom in?"),
    ("the camera pans left over a city", "Does the camera pan left over a city?"),
    ("Zoom in on a flower", "Does the camera zoom in on a flower?"),
    ("Aerial view of a winding river", "Does the camera use an aerial view, as the prompt asks?"),
    ("A tracking shot of a cyclist", "Does the camera use a tracking shot, as the prompt asks?"),
])
def test_camera_phrases_become_one_camera_entity_with_a_motion_question(prompt, motion):
    cameras = [e for e in extract_entities(prompt) if e.kind == "camera"]
    assert [e.name for e in cameras] == ["camera"]
    dynamic = [q for q in questions(prompt) if q.dimension == "dynamic_degree" and q.entity == "camera"]
    assert motion in [q.question for q in dynamic if q.positive]
    assert any(not q.positive for q in dynamic)


def test_camera_motion_stays_in_the_cap_next_to_the_main_action():
    prompt = PROMPTS[4]
    assert entity(prompt, "camera").actions == ("zooms in on an old clock tower",)
    assert entity(prompt, "pigeons").actions == ("fly past it",)
    dynamic = texts(prompt, "dynamic_degree")
    assert "Does the camera zoom in on an old clock tower?" in dynamic
    assert "Do the pigeons fly past it?" in dynamic


def test_physics_prompts_ask_about_gravity_for_the_moving_object():
    prompt = PROMPTS[2]
    assert names(prompt)[:2] == ["glass", "water"]  # "the water" later merges into the first "water"
    assert entity(prompt, "water").actions == ("spills across the surface",)
    assert "Does the motion of the water follow gravity and momentum?" in texts(prompt, "factual_consistency")
    assert entity(PROMPTS[6], "hot coffee").actions == ("spills onto the counter",)  # "it" is the coffee
    factual = texts(PROMPTS[6], "factual_consistency", "chef")
    assert "Does the chef move smoothly, without jumping?" in factual  # a person pours; no gravity question


def test_duplicates_merge_and_prompt_order_is_kept():
    assert names("A dog chases another dog across a lawn") == ["dog", "lawn"]
    assert entity("A ball falls off a shelf and bounces on the floor.", "ball").actions == (
        "falls off a shelf", "bounces on the floor")
    assert [e.actions for e in extract_entities("A cat and a dog play together")] == [
        ("play together",), ("play together",)]


def test_case_and_punctuation_do_not_change_the_entities():
    assert extract_entities("A DOG RUNS ON THE BEACH!!!") == extract_entities("a dog runs on the beach")
    assert names("A DOG RUNS ON THE BEACH!!!") == ["dog", "beach"]


@pytest.mark.parametrize("prompt, name", [
    ("sunset", "sunset"),
    ("Running!!!", "running"),
    ("jump", "jump"),
    ("!!!", "!!!"),
    ("一只猫在草地上奔跑", "一只猫在草地上奔跑"),
])
def test_a_prompt_without_a_clear_noun_phrase_gets_one_subject(prompt, name):
    assert extract_entities(prompt) == [Entity(name, "subject")]


def test_non_ascii_words_are_kept():
    assert names("A crème brûlée sits on a plate") == ["crème brûlée", "plate"]
    assert "Does the video show the crème brûlée?" in texts("A crème brûlée sits on a plate", "text_alignment")
    german = extract_entities("Ein Hund läuft über die Straße")  # unknown words: the last ones name the entity
    assert [(e.name, e.kind) for e in german] == [("läuft über die straße", "subject")]


# ---- the generator as callers use it ------------------------------------------------------------


def test_generator_is_deterministic_and_batch_equals_single():
    first = TemplateGenerator().generate_questions(PROMPTS)
    second = TemplateGenerator().generate_questions(PROMPTS)
    assert first == second and list(first) == PROMPTS
    assert all(first[p] == questions(p) for p in PROMPTS[:5])


def test_generator_pickles_and_implements_the_protocol():
    generator = TemplateGenerator(max_per_dimension=3)
    restored = pickle.loads(pickle.dumps(generator))
    assert restored.max_per_dimension == 3 and repr(restored) == "TemplateGenerator(max_per_dimension=3)"
    assert restored.generate_questions(PROMPTS[:3]) == generator.generate_questions(PROMPTS[:3])
    assert isinstance(TemplateGenerator(), QuestionGenerator)
    assert pickle.loads(pickle.dumps(extract_entities(PROMPTS[0]))) == extract_entities(PROMPTS[0])


def test_fill_bank_stores_the_template_questions():
    bank = QuestionBank()
    assert fill_bank(bank, PROMPTS[:4], TemplateGenerator()) == {}
    assert bank.prompts == PROMPTS[:4] and bank.questions_for(PROMPTS[0]) == questions(PROMPTS[0])


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_empty_prompt_is_an_error_naming_it(prompt):
    with pytest.raises(QuestionError, match="empty or only whitespace") as info:
        extract_entities(prompt)
    assert repr(prompt) in str(info.value)
    with pytest.raises(GenerationError) as info:
        TemplateGenerator().generate_questions(["a dog runs", prompt])
    assert list(info.value.failures) == [prompt] and "empty or only whitespace" in info.value.failures[prompt]
    assert list(info.value.results) == ["a dog runs"] and info.value.results["a dog runs"]


def test_wrong_argument_types_are_errors():
    with pytest.raises(QuestionError, match="got a single string"):
        TemplateGenerator().generate_questions("a dog runs")
    with pytest.raises(QuestionError, match=r"prompts\[1\] must be a string, got int"):
        TemplateGenerator().generate_questions(["a dog runs", 5])
    with pytest.raises(QuestionError, match="prompt must be a string, got NoneType"):
        extract_entities(None)
    for bad in (0, -1, 2.5, True, "4"):
        with pytest.raises(QuestionError, match="max_per_dimension must be a positive integer"):
            TemplateGenerator(max_per_dimension=bad)
    with pytest.raises(TypeError):
        TemplateGenerator(4)  # keyword-only


# ---- the shipped tiny evaluator on template questions --------------------------------------------


def test_tiny_evaluator_with_template_questions_ranks_clean_clips_above_frozen_ones(tmp_path):
    """The synthetic world's prompts asked with template questions (not its own bank): the clean clip beats the
    frozen one in every scene, by its motion questions, and most other defective clips too."""
    from finger_reward import FingerReward, synthetic
    from finger_reward.trainers import tiny_evaluator

    # the world tests/test_tiny_evaluator.py draws (seeded, so the comparison is exact, not a sample)
    world = synthetic.make_world(tmp_path, num_scenes=6, seed=2024, **tiny_evaluator.CLIP)
    reward = FingerReward.from_pretrained("tiny", question_generator=TemplateGenerator())
    results = reward.score([c.path for c in world.clips], [c.prompt for c in world.clips])
    by_scene: dict = {}
    for clip, result in zip(world.clips, results):
        assert result.ok, result.error
        by_scene.setdefault(clip.prompt, {})[clip.defect] = result
    wins = 0
    for prompt, of in by_scene.items():
        asked = {q.question for q in of[None].questions}
        assert not any("from left?" in q or "from top?" in q for q in asked), asked
        assert of[None].overall > of["frozen"].overall, (prompt, of[None].overall, of["frozen"].overall)
        assert of[None].dimensions["dynamic_degree"] > of["frozen"].dimensions["dynamic_degree"] + 0.3, prompt
        wins += sum(of[None].overall > result.overall for defect, result in of.items() if defect)
    assert wins >= 0.8 * 5 * len(by_scene), f"clean above defective in {wins} of {5 * len(by_scene)} pairs"
