"""VQ-Insight's shuffled pass in the evaluator's GRPO rollout (temporal modelling reward, Sec. 3.2, Eq. 4).

With `GRPORecipe.temporal_shuffle`, each rollout also asks the question about the same clip with
its frames shuffled (seeded, before the processor; `finger_reward.temporal.shuffle_clip`) and
samples G more answers o^rand from the policy. For the i-th response of each set it reads w, the
probability of the correct answer after that response's reason (`temporal.answer_stem`, Eq. 1):
w_seq on the ordered clip after o_i^seq, w_rand on the shuffled clip after o_i^rand. They reach
the reward functions as the keyword columns `w_seq` / `w_rand` (`rewards.temporal_reward`). The
shuffled answers are not trained on: the paper uses them only to compute w_rand.
"""

from __future__ import annotations

import torch

from finger_reward.engine.inputs import placeholder_token_ids, processor_inputs
from finger_reward.instruct import InstructRecord, rating_token_ids
from finger_reward.rope import with_rope_positions
from finger_reward.scoring import answer_token_ids
from finger_reward.temporal import answer_stem, correct_answer_probability, shuffle_clip
from finger_reward.trainers.shared_video import VIDEO_KEYS, forward_logits, videos_of_rows


def shuffle_seed(seed: int, step: int, record: InstructRecord) -> str:
    """The frame order's seed: the run's seed, the step and the question, so a rerun shuffles alike."""
    return f"{seed}:{step}:{record.source or record.video}:{record.question}"


@torch.no_grad()
def temporal_pass(trainer, record: InstructRecord, batch: dict, texts: list[str]) -> tuple[dict, dict, dict]:
    """(reward columns `w_seq`/`w_rand`, per-completion log columns, metrics) of one rollout group.

    `batch` is the ordered rollout (its first `prompt_length` tokens and first row's video are the
    ordered prompt), `texts` its G completions."""
    from finger_reward.trainers.rollout import sample_group

    if not isinstance(record, InstructRecord):
        raise ValueError(f"temporal_shuffle asks single-video questions; {type(record).__name__} rows have no temporal "
                         "pass (VQ-Insight does not shuffle preference pairs, whose labels it would confuse)")
    model, G = trainer.model, len(texts)
    was_training = model.training
    model.eval()
    try:
        ordered = _first_prompt(batch)
        w_seq = answer_probabilities(trainer, ordered, [answer_stem(t) for t in texts], record.answer)
        order_seed = shuffle_seed(trainer.recipe.seed, trainer.global_step, record)
        clip = shuffle_clip(trainer.collator.load_clip(record), order_seed)
        shuffled = processor_inputs(trainer.processor, trainer.collator.prompt_text(record), clip)
        shuffled = {k: v.to(trainer.device) if isinstance(v, torch.Tensor) else v for k, v in shuffled.items()}
        with trainer._autocast():
            out = sample_group(model, shuffled, G, temperature=trainer.args.temperature, top_p=trainer.args.top_p,
                               max_new_tokens=trainer.args.max_completion_length, eos_token_ids=trainer.eos_ids,
                               pad_token_id=trainer.pad_id, suppress_tokens=placeholder_token_ids(trainer.processor))
        rand_texts = _decode(trainer, out[:, shuffled["input_ids"].shape[1]:])
        w_rand = answer_probabilities(trainer, shuffled, [answer_stem(t) for t in rand_texts], record.answer)
    finally:
        model.train(was_training)
    columns = {"w_seq": w_seq, "w_rand": w_rand}
    log = {**columns, "shuffled_completion": rand_texts, "shuffle_seed": [order_seed] * G}
    metrics = {"temporal/w_seq_mean": sum(w_seq) / G, "temporal/w_rand_mean": sum(w_rand) / G}
    return columns, log, metrics


def _first_prompt(batch: dict) -> dict:
    """The prompt of a rollout batch as one row: its ids, masks and the first row's video blocks."""
    P = batch["prompt_length"]
    prompt = {k: batch[k][:1, :P] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in batch}
    return {**prompt, **videos_of_rows(batch, slice(0, 1), batch["input_ids"].shape[0])}


def _decode(trainer, completion_ids: torch.Tensor) -> list[str]:
    """Completion texts as the rollout decodes them: up to the first end token, special tokens dropped."""
    texts = []
    for row in completion_ids.tolist():
        end = next((i for i, t in enumerate(row) if t in trainer.eos_ids), len(row))
        texts.append(trainer.tokenizer.decode(row[:end], skip_special_tokens=True))
    return texts


def answer_probabilities(trainer, prompt: dict, stems: list[str], answer: str) -> list[float]:
    """P(answer) after each stem (prompt + stem, next token), in rows of at most `forward_batch_size`."""
    tokenizer = trainer.tokenizer
    yes_ids, no_ids = answer_token_ids(tokenizer)
    levels = rating_token_ids(tokenizer) if answer not in ("Yes", "No") else None
    encoded = [tokenizer.encode(s, add_special_tokens=False) for s in stems]
    size = trainer.recipe.forward_batch_size or len(stems)
    probs = []
    for start in range(0, len(stems), size):
        logits = _last_logits(trainer, prompt, encoded[start: start + size])
        probs += correct_answer_probability(logits, answer, yes_ids, no_ids, levels).tolist()
    return probs


def _last_logits(trainer, prompt: dict, stems: list[list[int]]) -> torch.Tensor:
    """Next-token logits after prompt + each stem (stems right-padded; rows read at their own end)."""
    n, width = len(stems), max(len(s) for s in stems)
    device = prompt["input_ids"].device
    tail = torch.full((n, width), trainer.pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((n, width), dtype=torch.long, device=device)
    for i, ids in enumerate(stems):
        tail[i, : len(ids)], mask[i, : len(ids)] = torch.tensor(ids, device=device), 1
    inputs = {"input_ids": torch.cat([prompt["input_ids"].expand(n, -1), tail], 1),
              "attention_mask": torch.cat([prompt["attention_mask"].expand(n, -1), mask], 1)}
    if "mm_token_type_ids" in prompt:
        inputs["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"].expand(n, -1), torch.zeros_like(tail)], 1)
    for key in VIDEO_KEYS:
        if key in prompt:
            inputs[key] = prompt[key].repeat(n, *([1] * (prompt[key].dim() - 1)))
    with trainer._autocast():  # the rows show one clip: encoded once where the recipe shares it
        logits = forward_logits(trainer.model, with_rope_positions(trainer.model.config, inputs),
                                logits_to_keep=width + 1, share=trainer.recipe.share_video)
    last = torch.tensor([len(s) for s in stems], device=device)  # position of each row's last stem token in the kept logits
    return logits[torch.arange(n, device=device), last].float()
