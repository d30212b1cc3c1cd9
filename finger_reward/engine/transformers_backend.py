"""Answer probabilities from a Qwen2.5-VL (or Qwen3-VL) checkpoint with transformers.

Every question about a video shares the token prefix "system turn + video" (prompts.py), and
that prefix is almost all of the tokens. The engine encodes it once, keeps its KV cache, and
runs all the video's questions as one batch of short suffixes on top of it (DESIGN.md, The
engine). Text after the video takes 1-D positions that continue from the prefix's last
position as the model's own rope index computes it, so no mrope arithmetic is done by hand.

`answer_many` batches across videos as well: videos sorted by prefix length are grouped under a
token budget, a group's prefixes are prefilled right-padded in one forward, and all the group's
questions run as one batch of suffixes, each row over its own video's cache row. Padding is
masked, so a video's result does not depend on the other videos in its group.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from finger_reward import prompts
from finger_reward.engine.inputs import patch_factor, processor_inputs
from finger_reward.scoring import answer_probs, answer_token_ids
from finger_reward.video import Clip

logger = logging.getLogger(__name__)


@dataclass
class Answers:
    """The engine's output for one video: [P(Yes), P(No)] per question, and reasons in reason mode.

    `missing_variant` (engines that see only top-K log-probabilities) holds, per question, "yes"
    or "no" when that whole token set was absent, else None.
    """

    probs: torch.Tensor  # (Q, 2), float32, on CPU
    reasons: list[str] | None = None
    missing_variant: list[str | None] | None = None


@dataclass
class _Prefix:
    """Encoded "system + video" prefixes of one or more videos, right-padded to one length."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, (videos, heads, length, dim)
    mask: torch.Tensor  # (videos, length): 1 on real tokens, 0 on padding
    rope_delta: torch.Tensor  # (videos, 1): text position minus cache slot for text after the prefix

    @property
    def length(self) -> int:
        return self.mask.shape[1]


def default_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 when a GPU is present, else CPU with float32; either can be overridden."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return device, dtype


