"""A GRPO group's G completions decoded from ONE prefill of the video and prompt.

`model.generate` on a prompt repeated G times (the paper's G=16) runs the vision tower and the
prompt's prefill G times over the same tokens. `sample_group` prefills the prompt once (batch 1),
copies its KV cache to G rows and samples the G completions token by token from those rows. The
sampling is `generate`'s (`do_sample=True, top_k=0`): the same transformers logits processors
(suppressed tokens, then temperature, then top-p), float32 logits, `torch.multinomial`, and after a
row's end token only `pad_token_id`. Unlike `generate`, a finished row leaves the cache, so
the rows still writing decode without it. Positions follow `finger_reward.rope`: every new token
(text after the prompt) sits one past the largest position so far on all three mrope axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from finger_reward.rope import with_rope_positions

__all__ = ["sample_group"]


@torch.no_grad()
def sample_group(model, prompt_inputs: dict, num_generations: int, *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, eos_token_ids: Sequence[int] = (), pad_token_id: int,
                 suppress_tokens: Sequence[int] | None = None, output_logits: bool = False):
    """G sampled completions of one prompt: (G, prompt + new) ids, as `generate` returns them.

    `prompt_inputs` is the processor's output for ONE prompt (batch 1, no padding) with its videos,
    without `position_ids` (they come from `finger_reward.rope`). Sampling stops when every row has
    produced one of `eos_token_ids` or after `max_new_tokens`; a finished row continues with
    `pad_token_id`. With `output_logits=True` it returns (ids, logits): per step a (G, vocab)
    float32 tensor of the raw next-token logits each row sampled from, NaN for rows already finished.
    """
    input_ids = prompt_inputs["input_ids"]
    _check(input_ids, prompt_inputs.get("attention_mask"), num_generations, max_new_tokens, temperature, top_p)
    if pad_token_id is None:
        raise ValueError("sample_group needs pad_token_id: rows that have ended are filled with it")
    processors = _sampling_processors(temperature, top_p, suppress_tokens, input_ids.device)
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=input_ids.device)
    prompt = with_rope_positions(model.config, prompt_inputs)
    # The first new token goes one past the prompt's largest position (the original rule; the prompt
    # ends in text, so this is also its last position + 1, where `generate` continues).
    next_position = int(prompt["position_ids"].max()) + 1
    out = model(**prompt, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(num_generations)
    logits = out.logits[:, -1].float().expand(num_generations, -1)
    live = torch.arange(num_generations, device=input_ids.device)  # rows of the group still writing, = cache rows
    sequences = input_ids.expand(num_generations, -1)
    steps, used = [], []
    for step in range(max_new_tokens):
        chosen = torch.multinomial(processors(sequences[live], logits).softmax(-1), 1)[:, 0]
        tokens = torch.full((num_generations,), pad_token_id, dtype=torch.long, device=input_ids.device)
        tokens[live] = chosen
        steps.append(tokens)
        if output_logits:
            used.append(logits.new_full((num_generations, logits.shape[-1]), float("nan")).index_copy_(0, live, logits))
        sequences = torch.cat([sequences, tokens[:, None]], 1)
        running = ~torch.isin(chosen, eos)
        if step == max_new_tokens - 1 or not running.any():
            break
        if not running.all():  # finished rows leave the cache: later steps decode only the others
            cache.batch_select_indices(running.nonzero()[:, 0])
            live = live[running]
        position = torch.full((3, len(live), 1), next_position + step, dtype=torch.long, device=input_ids.device)
        out = model(input_ids=tokens[live, None], position_ids=position, past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1].float()
    ids = torch.cat([input_ids.expand(num_generations, -1), torch.stack(steps, 1)], 1)
    return (ids, tuple(used)) if output_logits else ids


def _check(input_ids, attention_mask, num_generations, max_new_tokens, temperature, top_p) -> None:
    if input_ids.shape[0] != 1:
        raise ValueError(f"sample_group takes one prompt (batch 1), got input_ids of shape {tuple(input_ids.shape)}; "
                         "pass the processor output of a single prompt, not one repeated per completion")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("sample_group's prompt must have no padding (an attention_mask of all ones)")
    if num_generations < 1 or max_new_tokens < 1:
        raise ValueError(f"need num_generations >= 1 and max_new_tokens >= 1, got {num_generations} and {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _sampling_processors(temperature: float, top_p: float, suppress_tokens, device):
    """The logits processors `generate(do_sample=True, top_k=0, ...)` builds for these settings, in its order."""
    from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

    processors = LogitsProcessorList()
    if suppress_tokens:
        processors.append(SuppressTokensLogitsProcessor(list(suppress_tokens), device=device))
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    return processors
