"""Entities of a prompt without an NLP library: subjects, quoted text, the camera, the scene.

Small word lists and a verb heuristic split a prompt into noun phrases with their attributes and
actions (FingER Sec. 3.1's entity extraction, offline). The template generator builds on it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from finger_reward.errors import QuestionError


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


NUMBERS = _words("two three four five six seven eight nine ten eleven twelve twenty dozens hundreds")
DETERMINERS = NUMBERS | _words("a an the this these those some any each every several many few both all no "
                               "one another his her its their my your our numerous various multiple")
PLURAL_DETERMINERS = NUMBERS | _words("these those several many few both numerous various multiple")
PREPOSITIONS = _words("in on at across along through over under into onto inside near beside above below behind "
                      "around past toward towards underneath beneath within among amid outside between by from of "
                      "with without for to like against during before after up down off out via upon about")
SCENE_PREPOSITIONS = _words("in on at across along through over under into onto inside near beside above below "
                            "behind around underneath beneath within among amid outside upon")
CONJUNCTIONS = _words("and or but while as then when whereas until so because where who which that whose nor yet")
COORDINATORS = _words("and or but then")
RELATIVES = _words("who which that whose")
PRONOUNS = _words("it he she they them him we you i me us itself himself herself themselves this there here "
                  "someone something everything everyone")
AUX = _words("is are was were be being been has have had does do did can will seems")
ADVERBS = _words("very also just again still too almost nearly even fast")
PARTICLES = _words("up down in out off on over away back around along through left right forward forwards "
                   "backward backwards together apart upward upwards downward downwards past across by aside about "
                   "sideways")
TEXT_CUES = _words("reading reads saying says showing shows displaying displays labeled labelled written spelling "
                   "spells titled")
TEXT_NOUNS = _words("word words text caption letters title")
TIME_WORDS = _words("dusk dawn night sunset sunrise noon midnight day daytime evening morning afternoon twilight")
PLACE_WORDS = _words("side left right top bottom front back distance background foreground middle center centre "
                     "corner edge air")
WEARABLES = _words("coat jacket dress shirt t-shirt hat suit uniform sweater hoodie scarf costume gown robe helmet "
                   "glasses sunglasses boots shoes jeans skirt cap mask armor armour kimono apron tuxedo raincoat "
                   "vest gloves")
IRREGULAR_PLURALS = _words("people children men women mice geese teeth feet police cattle")
ING_NOUNS = _words("building painting ceiling morning evening clothing thing string spring wedding pudding "
                   "earring sibling lightning swing king ring wing")
ADJECTIVES = _words(
    "red orange yellow green blue purple pink brown black white gray grey golden silver beige violet "
    "young old little small big large huge tiny tall short long wide narrow giant elderly ancient modern "
    "wooden metal glass plastic stone leather woolen marble paper "
    "snowy rainy sunny cloudy foggy misty stormy windy dusty muddy sandy rocky grassy icy frozen wet dry "
    "fluffy furry shiny glossy fuzzy hairy curly wavy spiky leafy smooth rough soft hard bright dark "
    "hot cold warm cool fresh ripe broken empty full busy quiet crowded calm happy sad angry cute "
    "beautiful colorful colourful striped spotted round square")
COLOURS = _words("red orange yellow green blue purple pink brown black white gray grey golden silver beige violet")
ANIMATE = _words("man woman person people girl boy child children kid kids baby men women chef dancer player "
                 "dog puppy cat kitten horse horses bird birds retriever cow sheep fox wolf bear lion tiger deer "
                 "rabbit monkey elephant duck chicken owl eagle pigeon pigeons fish dolphin whale robot")
VERB_BASES = _words(
    "walk run fly jump dance move spin fall pour spill ride swim drive gallop roll bounce drop splash flow melt "
    "burn explode crash collide break shatter climb crawl dive float glide hop kick throw catch wave swing sway "
    "shake turn rotate rise sink slide skate ski surf sail chase play eat drink cook cut write paint read sing "
    "laugh smile cry talk hug kiss sit stand sleep fight push pull lift carry open close blink twinkle flicker "
    "glow shine sparkle blow drift flutter flap grow bloom wag bark pan zoom tilt orbit track follow circle "
    "hover land leap march race stir chop knock tip tumble wobble erupt pounce stretch wash type tap hit spread "
    "leak drip boil fold sell build scatter sweep soar rush dash stroll jog wander enter leave approach hold")
CAMERA_MOTIONS = _words("pan zoom tilt dolly orbit track truck")
IRREGULAR_PAST = _words("fell ran flew rode swam drove threw broke rose sank spun sat stood ate drank blew grew "
                        "caught went came")
PHYSICS_VERBS = _words("pour spill fall drop splash flow melt bounce roll collide crash break shatter tip tumble "
                       "sink float drip leak boil explode erupt")
SHOT_WORDS = _words("shot close-up closeup timelapse time-lapse pov dolly zoom")
SHOT_HEADS_WITH_MODIFIER = _words("view angle pan")
SHOT_MODIFIERS = _words("aerial overhead top-down bird's birds-eye bird's-eye drone wide low high side "
                        "first-person panoramic slow fast tracking camera")
# Adjectives that are also nouns: "a blue square spins" names a square.
NOUN_ADJECTIVES = _words("square orange gold silver")
# Names whose first word only looks like an attribute: a golden retriever need not look golden.
COMPOUND_NOUNS = frozenset((
    "golden retriever", "golden retrievers", "polar bear", "polar bears", "red panda", "red pandas",
    "brown bear", "black bear", "blue whale", "great white shark", "hot dog", "hot dogs", "hot air balloon",
    "hot air balloons", "red carpet", "green tea", "black hole", "white house", "milky way", "grizzly bear",
))
# Words of a direction given whole: "from left to right", "back and forth", "from one side to the other".
DIRECTION_WORDS = _words("left right top bottom up down side front back one other north south east west "
                         "center centre middle forth fro inside outside")
MAX_NAME_WORDS = 4

_QUOTE = re.compile(r'"([^"]*)"|“([^”]*)”|‘([^’]*)’|(?<!\w)\'([^\']*)\'(?!\w)')
_TOKEN = re.compile(r"\x00\d+\x00|[^\W_]+(?:['’-][^\W_]+)*|[.,;:!?()\[\]]")
_CLOSE_UP = re.compile(r"\bclose[\s-]?ups?\b", re.IGNORECASE)


@dataclass(frozen=True)
class Entity:
    """One thing a viewer would check: a subject, quoted text, the camera or the scene."""

    name: str
    kind: str  # "subject", "text", "camera" or "scene"
    attributes: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()


# ---- tokens ---------------------------------------------------------------------------------------


def _tokenise(prompt: str) -> tuple[list[str], list[str]]:
    """Lower-case word and punctuation tokens; each quoted span becomes a placeholder token."""
    quotes: list[str] = []

    def hold(match: re.Match) -> str:
        quotes.append(next(g for g in match.groups() if g is not None).strip())
        return f" \x00{len(quotes) - 1}\x00 "

    text = _CLOSE_UP.sub("close-up", _QUOTE.sub(hold, prompt))
    return _TOKEN.findall(text.lower()), quotes


def _at(tokens: list[str], i: int) -> str | None:
    return tokens[i] if 0 <= i < len(tokens) else None


def _is_quote(tok: str | None) -> bool:
    return tok is not None and tok.startswith("\x00")


def _is_word(tok: str | None) -> bool:
    return tok is not None and not _is_quote(tok) and tok[0].isalnum()


LY_WORDS = _words("family belly jelly holly bully italy assembly lonely lovely friendly ugly silly holy lively "
                  "chilly curly woolly wooly hilly oily bubbly sparkly wrinkly prickly")


def _is_adverb(tok: str | None) -> bool:
    return tok in ADVERBS or (_is_word(tok) and tok.endswith("ly") and len(tok) > 4 and not tok.endswith("fly")
                              and tok not in LY_WORDS and tok not in ADJECTIVES)


_STOP = DETERMINERS | PREPOSITIONS | CONJUNCTIONS | PRONOUNS | AUX


def _is_content(tok: str | None) -> bool:
    """A word that can belong to a noun phrase."""
    return _is_word(tok) and tok not in _STOP and not _is_adverb(tok)


def _is_adjective(word: str) -> bool:
    return word in ADJECTIVES or (word.endswith(("ful", "ous", "less", "ish")) and not word.endswith("fish"))


def _third_person(base: str) -> str:
    if base.endswith("y") and base[-2:-1] not in tuple("aeiou"):
        return base[:-1] + "ies"
    return base + ("es" if base.endswith(("s", "sh", "ch", "x", "z", "o")) else "s")


VERB_S = frozenset(_third_person(b) for b in VERB_BASES | CAMERA_MOTIONS)
CAMERA_MOTION_FORMS = CAMERA_MOTIONS | frozenset(_third_person(m) for m in CAMERA_MOTIONS)
VERB_PAST = IRREGULAR_PAST | frozenset(b + ("d" if b.endswith("e") else "ed") for b in VERB_BASES)


def looks_third_person(word: str) -> bool:
    return len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is", "'s", "’s"))


def base_form(verb: str) -> str:
    """`walks` -> `walk`, `flies` -> `fly`, `watches` -> `watch` (good enough for common verbs)."""
    if verb == "has":
        return "have"
    if verb.endswith("ies") and len(verb) > 4:
        return verb[:-3] + "y"
    if verb.endswith(("ches", "shes", "sses", "xes", "zzes", "oes")):
        return verb[:-2]
    return verb[:-1]


def is_plural(words: Sequence[str]) -> bool:
    if not words:
        return False
    head = words[-1]
    return words[0] in PLURAL_DETERMINERS or head in IRREGULAR_PLURALS or looks_third_person(head)


# ---- entity extraction ----------------------------------------------------------------------------


class _Found:
    """Entities while one prompt is scanned: duplicates merge, prompt order is kept."""

    def __init__(self):
        self.items: dict[str, dict] = {}

    def add(self, name: str, kind: str, attributes: Sequence[str] = ()) -> str:
        key = name.lower()
        item = self.items.setdefault(key, {"name": name, "kind": kind, "attributes": [], "actions": []})
        item["attributes"] += [a for a in attributes if a not in item["attributes"]]
        return key

    def act(self, key: str, action: str) -> None:
        if action and action not in self.items[key]["actions"]:
            self.items[key]["actions"].append(action)

    def plural(self, key: str | None) -> bool:
        return key is not None and self.items[key]["kind"] in ("subject", "scene") and is_plural(key.split())

    def last_subject(self) -> str | None:
        return next((k for k in reversed(self.items) if self.items[k]["kind"] == "subject"), None)

    def entities(self) -> list[Entity]:
        return [Entity(i["name"], i["kind"], tuple(i["attributes"]), tuple(i["actions"])) for i in self.items.values()]


def _is_camera(words: list[str]) -> bool:
    head = words[-1]
    return ("camera" in words or "cameras" in words or head in SHOT_WORDS
            or (head in SHOT_HEADS_WITH_MODIFIER and any(w in SHOT_MODIFIERS for w in words)))


def _add_phrase(found: _Found, words: list[str], intro: str | None) -> str | None:
    """Record a noun phrase as an entity; returns its key, or None for nothing worth asking about."""
    if not words or all(w in NUMBERS or w.isdigit() for w in words):
        return None
    words = words[-MAX_NAME_WORDS:]
    if _is_camera(words):
        key = found.add("camera", "camera")
        if words[-1] not in ("camera", "cameras"):
            found.act(key, " ".join(words))
        return key
    if intro in PREPOSITIONS and words[-1] in TIME_WORDS | PLACE_WORDS:
        return None
    scene = intro in SCENE_PREPOSITIONS and words[-1] not in WEARABLES
    fixed = next((k for k in range(len(words)) if " ".join(words[k:]) in COMPOUND_NOUNS), len(words) - 1)
    return found.add(" ".join(words), "scene" if scene else "subject", [w for w in words[:fixed] if _is_adjective(w)])


def _is_verb(tokens: list[str], i: int, in_phrase: bool, ready: int, plural: bool) -> bool:
    """Whether token i is a verb: a known video verb in agreement, an -ing form, or an -s/-ed word after a noun."""
    tok, prev, nxt = tokens[i], _at(tokens, i - 1), _at(tokens, i + 1)
    if not _is_content(tok):
        return False
    if tok in TEXT_CUES and _is_quote(nxt):
        return True
    if tok.endswith("ing") and len(tok) > 5 and tok not in ING_NOUNS:
        return not ((prev in DETERMINERS or _is_adjective(prev or "")) and _is_content(nxt))
    if tok in CAMERA_MOTIONS and (prev is None or not _is_word(prev) or prev in CONJUNCTIONS):
        return True  # an imperative camera instruction: "Pan across the city"
    if not (in_phrase or ready):
        return False
    if tok in VERB_S:
        return not plural and nxt not in VERB_BASES
    if tok in VERB_BASES:
        return plural or (in_phrase and nxt in DETERMINERS)
    if tok in VERB_PAST:
        return True
    if not (in_phrase or ready > 1):
        return False
    ends_clause = nxt is None or not _is_content(nxt) or nxt in PARTICLES
    if nxt in DETERMINERS and not _is_adjective(tok):
        return True
    if looks_third_person(tok):
        return not plural and ends_clause
    return tok.endswith("ed") and len(tok) > 4 and ends_clause


def _starts_phrase(tok: str | None) -> bool:
    return tok in DETERMINERS or _is_content(tok) or _is_quote(tok)


def _particles_end(tokens: list[str], j: int) -> int:
    """Index after the particles and adverbs that follow a verb ("zooms in", "pans left", "runs quickly")."""
    for _ in range(3):
        tok = _at(tokens, j)
        if not (tok in PARTICLES or _is_adverb(tok)) or (tok in PREPOSITIONS and _starts_phrase(_at(tokens, j + 1))):
            break
        j += 1
    return j


def _verbish(tok: str) -> bool:
    return tok in VERB_S or tok in VERB_PAST or (tok.endswith("ing") and tok not in ING_NOUNS)


def _direction_end(tokens: list[str], j: int) -> int:
    """Index after a whole direction starting at j ("from left to right", "back and forth"), else j."""
    k = j + 1 if _at(tokens, j) == "from" else j
    sides = []
    for joiner in ("to", "and", None):
        first = k
        while _at(tokens, k) in DIRECTION_WORDS or (_at(tokens, k) == "the" and _at(tokens, k + 1) in DIRECTION_WORDS):
            k += 1
        sides.append(k > first)
        if joiner is None or _at(tokens, k) not in ("to", "and"):
            break
        k += 1
    return k if len(sides) == 2 and all(sides) else j


def _action_phrase(tokens: list[str], start: int, end: int) -> str:
    """The verb with its particles plus one short complement: a whole direction, a pronoun, or [preposition]
    noun phrase."""
    direction = _direction_end(tokens, start + 1)
    if direction > start + 1:
        return " ".join(tokens[start:direction])
    words, j = tokens[start:end], end
    if _at(tokens, j) in PRONOUNS:
        return " ".join(words + [tokens[j]])
    prep = [tokens[j]] if _at(tokens, j) in PREPOSITIONS else []
    j += len(prep)
    phrase = [tokens[j]] if _at(tokens, j) in DETERMINERS else []
    while _is_content(_at(tokens, j + len(phrase))) and not _verbish(tokens[j + len(phrase)]) and len(phrase) < 4:
        phrase.append(tokens[j + len(phrase)])
    content, after = [w for w in phrase if w not in DETERMINERS], _at(tokens, j + len(phrase))
    if prep and content and content[-1] in PLACE_WORDS and after == "of":  # "in front of a school"
        rest = _action_phrase(["of"] + tokens[j + len(phrase) + 1:], 0, 0).split()
        if len(rest) > 1:
            return " ".join(words + prep + phrase + rest)
    if content and len(content) <= 3 and not (_is_content(after) and not _verbish(after)):
        words += prep + phrase
    return " ".join(words)


def _scan(tokens: list[str], quotes: list[str]) -> _Found:
    """One left-to-right pass: noun phrases become entities, verbs become actions of the clause's subject."""
    found, phrase, intro, agent, ready, partner = _Found(), [], None, None, 0, None
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if intro is None and phrase:
            plural = partner is not None or is_plural(phrase)
        else:
            plural = found.plural(agent) if agent else is_plural(phrase)
        nounish = bool(phrase) and (phrase[-1] in NOUN_ADJECTIVES or not (
            _is_adjective(phrase[-1]) or phrase[-1] in NUMBERS or phrase[-1].isdigit()))
        if _is_verb(tokens, i, nounish, ready, plural):
            last = _add_phrase(found, phrase, intro)
            agent = last if last and intro is None and found.items[last]["kind"] != "scene" else agent
            end = max(_particles_end(tokens, i + 1), _direction_end(tokens, i + 1))
            owner = agent or (last if tok.endswith("ing") else None)
            if owner is None and tok in CAMERA_MOTION_FORMS:
                owner = found.add("camera", "camera")
            if owner and not (tok in TEXT_CUES and _is_quote(_at(tokens, end))):
                for key in dict.fromkeys(k for k in (partner, owner) if k):
                    found.act(key, _action_phrase(tokens, i, end))
            phrase, intro, ready, partner, i = [], "object", 0, None, end
            continue
        if _is_content(tok):
            phrase.append(tok)
        elif tok in DETERMINERS:
            agent = _close(found, phrase, intro, agent)
            phrase = [tok] if tok in NUMBERS else []
        else:
            agent, intro, ready, partner = _close_at(found, tokens, i, phrase, intro, agent, quotes)
            phrase = []
        i += 1
    _close(found, phrase, intro, agent)
    return found