class TransformersEngine:
    """Batched Yes/No answering over a shared video prefix.

    `share_prefix=False` runs the plain one-question-per-forward loop instead: slower, and kept
    as the reference the shared path is tested and benchmarked against.
    """

    def __init__(
        self,
        model,
        processor,
        *,
        mode: str = "answer",
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        question_batch_size: int = 32,
        max_batch_tokens: int = 16384,
        share_prefix: bool = True,
    ):
        self.model, self.processor = model.eval(), processor
        self.tokenizer = processor.tokenizer
        self.mode = prompts.check_mode(mode)
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.question_batch_size, self.share_prefix = question_batch_size, share_prefix
        self.max_batch_tokens = max_batch_tokens
        self.split = prompts.split_prompt(processor, mode)
        self.yes_ids, self.no_ids = answer_token_ids(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos_ids = set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
        self.eos_ids |= {self.tokenizer.eos_token_id} - {None}
        # A reason never holds vision placeholders; a generated one would break the full forward's video count.
        placeholders = (getattr(processor, "image_token_id", None), getattr(processor, "video_token_id", None))
        self.suppressed = [i for i in placeholders if i is not None]

    @classmethod
    def from_pretrained(cls, model_id: str, *, device=None, dtype=None, attn_implementation=None, **kw):
        """Load a checkpoint directory or hub id with AutoModelForImageTextToText and AutoProcessor."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        device, dtype = default_device_dtype(device, dtype)
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=dtype, **extra).to(device)
        return cls(model, AutoProcessor.from_pretrained(model_id), **kw)

    @property
    def patch_factor(self) -> int:
        """Frame sides must be multiples of this: the vision patch size times the spatial merge."""
        return patch_factor(self.processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def answer(self, clip: Clip, questions: list[str]) -> Answers:
        """P(Yes)/P(No) (and reasons in reason mode) for each question about one video."""
        if not questions:
            return Answers(torch.zeros(0, 2), [] if self.mode == "reason" else None)
        if not self.share_prefix:
            return self._answer_plain(clip, questions)
        if self.mode == "answer":
            return self._answer_batched([clip], [questions])[0]
        prefix = self._encode_prefixes([self._prefix_inputs(clip)])
        probs, reasons = [], []
        for chunk_probs, chunk_reasons in self._chunks(prefix, [self._suffix_ids(q) for q in questions]):
            probs.append(chunk_probs)
            reasons += chunk_reasons
        return Answers(torch.cat(probs), reasons)

    @torch.inference_mode()
    def answer_many(self, clips: list[Clip], questions_per_clip: list[list[str]]) -> list[Answers]:
        """`answer` for many videos; in answer mode, batched across videos under `max_batch_tokens`.

        Reason mode and the plain loop answer one video after another.
        """
        if len(clips) != len(questions_per_clip):
            raise ValueError(f"got {len(clips)} clips but {len(questions_per_clip)} question lists")
        if self.mode == "reason" or not self.share_prefix:
            return [self.answer(clip, questions) for clip, questions in zip(clips, questions_per_clip)]
        return self._answer_batched(clips, questions_per_clip)

    # ---- cross-video batching (answer mode) -----------------------------------------------------

    def _answer_batched(self, clips: list[Clip], questions_per_clip: list[list[str]]) -> list[Answers]:
        todo = [i for i, questions in enumerate(questions_per_clip) if questions]
        inputs = {i: self._prefix_inputs(clips[i]) for i in todo}
        suffixes = {i: [self._suffix_ids(q) for q in questions_per_clip[i]] for i in todo}
        probs = {}
        for group in self._groups(inputs, suffixes):
            probs.update(self._run_group(group, inputs, suffixes))
        return [Answers(probs.get(i, torch.zeros(0, 2))) for i in range(len(clips))]

    def _groups(self, inputs: dict[int, dict], suffixes: dict[int, list[list[int]]]) -> list[list[int]]:
        """Videos by ascending prefix length, cut into groups whose cost stays within `max_batch_tokens`.

        A group's cost is the token slots of its question pass: rows x (longest prefix + longest
        suffix), as that cache is what grows memory. A video over the budget still runs, alone.
        """
        prefix_len = {i: x["input_ids"].shape[1] for i, x in inputs.items()}
        suffix_len = {i: max(map(len, s)) for i, s in suffixes.items()}

        def cost(group: list[int]) -> int:
            rows = sum(len(suffixes[i]) for i in group)
            return rows * (max(prefix_len[i] for i in group) + max(suffix_len[i] for i in group))

        groups: list[list[int]] = []
        for i in sorted(inputs, key=prefix_len.__getitem__):
            if groups and cost(groups[-1] + [i]) <= self.max_batch_tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def _run_group(self, group: list[int], inputs: dict, suffixes: dict) -> dict[int, torch.Tensor]:
        """Probabilities per video of a group; on CUDA out-of-memory, split the group in halves and retry."""
        try:
            if len(group) == 1:
                prefix = self._encode_prefixes([inputs[group[0]]])
                return {group[0]: torch.cat([p for p, _ in self._chunks(prefix, suffixes[group[0]])])}
            return self._answer_group(group, inputs, suffixes)
        except torch.cuda.OutOfMemoryError:
            if len(group) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(group) // 2
            logger.warning("CUDA out of memory with %d videos per batch; splitting into %d and %d", len(group), half, len(group) - half)
            return {**self._run_group(group[:half], inputs, suffixes), **self._run_group(group[half:], inputs, suffixes)}

    def _answer_group(self, group: list[int], inputs: dict, suffixes: dict) -> dict[int, torch.Tensor]:
        """One prefill of the group's prefixes, then one pass over all its questions."""
        prefix = self._encode_prefixes([inputs[i] for i in group])
        rows = [s for i in group for s in suffixes[i]]
        videos = torch.tensor([k for k, i in enumerate(group) for _ in suffixes[i]], device=self.device)
        probs = self._probs(self._extend(prefix, rows, videos)[0])
        return dict(zip(group, probs.split([len(suffixes[i]) for i in group])))

    def _chunks(self, prefix: _Prefix, suffixes: list[list[int]]):
        """Run the questions in chunks of `question_batch_size`; on CUDA out-of-memory, halve the chunk and retry."""
        size, start = self.question_batch_size, 0
        while start < len(suffixes):
            chunk = suffixes[start : start + size]
            try:
                if self.mode == "answer":
                    yield self._probs(self._extend(prefix, chunk)[0]), []
                else:
                    yield self._reason(prefix, chunk)
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                size = max(1, size // 2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                logger.warning("CUDA out of memory with %d questions per batch; retrying with %d", len(chunk), size)
                continue
            start += len(chunk)

    # ---- shared-prefix path ---------------------------------------------------------------------

    def _model_inputs(self, text: str, clip: Clip) -> dict:
        return processor_inputs(self.processor, text, clip).to(self.device)

    def _prefix_inputs(self, clip: Clip) -> dict:
        """The processor's inputs for the prefix, on CPU until its group runs."""
        return processor_inputs(self.processor, self.split.prefix, clip)

    def _encode_prefixes(self, inputs: list[dict]) -> _Prefix:
        batch = _right_pad_batch(inputs, self.pad_id, self.device)
        # The model's own rope index gives the prefixes' 3-D positions. The first text token after
        # a prefix sits one past its last real token (a text token), which is not always one past
        # the prefix maximum (the video's temporal positions can reach beyond), so the model's
        # cached `rope_deltas` for the prefix alone would be wrong here.
        position_ids, _ = self.model.model.get_rope_index(
            input_ids=batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
            video_grid_thw=batch["video_grid_thw"], second_per_grid_ts=batch.get("second_per_grid_ts"),
            attention_mask=batch["attention_mask"],
        )
        out = self.model(**batch, position_ids=position_ids, use_cache=True, logits_to_keep=1)
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        mask = batch["attention_mask"]
        last = position_ids[0, torch.arange(len(mask), device=mask.device), mask.sum(1) - 1]
        return _Prefix(kv=kv, mask=mask, rope_delta=(last + 1 - mask.shape[1])[:, None])

    def _suffix_ids(self, question: str) -> list[int]:
        return self.tokenizer.encode(self.split.text_after_video(question), add_special_tokens=False)

    def _extend(self, prefix: _Prefix, suffixes: list[list[int]], videos: torch.Tensor | None = None):
        """Run right-padded suffixes, row i over the cache row of video `videos[i]` (see `_feed`)."""
        from transformers import DynamicCache

        rows = len(suffixes)
        if videos is None:  # one video: expand() is a view, materialised per row only when the cache grows
            kv = [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in prefix.kv]
            mask, rope_delta = prefix.mask.expand(rows, -1), prefix.rope_delta
        else:
            kv = [(k.index_select(0, videos), v.index_select(0, videos)) for k, v in prefix.kv]
            mask, rope_delta = prefix.mask[videos], prefix.rope_delta[videos]
        start = torch.full((rows,), prefix.length, device=self.device)
        return self._feed(DynamicCache(ddp_cache_data=kv), mask, start, rope_delta, suffixes)

    def _feed(self, cache, mask, start, rope_delta, rows: list[list[int]]):
        """One forward of a right-padded batch of token rows appended to `cache`.

        Row i continues at text position `start[i]`; `mask` covers the cache so far. Returns each
        row's logits at its last real token, the grown cache, the grown mask and the next positions.
        Left padding would shift the positions, so padding goes on the right and is masked.
        """
        lengths = torch.tensor([len(r) for r in rows], device=self.device)
        width = int(lengths.max())
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, device=self.device)
        offsets = torch.arange(width, device=self.device)[None]
        mask = torch.cat([mask, (offsets < lengths[:, None]).long()], 1)
        logits = self._forward(ids, mask, start[:, None] + offsets, rope_delta, cache)
        last = logits[torch.arange(len(rows), device=self.device), lengths - 1]
        return last, cache, mask, start + lengths

    def _forward(self, ids, mask, positions, rope_delta, cache) -> torch.Tensor:
        # Text tokens after the video share one position on all three mrope axes (t, h, w).
        position_ids = (positions + rope_delta.to(positions.device))[None].expand(3, -1, -1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        return out.logits

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return answer_probs(logits, self.yes_ids, self.no_ids).cpu()

    # ---- reason mode: decode reasons for all questions at once, then read the answer -------------

    def _reason(self, prefix: _Prefix, suffixes: list[list[int]]) -> tuple[torch.Tensor, list[str]]:
        logits, cache, mask, next_pos = self._extend(prefix, suffixes)
        rows = len(suffixes)
        generated: list[list[int]] = [[] for _ in range(rows)]
        pending = [None] * rows  # a chosen token not yet fed, once a row has stopped
        for step in range(self.max_new_tokens):
            tokens = self._pick(logits)
            for i in range(rows):
                if pending[i] is None:
                    generated[i].append(int(tokens[i]))
                    if self._stopped(generated[i]) or step == self.max_new_tokens - 1:
                        pending[i] = generated[i][-1]
            live = torch.tensor([p is None for p in pending], device=self.device)
            if not live.any():
                break
            mask = torch.cat([mask, live.long()[:, None]], 1)
            logits = self._forward(tokens[:, None], mask, next_pos[:, None], prefix.rope_delta, cache)[:, -1]
            next_pos = next_pos + live.long()
        # One more step: feed each row's last token plus whatever closes "</reason><answer>".
        closing = [self._closing_ids(g) for g in generated]
        last = self._feed(cache, mask, next_pos, prefix.rope_delta, closing)[0]
        reasons = [extract_reason(self.tokenizer.decode(g, skip_special_tokens=True)) for g in generated]
        return self._probs(last), reasons

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.index_fill(-1, torch.tensor(self.suppressed, dtype=torch.long, device=logits.device), -math.inf)
        if self.temperature <= 0:
            return logits.argmax(-1)
        return torch.multinomial((logits.float() / self.temperature).softmax(-1), 1)[:, 0]

    def _stopped(self, ids: list[int]) -> bool:
        if ids[-1] in self.eos_ids:
            return True
        tail = self.tokenizer.decode(ids[-8:], skip_special_tokens=False)
        return tail.endswith(prompts.REASON_CLOSE) or tail.endswith(prompts.ANSWER_OPEN)

    def _closing_ids(self, generated: list[int]) -> list[int]:
        """Tokens to feed after the reason so the next token is the answer."""
        text = self.tokenizer.decode(generated[-8:], skip_special_tokens=False)
        if text.endswith(prompts.ANSWER_OPEN):
            return generated[-1:]
        keep = [] if generated[-1] in self.eos_ids else generated[-1:]
        tail = prompts.ANSWER_OPEN if text.endswith(prompts.REASON_CLOSE) else prompts.REASON_CLOSE + prompts.ANSWER_OPEN
        return keep + self.tokenizer.encode(tail, add_special_tokens=False)

    # ---- reference path: one full forward (or generate) per question ---------------------------

    def _answer_plain(self, clip: Clip, questions: list[str]) -> Answers:
        probs, reasons = [], []
        for q in questions:
            inputs = self._model_inputs(self.split.prefix + self.split.text_after_video(q), clip)
            if self.mode == "reason":
                out = self.model.generate(
                    **inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                    stop_strings=[prompts.REASON_CLOSE, prompts.ANSWER_OPEN], tokenizer=self.tokenizer,
                    suppress_tokens=self.suppressed or None,
                )
                generated = out[0, inputs["input_ids"].shape[1] :].tolist()
                reasons.append(extract_reason(self.tokenizer.decode(generated, skip_special_tokens=True)))
                inputs = _append_text_tokens(inputs, generated[:-1] + self._closing_ids(generated))
            probs.append(self._probs(self.model(**inputs, logits_to_keep=1).logits[:, -1]))
        return Answers(torch.cat(probs), reasons if self.mode == "reason" else None)


def _right_pad_batch(inputs: list[dict], pad_id: int, device) -> dict:
    """Processor outputs for single prompts as one batch: token rows right-padded, videos concatenated."""
    width = max(x["input_ids"].shape[1] for x in inputs)
    pads = {"input_ids": pad_id, "attention_mask": 0, "mm_token_type_ids": 0}
    batch = {}
    for key in inputs[0]:
        if key in pads:
            rows = [torch.nn.functional.pad(x[key], (0, width - x[key].shape[1]), value=pads[key]) for x in inputs]
        else:
            rows = [x[key] for x in inputs]
        batch[key] = torch.cat(rows).to(device)
    return batch


def _append_text_tokens(inputs: dict, ids: list[int]) -> dict:
    """Processor outputs with text tokens appended (for a full forward over prompt + reason)."""
    extra = torch.tensor([ids], dtype=inputs["input_ids"].dtype, device=inputs["input_ids"].device)
    grown = dict(inputs)
    grown["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
    grown["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], 1)
    if "mm_token_type_ids" in inputs:
        grown["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1)
    return grown


def extract_reason(text: str) -> str:
    """The text inside <reason>...</reason>, or everything before <answer> when tags are missing."""
    start = text.find(prompts.REASON_OPEN)
    body = text[start + len(prompts.REASON_OPEN) :] if start >= 0 else text
    for tag in (prompts.REASON_CLOSE, prompts.ANSWER_OPEN):
        if tag in body:
            body = body[: body.index(tag)]
    return body.strip()


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
