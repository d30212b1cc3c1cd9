"""GRPO rollouts from one shared prefill (trainers/rollout.py): the same next-token logits as G separate
`generate` calls fed the same tokens, end tokens padded and masked, a seed reproducing the group."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from finger_reward.engine.inputs import placeholder_token_ids, processor_inputs
from finger_reward.prompts import split_prompt
from finger_reward.rope import with_rope_positions
from finger_reward.synthetic import write_video
from finger_reward.trainers.rollout import sample_group
from finger_reward.video import SlowFast, load_video
from tests.conftest import random_frames

G, MAX_NEW = 5, 12


@pytest.fixture(scope="module")
def model_and_processor(tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval(), AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    """2 s at 8 fps: one still picture for the first second, another for the second (SlowFast: slow, fast, slow, fast)."""
    frames = np.concatenate([random_frames(1, 8, 64, 96)[:1].repeat(8, 0), random_frames(2, 8, 64, 96)[:1].repeat(8, 0)])
    return write_video(frames, tmp_path_factory.mktemp("rollout") / "clip.mp4", fps=8)


def _prompt(processor, path, slowfast=None) -> dict:
    split = split_prompt(processor, "reason")
    clip = load_video(path, fps=2.0, max_frames=4, slowfast=slowfast)
    return dict(processor_inputs(processor, split.prefix + split.text_after_video("Does the square move left?"), clip))


def _ends(processor, fraction: float = 0.08, seed: int = 0) -> list[int]:
    """End tokens for a random model: <|im_end|> plus a random share of the vocabulary, so rows stop at varied steps."""
    tokenizer = processor.tokenizer
    placeholders = set(placeholder_token_ids(processor))
    vocab = [i for i in range(len(tokenizer)) if i not in placeholders]
    picked = np.random.default_rng(seed).choice(vocab, int(fraction * len(vocab)), replace=False).tolist()
    return sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"), *picked})


def _sample(model, processor, prompt, ends, seed=0, **kw):
    torch.manual_seed(seed)
    return sample_group(model, prompt, G, max_new_tokens=MAX_NEW, temperature=kw.pop("temperature", 1.0),
                        top_p=kw.pop("top_p", 1.0), eos_token_ids=ends, pad_token_id=processor.tokenizer.pad_token_id,
                        suppress_tokens=placeholder_token_ids(processor), **kw)


class _Force(LogitsProcessor):
    """Makes greedy `generate` take the given tokens in turn (its raw logits are reported before this runs)."""

    def __init__(self, tokens: list[int], prompt_length: int):
        self.tokens, self.prompt_length = tokens, prompt_length

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.tokens[input_ids.shape[1] - self.prompt_length]] = 0.0
        return forced


def _lengths(ids: torch.Tensor, ends: list[int]) -> list[int]:
    """Tokens each row wrote, its end token included."""
    is_end = torch.isin(ids, torch.tensor(ends))
    return [int(row.int().argmax()) + 1 if row.any() else ids.shape[1] for row in is_end]


def _check_against_generate(model, processor, prompt, ends):
    """Each row's logits at every step it wrote equal a separate `generate` of that row's tokens (same prompt, batch 1)."""
    P = prompt["input_ids"].shape[1]
    ids, logits = _sample(model, processor, prompt, ends, output_logits=True)
    assert ids.shape[0] == G and torch.equal(ids[:, :P], prompt["input_ids"].expand(G, -1))
    completions = ids[:, P:]
    lengths = _lengths(completions, ends)
    assert len(logits) == completions.shape[1] == max(lengths)
    for r, n in enumerate(lengths):
        tokens = completions[r, :n].tolist()
        out = model.generate(**with_rope_positions(model.config, prompt), do_sample=False, max_new_tokens=n,
                             logits_processor=LogitsProcessorList([_Force(tokens, P)]), eos_token_id=ends,
                             pad_token_id=processor.tokenizer.pad_token_id, output_logits=True, return_dict_in_generate=True)
        assert out.sequences[0, P:].tolist() == tokens
        theirs = torch.cat(out.logits)  # (n, vocab)
        ours = torch.stack([step[r] for step in logits[:n]])
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
        # After its end token a row is padding, and its logits are no longer computed.
        assert (completions[r, n:] == processor.tokenizer.pad_token_id).all()
        assert all(step[r].isnan().all() for step in logits[n:])
    return lengths


def test_shared_prefill_logits_equal_separate_generate_calls(model_and_processor, clip_path):
    model, processor = model_and_processor
    ends = _ends(processor)
    lengths = _check_against_generate(model, processor, _prompt(processor, clip_path), ends)
    # The check covers rows that stopped early while others went on (the cache then drops rows).
    assert min(lengths) < max(lengths), lengths


def test_slowfast_prompt_with_two_video_blocks(model_and_processor, clip_path):
    model, processor = model_and_processor
    prompt = _prompt(processor, clip_path, slowfast=SlowFast(threshold=0.5))
    assert prompt["video_grid_thw"].shape[0] == 2  # a slow and a fast pathway
    _check_against_generate(model, processor, prompt, _ends(processor))


def test_lora_model(tiny_model_dir, model_and_processor, clip_path):
    """A peft model (adapters initialised non-zero, so they change the logits) samples through its adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from finger_reward.trainers.grpo import LANGUAGE_MODEL_LINEARS

    _, processor = model_and_processor
    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=LANGUAGE_MODEL_LINEARS,
                                           init_lora_weights=False, task_type="CAUSAL_LM")).eval()
    prompt = _prompt(processor, clip_path)
    _check_against_generate(peft, processor, prompt, _ends(processor))
    with peft.disable_adapter():
        plain = _sample(peft, processor, prompt, _ends(processor), output_logits=True)[1][0]
    assert not torch.allclose(_sample(peft, processor, prompt, _ends(processor), output_logits=True)[1][0], plain, atol=1e-3)


