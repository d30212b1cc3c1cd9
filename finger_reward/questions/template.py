"""The template question generator: offline, deterministic, no model (FingER Sec. 3.1 without an LLM).

A prompt is split into entities (subjects, quoted text, the camera, the scene) with small word
lists and a verb heuristic, and each entity fills fixed Yes/No templates of both polarities in all
five dimensions. It is the library's default generator and the fallback when an LLM fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

from finger_reward.errors import QuestionError
from finger_reward.questions.entities import (
    ANIMATE,
    COLOURS,
    DIRECTION_WORDS,
    Entity,
    NUMBERS,
    PHYSICS_VERBS,
    SHOT_HEADS_WITH_MODIFIER,
    SHOT_WORDS,
    VERB_BASES,
    VERB_PAST,
    VERB_S,
    base_form,
    is_plural,
    looks_third_person,
    extract_entities,
)
from finger_reward.questions.generate import GenerationError, tidy
from finger_reward.questions.record import DIMENSIONS, Question


# Per kind, one (positive, negative) template pair per dimension, in DIMENSIONS order.
_PAIRS = MappingProxyType({
    "subject": (
        ("{Is} the {name} clear and free of noise and blur?",
         "{Does} the {name} look deformed, melted or smeared?"),
        ("{Does} the {name} keep the same appearance throughout the video?",
         "{Does} the {name} flicker or change identity between frames?"),
        ("{Does} the {name} move naturally with the rest of the scene?",
         "{Does} the {name} jitter or move chaotically?"),
        ("Does the video show the {name}?", "{Is} the {name} missing from the video?"),
        ("{Does} the {name} keep a realistic shape, size and material?",
         "{Does} the {name} pass through solid objects or float unnaturally?"),
    ),
    "text": (
        ("Is the {name} sharp and readable?", "Is the {name} blurred or smeared?"),
        ("Does the {name} stay the same from frame to frame?",
         "Do the letters of the {name} change or flicker between frames?"),
        ("Does the {name} appear smoothly, without jumping?",
         "Does the {name} jitter or jump around the frame?"),
        ("Does the video show the {name} spelled correctly?", "Is the {name} garbled or misspelled?"),
        ("Does the {name} sit naturally on its surface, following its perspective?",
         "Does the {name} warp or bend unnaturally?"),
    ),
    "scene": (
        ("{Is} the {name} rendered with clear, detailed textures?", "{Does} the {name} look blurry, noisy or smeared?"),
        ("{Does} the {name} keep the same shape and position throughout the video?",
         "{Does} the {name} morph or jump between frames?"),
        ("{Does} the {name} look alive, with natural motion, rather than like a still photo?",
         "{Does} the {name} stay completely frozen, like a still photo?"),
        ("Does the video show the {name}?", "{Is} the {name} replaced by a different setting?"),
        ("{Does} the {name} keep a realistic structure and perspective?",
         "{Does} the {name} warp or bend unnaturally?"),
    ),
    "camera": (
        ("Is the footage from the {name} sharp and well exposed?",
         "Does the {name} footage show blur, noise or compression blocks?"),
        ("Does the {name} move smoothly, without sudden jumps or cuts?",
         "Does the {name} view jump or cut abruptly between frames?"),
        ("Does the {name} move steadily and purposefully?", "Does the {name} shake or jump erratically?"),
        ("Does the {name} frame and move the shot as the prompt describes?",
         "Does the {name} frame or move differently from what the prompt asks?"),
        ("Does the perspective stay consistent as the {name} moves?",
         "Does the scene warp or bend unnaturally as the {name} moves?"),
    ),
})
# Which entities come first in each dimension (lower first); acting entities lead dynamics and physics.
_RANKS = MappingProxyType({
    "visual_quality": MappingProxyType({"subject": 0, "text": 1, "scene": 2, "camera": 3}),
    "temporal_consistency": MappingProxyType({"subject": 0, "text": 1, "scene": 2, "camera": 3}),
    "dynamic_degree": MappingProxyType({"subject": 2, "text": 3, "scene": 4, "camera": 1}),
    "text_alignment": MappingProxyType({"subject": 0, "text": 0, "scene": 1, "camera": 2}),
    "factual_consistency": MappingProxyType({"subject": 1, "text": 2, "scene": 3, "camera": 4}),
})


def _rank(entity: Entity, dimension: str) -> int:
    acting = entity.actions and entity.kind in ("subject", "text")
    if acting and dimension in ("dynamic_degree", "factual_consistency"):
        return 0
    return _RANKS[dimension][entity.kind]


def _fill(template: str, entity: Entity, **values: str) -> str:
    """Fill a template with the entity's name and the verb forms that agree with it."""
    plural = entity.kind in ("subject", "scene") and is_plural(entity.name.split())
    return template.format(name=entity.name, Is="Are" if plural else "Is", Does="Do" if plural else "Does", **values)


