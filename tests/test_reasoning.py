"""Reason decoding's token logic (engine.reasoning) on token lists from the tiny tokenizer."""

import pytest
import torch
from transformers import GenerationConfig

from finger_reward.engine.reasoning import (
    ReasonTokens,
    closing_tags,
    decode_reasons,
    ends_with_stop_tag,
    pick,
    stop_token_ids,
)
from finger_reward.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tokens(tokenizer):
    video_pad = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    return ReasonTokens(tokenizer, {tokenizer.eos_token_id}, [video_pad])


def ids(tokenizer, *texts: str) -> list[int]:
    """Each text encoded on its own and concatenated: a tag can arrive split at any point."""
    return [i for text in texts for i in tokenizer.encode(text, add_special_tokens=False)]


@pytest.mark.parametrize(
    "text, stop, closing",
    [
        ("the circle moves</reason>", True, "<answer>"),
        ("the circle moves</reason><answer>", True, ""),
        ("the circle moves <answer>", True, ""),
        ("the circle moves", False, "</reason><answer>"),
        ("the circle</reason> moves", False, "</reason><answer>"),  # a tag earlier on is not the end
        ("the circle moves</reason", False, "</reason><answer>"),
        ("red>", False, "</reason><answer>"),
    ],
)
def test_stop_tags_and_closing_tags(text, stop, closing):
    assert ends_with_stop_tag(text) is stop
    assert closing_tags(text) == closing


@pytest.mark.parametrize(
    "pieces, stop",
    [
        (("the circle", "</reason>"), True),
        (("the circle</re", "ason>"), True),  # the tag split where the tokenizer would not split it
        (("red", " <", "answer", ">"), True),
        (("the circle</reason>", " moves"), False),
        (("the circle</reason",), False),
        (("the circle", ">"), False),
    ],
)
def test_stopped_reads_the_decoded_tail(tokens, tokenizer, pieces, stop):
    assert tokens.stopped(ids(tokenizer, *pieces)) is stop


def test_stopped_at_end_of_turn(tokens, tokenizer):
    generated = ids(tokenizer, "the circle") + [tokenizer.eos_token_id]
    assert tokens.stopped(generated)
    assert not tokens.stopped(generated[:-1])


@pytest.mark.parametrize(
    "text, fed",
    [
        ("the circle moves", "the circle moves</reason><answer>"),
        ("the circle moves</reason>", "the circle moves</reason><answer>"),
        ("the circle moves</reason><answer>", "the circle moves</reason><answer>"),
        ("the circle</rea", "the circle</rea</reason><answer>"),  # a half-written tag is closed anew
    ],
)
def test_closing_makes_the_answer_next(tokens, tokenizer, text, fed):
    # The engine has fed the reason up to its last token; it keeps `keep` of those and feeds `closing`.
    generated = ids(tokenizer, text)
    keep, closing = tokens.closing(generated)
    assert tokenizer.decode(generated[:keep] + closing) == fed
    # The text is tokenized as one, as a server re-reading it does.
    assert generated[:keep] + closing == tokenizer.encode(fed, add_special_tokens=False)
    if text.endswith("<answer>"):  # the model closed it itself: its own tokens stand
        assert (keep, closing) == (len(generated) - 1, generated[-1:])


@pytest.mark.parametrize("text", ["the circle moves", "the circle moves</reason>"])
def test_closing_drops_an_end_of_turn_and_never_repeats_a_tag(tokens, tokenizer, text):
    generated = ids(tokenizer, text) + [tokenizer.eos_token_id]
    keep, closing = tokens.closing(generated)
    assert tokenizer.eos_token_id not in closing
    assert tokenizer.decode(generated[:keep] + closing) == "the circle moves</reason><answer>"


def test_closing_tokenizes_across_the_seam_as_the_model_writes(tokens, tokenizer):
    """">" then "<answer>" is tokenized with the tag's "<" joined to the ">" where the tokenizer joins them
    (the tiny tokenizer has "><"): the engine takes back the fed ">" and feeds the joined tokens."""
    generated = ids(tokenizer, "the circle moves</reason>") + [tokenizer.eos_token_id]
    whole = tokenizer.encode("the circle moves</reason><answer>", add_special_tokens=False)
    keep, closing = tokens.closing(generated)
    assert generated[:keep] + closing == whole
    if "><" in tokenizer.convert_ids_to_tokens(whole):
        assert keep < len(generated) - 1  # a fed token was replaced


def test_reason_text_drops_tags_and_special_tokens(tokens, tokenizer):
    generated = ids(tokenizer, "<reason>the circle moves</reason><answer>") + [tokenizer.eos_token_id]
    assert tokens.reason(generated) == "the circle moves"