def _close(found: _Found, phrase: list[str], intro: str | None, agent: str | None) -> str | None:
    """Record the open noun phrase; returns the clause's agent (the new entity when it is the subject)."""
    key = _add_phrase(found, phrase, intro)
    is_subject = (key and intro is None and found.items[key]["kind"] == "subject") or (
        key == "camera" and "camera" in phrase)
    return key if is_subject else agent


def _close_at(found: _Found, tokens: list[str], i: int, phrase: list[str], intro, agent, quotes):
    """Handle a token that ends a noun phrase; returns the new (agent, intro, ready, partner).

    `partner` is the first of two subjects joined by "and" ("a cat and a dog play"), which share the verb.
    """
    tok, nxt = tokens[i], _at(tokens, i + 1)
    if _is_quote(tok):
        if not (phrase and phrase[-1] in TEXT_NOUNS):
            agent = _close(found, phrase, intro, agent)
        text = quotes[int(tok.strip("\x00"))]
        key = found.add(f'text "{text}"', "text") if text else None
        return agent or key, intro, 2, None
    had_phrase = bool(phrase)
    new_agent = _close(found, phrase, intro, agent)
    if tok in PREPOSITIONS:
        return new_agent, tok, 0, None
    if tok in CONJUNCTIONS:
        paired = tok == "and" and had_phrase and new_agent is not None and new_agent != agent and _starts_phrase(nxt)
        ready = 2 if tok in RELATIVES else (1 if tok in COORDINATORS and new_agent else 0)
        return new_agent, None, ready, new_agent if paired else None
    if tok in PRONOUNS:
        subject = found.last_subject() if tok in ("it", "they") else None
        return subject or new_agent, intro, 2, None
    if tok in AUX or _is_adverb(tok):
        return new_agent, intro, 2 if (had_phrase or new_agent or tok in AUX) else 0, None
    return new_agent, None, 0, None  # punctuation starts a new clause


def extract_entities(prompt: str) -> list[Entity]:
    """The prompt's entities in prompt order, without duplicates; never empty for a non-empty prompt."""
    if not isinstance(prompt, str):
        raise QuestionError(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise QuestionError(f"prompt {prompt!r} is empty or only whitespace; give a text prompt describing the video")
    tokens, quotes = _tokenise(prompt)
    entities = _scan(tokens, quotes).entities()
    if entities:
        return entities
    words = [t for t in tokens if _is_word(t)]
    content = [t for t in words if _is_content(t)] or words
    return [Entity(" ".join(content[:MAX_NAME_WORDS]) or prompt.strip(), "subject")]