def _is_shot(action: str) -> bool:
    """A camera action named as a shot ("aerial view", "close-up") rather than a move ("pans left")."""
    return action.split()[-1] in SHOT_WORDS | SHOT_HEADS_WITH_MODIFIER


def _is_direction(action: str) -> bool:
    """Whether an action goes somewhere given whole: "moves from left to right", "runs back and forth"."""
    words = action.split()
    return any(words[i] in ("to", "and") and words[i - 1] in DIRECTION_WORDS and words[i + 1] in DIRECTION_WORDS | {"the"}
               for i in range(1, len(words) - 1))


def _action_question(entity: Entity, action: str) -> str:
    """A positive dynamic-degree question asking whether the entity performs one of its actions."""
    verb, _, rest = action.partition(" ")
    rest = f" {rest}" if rest else ""
    if entity.kind == "camera" and _is_shot(action):
        return f"Does the camera use {'an' if action[0] in 'aeiou' else 'a'} {action}, as the prompt asks?"
    if verb.endswith("ing"):
        return _fill("{Is} the {name} {action}?", entity, action=action)
    if verb in VERB_PAST or (verb.endswith("ed") and verb not in VERB_BASES):
        return f"Does the video show that the {entity.name} {action}?"
    if verb in VERB_S or (verb not in VERB_BASES and looks_third_person(verb)):
        return f"Does the {entity.name} {base_form(verb)}{rest}?"
    return _fill("{Does} the {name} {action}?", entity, action=action)


def _head(entity: Entity) -> str:
    """The entity's name without its attributes and count: "three red apples" -> "apples"."""
    words = [w for w in entity.name.split() if w not in entity.attributes and w not in NUMBERS and not w.isdigit()]
    return " ".join(words) or entity.name


def _attribute_question(entity: Entity, attribute: str) -> str:
    """Whether the entity has an attribute the prompt gives it, as a person asks: "Is the street snowy?"."""
    head = _head(entity)
    return f"{'Are' if is_plural(entity.name.split()) else 'Is'} the {head} {attribute}?"


def _positives(entity: Entity, dimension: str, template: str) -> list[str]:
    """The entity's positive questions in one dimension, the main one first; `template` is the default."""
    words, default = entity.name.split(), _fill(template, entity)
    if dimension == "dynamic_degree" and entity.actions:
        across = [_fill("{Does} the {name} move across the frame?", entity)] if any(
            entity.kind == "subject" and _is_direction(a) for a in entity.actions) else []
        return [_action_question(entity, a) for a in entity.actions] + across
    if dimension == "text_alignment" and entity.kind in ("subject", "scene"):
        main = f"Does the video show exactly {entity.name}?" if words[0] in NUMBERS or words[0].isdigit() else default
        return [main] + [_attribute_question(entity, a) for a in entity.attributes]
    if dimension == "temporal_consistency" and entity.kind == "subject":
        coloured = any(a in COLOURS for a in entity.attributes)
        return [_fill("{Does} the {name} keep the same colour throughout the video?", entity) if coloured
                else default]
    if dimension == "factual_consistency" and entity.kind == "subject":
        verbs = {base_form(a.split()[0]) if a.split()[0] in VERB_S else a.split()[0] for a in entity.actions}
        physics = verbs & PHYSICS_VERBS and words[-1] not in ANIMATE
        main = ("Does the motion of the {name} follow gravity and momentum?" if physics
                else "{Does} the {name} move smoothly, without jumping?" if entity.actions else template)
        body = "{Does} the {name} have a plausible body, with the right number of limbs?"
        extra = [body] if words[-1] in ANIMATE else []
        return [_fill(t, entity) for t in [main] + extra]
    return [default]