def test_stop_token_ids_from_config_and_tokenizer(tokenizer):
    eos = tokenizer.eos_token_id
    assert stop_token_ids(GenerationConfig(), tokenizer) == {eos}
    assert stop_token_ids(GenerationConfig(eos_token_id=7), tokenizer) == {7, eos}
    assert stop_token_ids(GenerationConfig(eos_token_id=[7, 9]), tokenizer) == {7, 9, eos}
    assert stop_token_ids(object(), tokenizer) == {eos}


def test_built_from_the_model_suppresses_vision_placeholders(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    built = ReasonTokens.from_model(model, processor)
    assert set(built.suppressed) == {processor.image_token_id, processor.video_token_id}
    assert processor.tokenizer.convert_tokens_to_ids("<|im_end|>") in built.eos_ids


def test_pick_never_chooses_a_suppressed_token():
    logits = torch.zeros(2000, 6)
    logits[:, 4] = 50.0  # by far the likeliest, but suppressed
    logits[:, 2] = 1.0
    assert pick(logits, [4], 0.0).tolist() == [2] * 2000
    torch.manual_seed(0)
    sampled = pick(logits, [4, 5], 1.0)
    assert 4 not in sampled and 5 not in sampled
    counts = torch.bincount(sampled, minlength=6).float() / len(sampled)
    # Softmax over the four allowed tokens: e / (e + 3) for token 2, 1 / (e + 3) for the others.
    e = torch.e
    torch.testing.assert_close(counts[:4], torch.tensor([1, 1, e, 1]) / (e + 3), atol=0.04, rtol=0)


class ScriptedModel:
    """A next-token table: question r always continues with scripts[r][k] after k generated tokens.

    Records every piece fed, to check what the decoding loop feeds and leaves out.
    """

    def __init__(self, questions, scripts, vocab):
        self.rows = {(v, q): (r, length) for r, (v, q, length) in enumerate(questions)}
        self.scripts, self.vocab, self.fed = scripts, vocab, []

    def first_logits(self):
        return self.logits([script[0] for script in self.scripts])

    def logits(self, next_ids):
        return torch.nn.functional.one_hot(torch.tensor(next_ids), self.vocab).float()

    def __call__(self, pieces):
        self.fed.append(pieces)
        next_ids = []
        for v, row in enumerate(pieces):
            for q, piece_ids, first in row:
                r, length = self.rows[(v, q)]
                done = first - length + len(piece_ids)  # tokens of this question fed so far
                next_ids.append(self.scripts[r][min(done, len(self.scripts[r]) - 1)])
        return self.logits(next_ids)


def test_decode_reasons_stops_each_question_on_its_own(tokens, tokenizer):
    eos = tokenizer.eos_token_id
    # (video row, question index, suffix length): two questions on video 0, one on video 1.
    questions = [(0, 0, 5), (0, 1, 3), (1, 0, 4)]
    scripts = [
        ids(tokenizer, "red", "</reason>", "blue blue blue blue blue blue blue blue"),
        ids(tokenizer, "the circle") + [eos] + ids(tokenizer, "moves moves moves moves moves moves"),
        ids(tokenizer, "moves moves moves moves moves moves moves moves moves"),
    ]
    model = ScriptedModel(questions, scripts, len(tokenizer))
    generated, last = decode_reasons(tokens, questions, model.first_logits(), model,
                                     videos=2, max_new_tokens=8, temperature=0.0)
    stops = [len(ids(tokenizer, "red", "</reason>")), len(ids(tokenizer, "the circle")) + 1, 8]
    assert generated == [script[:n] for script, n in zip(scripts, stops)]
    # A stopped question is fed nothing more; the others go on, each at its next position.
    for step, pieces in enumerate(model.fed[:-1]):
        fed = {(v, q): (piece_ids, first) for v, row in enumerate(pieces) for q, piece_ids, first in row}
        expected = {(v, q): ([scripts[r][step]], length + step)
                    for r, (v, q, length) in enumerate(questions) if step + 1 < stops[r]}
        assert fed == expected
    assert len(model.fed) == 8  # 7 steps after the first token, then the closing step
    # The last step feeds every question's closing ids where its reason ended; its logits are returned.
    closing = [piece for row in model.fed[-1] for piece in row]
    expected = [tokens.closing(g) for g in generated]
    assert [(q, first) for q, _, first in closing] == [(q, length + keep) for (_, q, length), (keep, _) in
                                                        zip(questions, expected)]
    assert [piece_ids for _, piece_ids, _ in closing] == [piece for _, piece in expected]
    assert last.shape == (3, len(tokenizer))