def test_fixed_seed_reproduces_the_group(model_and_processor, clip_path):
    model, processor = model_and_processor
    prompt, ends = _prompt(processor, clip_path), _ends(processor)
    first = _sample(model, processor, prompt, ends, seed=3, temperature=0.7, top_p=0.9)
    again = _sample(model, processor, prompt, ends, seed=3, temperature=0.7, top_p=0.9)
    other = _sample(model, processor, prompt, ends, seed=4, temperature=0.7, top_p=0.9)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    P = prompt["input_ids"].shape[1]
    assert len({tuple(row) for row in first[:, P:].tolist()}) > 1  # G different samples, not one copied G times
    suppressed = torch.tensor(placeholder_token_ids(processor))
    assert not torch.isin(first[:, P:], suppressed).any()


def test_rollout_pads_and_masks_rows_that_end_early(tiny_model_dir, model_and_processor, tmp_path):
    """VideoGRPOTrainer.rollout samples through sample_group; rows after their end token are padding, masked out."""
    from finger_reward.synthetic import make_world
    from finger_reward.instruct import load_instruct
    from finger_reward.trainers.grpo import GRPORecipe, VideoGRPOTrainer

    world = make_world(tmp_path / "world", num_scenes=1)
    records = load_instruct(world.instruct_path, mode="reason")
    recipe = GRPORecipe(model=str(tiny_model_dir), data=str(world.instruct_path), output_dir=str(tmp_path / "out"),
                        num_generations=G, max_completion_length=MAX_NEW, max_steps=1, max_frames=4, beta=0.0, seed=0)
    model, processor = model_and_processor
    trainer = VideoGRPOTrainer(recipe, model=model, processor=processor, records=records)
    trainer.eos_ids = _ends(processor, fraction=0.15)
    prompt = trainer.prompt_inputs(records[0])
    encoded = []  # patches per run of the vision tower: the video is encoded once for sampling, not G times
    hook = model.model.visual.register_forward_pre_hook(lambda module, args: encoded.append(args[0].shape[0]))
    torch.manual_seed(7)
    try:
        batch = trainer.rollout(records[0])
    finally:
        hook.remove()
    patches = prompt["pixel_values_videos"].shape[0]
    assert encoded == [patches, patches]  # sampling, then the old-policy log-probabilities (trainers/shared_video.py)
    P = batch["prompt_length"]
    assert P == prompt["input_ids"].shape[1]
    completions, mask = batch["input_ids"][:, P:], batch["completion_mask"]
    lengths = _lengths(completions, trainer.eos_ids)
    assert min(lengths) < completions.shape[1], lengths  # at least one row ended early
    for r, n in enumerate(lengths):
        assert mask[r].tolist() == [1] * n + [0] * (completions.shape[1] - n)
        assert (completions[r, n:] == trainer.pad_id).all()
    assert torch.equal(batch["attention_mask"][:, P:], mask)
    assert batch["old_per_token_logps"].shape == mask.shape
    # The rollout is sample_group's group: the same seed gives the same ids.
    torch.manual_seed(7)
    direct = sample_group(model, prompt, G, max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0,
                          eos_token_ids=trainer.eos_ids, pad_token_id=trainer.pad_id,
                          suppress_tokens=placeholder_token_ids(processor))
    assert torch.equal(batch["input_ids"], direct)


def test_bad_input_is_refused(model_and_processor, clip_path):
    model, processor = model_and_processor
    prompt = _prompt(processor, clip_path)
    twice = {k: (v.repeat(2, *([1] * (v.dim() - 1))) if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
             for k, v in prompt.items()}
    with pytest.raises(ValueError, match="batch 1"):
        sample_group(model, twice, G, max_new_tokens=2, eos_token_ids=[0], pad_token_id=0)
    with pytest.raises(ValueError, match="temperature"):
        sample_group(model, prompt, G, max_new_tokens=2, temperature=0.0, eos_token_ids=[0], pad_token_id=0)
    with pytest.raises(ValueError, match="top_p"):
        sample_group(model, prompt, G, max_new_tokens=2, top_p=0.0, eos_token_ids=[0], pad_token_id=0)
    with pytest.raises(ValueError, match="pad_token_id"):
        sample_group(model, prompt, G, max_new_tokens=2, eos_token_ids=[0], pad_token_id=None)