def _entity_questions(entity: Entity, dimension: str) -> list[tuple[str, bool]]:
    """(question, positive) pairs: the main positive, the negative, then any extra positives."""
    pos, neg = _PAIRS[entity.kind][DIMENSIONS.index(dimension)]
    neg = _fill(neg, entity)
    if dimension == "dynamic_degree" and entity.kind == "camera" and not all(map(_is_shot, entity.actions)):
        neg = "Does the camera stay fixed instead of moving?"
    elif dimension == "dynamic_degree" and entity.kind == "subject" and entity.actions:
        neg = _fill("{Does} the {name} stay still for the whole video?", entity)
    elif dimension == "temporal_consistency" and any(a in COLOURS for a in entity.attributes):
        neg = _fill("{Does} the {name} flicker or change colour?", entity)
    elif dimension == "factual_consistency" and entity.kind == "subject" and entity.actions:
        neg = _fill("{Does} the {name} suddenly jump to another position?", entity)
    main, *extra = _positives(entity, dimension, pos)
    return [(main, True), (neg, False)] + [(q, True) for q in extra]


def template_questions(prompt: str, max_per_dimension: int = 4) -> list[Question]:
    """A prompt's questions, capped per dimension: each leading entity's positive and negative come first."""
    entities, out = extract_entities(prompt), []
    for dimension in DIMENSIONS:
        ranked = sorted(entities, key=lambda e: _rank(e, dimension))
        per_entity = [(e, _entity_questions(e, dimension)) for e in ranked]
        for group in (per_entity[:2], per_entity[2:]):  # the two leading entities' extras before the rest
            ordered = [(e, q) for e, qs in group for q in qs[:2]] + [(e, q) for e, qs in group for q in qs[2:]]
            out += [Question(prompt, dimension, e.name, text, positive) for e, (text, positive) in ordered]
    return tidy(out, max_per_dimension)


class TemplateGenerator:
    """Offline question generator (a `QuestionGenerator`): entity extraction plus fixed templates.

    Every prompt gets all five dimensions; with `max_per_dimension` >= 2, each dimension keeps a
    positive and a negative question.
    """

    def __init__(self, *, max_per_dimension: int = 4):
        if isinstance(max_per_dimension, bool) or not isinstance(max_per_dimension, int) or max_per_dimension < 1:
            raise QuestionError(f"max_per_dimension must be a positive integer, got {max_per_dimension!r}")
        self.max_per_dimension = max_per_dimension

    def __repr__(self) -> str:
        return f"TemplateGenerator(max_per_dimension={self.max_per_dimension})"

    def generate_questions(self, prompts: Sequence[str]) -> dict[str, list[Question]]:
        """Questions per prompt; prompts that cannot be served raise one `GenerationError` at the end."""
        if isinstance(prompts, str):
            raise QuestionError("prompts must be a sequence of strings, got a single string; pass [prompt]")
        results, failures = {}, {}
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise QuestionError(f"prompts[{index}] must be a string, got {type(prompt).__name__}")
            try:
                results[prompt] = template_questions(prompt, self.max_per_dimension)
            except QuestionError as err:
                failures[prompt] = str(err)
        if failures:
            raise GenerationError(failures, results)
        return results
