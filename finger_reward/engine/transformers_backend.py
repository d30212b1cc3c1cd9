"""Answer probabilities from a Qwen2.5-VL (or Qwen3-VL) checkpoint with transformers.

Every question about a video shares the token prefix "system turn + video" (prompts.py), and
that prefix is almost all of the tokens. The engine encodes it once, keeps its KV cache, and
appends all the video's questions to that one cache row, each seeing the prefix and its own
tokens only (`packing`), so the prefix is neither recomputed nor copied per question (DESIGN.md,
The engine). Every forward takes its 3-D rope positions from `finger_reward.rope` (the model's
original rule, not transformers' `get_rope_index`); text after the video continues one past the
prefix's last position on all three axes.

`answer_many` batches across videos as well: videos sorted by prefix length are grouped under a
token budget, a group's prefixes are prefilled right-padded in one forward, and all the group's
questions run in one more, a row per video; in reason mode every question of the group then
decodes its reason in the same steps (`reasoning`). Padding is masked, so a video's result does
not depend on the other videos in its group. The attention implementation must take a custom
mask ("sdpa", the default, or "eager").
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch

from finger_reward import prompts
from finger_reward.engine import packing
from finger_reward.engine.budget import auto_batch_tokens
from finger_reward.engine.inputs import patch_factor, processor_inputs
from finger_reward.engine.reasoning import ReasonTokens, decode_reasons, extract_reason
from finger_reward.rope import RopeLayout, rope_positions, with_rope_positions
from finger_reward.scoring import answer_probs, answer_token_ids, choice_token_ids
from finger_reward.video import Clip

__all__ = ["Answers", "TransformersEngine", "default_device_dtype", "extract_reason"]

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


@dataclass
class _Packed:
    """A group's KV cache with each video's questions appended to its row (`packing`)."""

    cache: object  # transformers DynamicCache, batch = videos
    seg: torch.Tensor  # (videos, slots): packing.PREFIX, packing.PAD or the question index of each cached slot
    rope_delta: torch.Tensor  # (videos, 1)
    start: int  # the slot of the first text token after the prefixes
    off: torch.Tensor  # (videos, slots): each question slot's offset in its question, else -1
    next_offset: dict = field(default_factory=dict)  # (video row, question) -> offset of its next token


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

    `max_batch_tokens` bounds the KV-cache slots of one group of videos (videos x (prefix + the
    question tokens appended, with up to `max_new_tokens` per question in reason mode)); "auto"
    sizes it from free CUDA memory and the model's KV cache per token (`engine.budget`), and is
    16384 off CUDA. `compile=True` runs the model
    through `torch.compile` (off by default: the first batches of each new shape compile).
    On CUDA out-of-memory a batch is split and retried. `share_prefix=False` runs the plain
    one-question-per-forward loop instead: slower, and kept as the reference the shared path is
    tested and benchmarked against.
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
        max_batch_tokens: int | str = 16384,
        share_prefix: bool = True,
        compile: bool = False,
    ):
        if max_batch_tokens != "auto" and (isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int)
                                           or max_batch_tokens < 1):
            raise ValueError(f"max_batch_tokens={max_batch_tokens!r} must be a positive token count or 'auto'")
        attention = getattr(getattr(model.config, "text_config", model.config), "_attn_implementation", None)
        if share_prefix and attention and attention.startswith("flash"):
            raise ValueError(
                f"the shared-prefix engine masks attention per question, which attn_implementation={attention!r} "
                "cannot do; load the model with attn_implementation='sdpa' (the default) or 'eager'"
            )
        self.model, self.processor = model.eval(), processor
        self.tokenizer = processor.tokenizer
        self.mode = prompts.check_mode(mode)
        if self.mode == "reason" and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1 in reason mode (the reason's tokens), got {max_new_tokens}")
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.question_batch_size, self.share_prefix = question_batch_size, share_prefix
        self.max_batch_tokens = max_batch_tokens
        self.split = prompts.split_prompt(processor, mode)
        self.yes_ids, self.no_ids = answer_token_ids(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.reason_tokens = ReasonTokens.from_model(model, processor)
        self.rope_layout = RopeLayout.from_config(model.config)
        # The base model (vision tower + decoder, no LM head): the engine reads the head only at the
        # tokens it needs, not over every suffix position (rows x length x vocabulary logits).
        self._base = torch.compile(model.model, dynamic=True) if compile else model.model
        self._head = model.get_output_embeddings()
        self._pair: TransformersEngine | None = None  # this engine asking the two-video question (`_pair_engine`)

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

    def preprocess(self, clip: Clip) -> dict | None:
        """The processor's prefix inputs for a clip (CPU tensors), to compute ahead of `answer`'s `inputs=`.

        `FingerReward` calls this in its prefetch workers so the model thread never runs the
        processor. The plain loop encodes whole prompts per question, so it has nothing to precompute.
        """
        return self._prefix_inputs(clip) if self.share_prefix else None

    @torch.inference_mode()
    def answer(self, clip: Clip, questions: list[str], inputs: dict | None = None) -> Answers:
        """P(Yes)/P(No) (and reasons in reason mode) for each question about one video.

        `inputs` is this clip's `preprocess` output, if it was computed ahead.
        """
        if not questions:
            return Answers(torch.zeros(0, 2), [] if self.mode == "reason" else None)
        if not self.share_prefix:
            return self._answer_plain(clip, questions)
        return self._answer_batched([clip], [questions], [inputs])[0]

    @torch.inference_mode()
    def answer_many(self, clips: list[Clip], questions_per_clip: list[list[str]],
                    inputs: list[dict | None] | None = None) -> list[Answers]:
        """`answer` for many videos, batched across videos under `max_batch_tokens` (both modes).

        The plain loop answers one video after another.
        """
        if len(clips) != len(questions_per_clip) or (inputs is not None and len(inputs) != len(clips)):
            raise ValueError(f"got {len(clips)} clips but {len(questions_per_clip)} question lists"
                             + ("" if inputs is None else f" and {len(inputs)} preprocessed inputs"))
        if not self.share_prefix:
            return [self.answer(clip, questions) for clip, questions in zip(clips, questions_per_clip)]
        return self._answer_batched(clips, questions_per_clip, inputs)

    # ---- two-video comparison (VQ-Insight's preference task) ------------------------------------

    def _pair_engine(self) -> "TransformersEngine":
        """This engine (same model, same batching) asking the two-video question: the pair prompt's split,
        and the single-token spellings of "A" and "B" as Eq. 1's two answer sets in place of Yes and No."""
        if self._pair is None:
            view = copy.copy(self)
            view.split = prompts.split_prompt(self.processor, self.mode, pair=True)
            view.yes_ids, view.no_ids = choice_token_ids(self.tokenizer)
            self._pair = view
        return self._pair

    def preprocess_pair(self, clip_a: Clip, clip_b: Clip) -> dict:
        """The processor's prefix inputs for a pair (Video A, then Video B; CPU tensors)."""
        return processor_inputs(self.processor, self._pair_engine().split.prefix, (clip_a, clip_b))

    @torch.inference_mode()
    def compare_many(self, pairs: list[tuple[Clip, Clip]], questions_per_pair: list[list[str]],
                     inputs: list[dict | None] | None = None) -> list[Answers]:
        """[P(A), P(B)] per question about each pair (first clip shown as Video A), and reasons in reason mode.

        Batched as `answer_many`: a pair's two videos are one prefix, encoded once for all its questions.
        """
        if len(pairs) != len(questions_per_pair) or (inputs is not None and len(inputs) != len(pairs)):
            raise ValueError(f"got {len(pairs)} pairs but {len(questions_per_pair)} question lists"
                             + ("" if inputs is None else f" and {len(inputs)} preprocessed inputs"))
        view = self._pair_engine()
        if not self.share_prefix:
            return [view._answer_plain(tuple(pair), questions) if questions
                    else Answers(torch.zeros(0, 2), [] if self.mode == "reason" else None)
                    for pair, questions in zip(pairs, questions_per_pair)]
        given = inputs or [None] * len(pairs)
        prefixes = [x if x is not None else self.preprocess_pair(*pair) for x, pair in zip(given, pairs)]
        return view._answer_batched(list(pairs), questions_per_pair, prefixes)

    @property
    def batch_tokens(self) -> int:
        """The token budget now: `max_batch_tokens`, or its value for the free memory when "auto"."""
        return auto_batch_tokens(self.model) if self.max_batch_tokens == "auto" else self.max_batch_tokens

    # ---- cross-video batching -------------------------------------------------------------------

    def _answer_batched(self, clips: list[Clip], questions_per_clip: list[list[str]],
                        inputs: list[dict | None] | None = None) -> list[Answers]:
        todo = [i for i, questions in enumerate(questions_per_clip) if questions]
        given = inputs or [None] * len(clips)
        prefix_inputs = {i: given[i] if given[i] is not None else self._prefix_inputs(clips[i]) for i in todo}
        suffixes = {i: [self._suffix_ids(q) for q in questions_per_clip[i]] for i in todo}
        answers = {}
        for group in self._groups(prefix_inputs, suffixes):
            answers.update(self._run_group(group, prefix_inputs, suffixes))
        none = Answers(torch.zeros(0, 2), [] if self.mode == "reason" else None)
        return [answers.get(i, none) for i in range(len(clips))]

    def _groups(self, inputs: dict[int, dict], suffixes: dict[int, list[list[int]]]) -> list[list[int]]:
        """Videos by ascending prefix length, cut into groups whose cost stays within the token budget.

        A group's cost is the slots of its grown cache: videos x (longest prefix + the most
        question tokens any of its videos appends: suffixes, and in reason mode up to
        `max_new_tokens` and the closing tags per question). A video over the budget still runs, alone.
        """
        budget = self.batch_tokens
        prefix_len = {i: x["input_ids"].shape[1] for i, x in inputs.items()}
        per_question = self.max_new_tokens + 8 if self.mode == "reason" else 0
        appended = {i: sum(map(len, s)) + per_question * len(s) for i, s in suffixes.items()}

        def cost(group: list[int]) -> int:
            return len(group) * (max(prefix_len[i] for i in group) + max(appended[i] for i in group))

        groups: list[list[int]] = []
        for i in sorted(inputs, key=prefix_len.__getitem__):
            if groups and cost(groups[-1] + [i]) <= budget:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def _run_group(self, group: list[int], inputs: dict, suffixes: dict) -> dict[int, Answers]:
        """Answers per video of a group; on CUDA out-of-memory, split the group in halves and retry.

        A lone video runs its questions in chunks of `question_batch_size`, which halve on out-of-memory.
        """
        try:
            prefix = self._encode_prefixes([inputs[i] for i in group])
            if len(group) == 1:
                probs, reasons = [], []
                for chunk_probs, chunk_reasons in self._chunks(prefix, suffixes[group[0]]):
                    probs.append(chunk_probs)
                    reasons += chunk_reasons or []
                return {group[0]: Answers(torch.cat(probs), reasons if self.mode == "reason" else None)}
            answers = self._answer_prefixes(prefix, [suffixes[i] for i in group])
            return {i: Answers(probs, reasons) for i, (probs, reasons) in zip(group, answers)}
        except torch.cuda.OutOfMemoryError:
            if len(group) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(group) // 2
            logger.warning("CUDA out of memory with %d videos per batch; splitting into %d and %d", len(group), half, len(group) - half)
            return {**self._run_group(group[:half], inputs, suffixes), **self._run_group(group[half:], inputs, suffixes)}

    def _chunks(self, prefix: _Prefix, suffixes: list[list[int]]):
        """One video's questions in chunks of `question_batch_size`; on CUDA out-of-memory, halve the chunk and retry."""
        size, start = self.question_batch_size, 0
        while start < len(suffixes):
            chunk = suffixes[start : start + size]
            try:
                yield self._answer_prefixes(prefix, [chunk])[0]
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
        # The first text token after a prefix sits one past its last real token (a text token), which
        # is also one past the prefix maximum: the original rule (finger_reward.rope).
        position_ids, _ = rope_positions(
            self.rope_layout, batch["input_ids"], batch["attention_mask"], image_grid_thw=batch.get("image_grid_thw"),
            video_grid_thw=batch.get("video_grid_thw"), second_per_grid_ts=batch.get("second_per_grid_ts"),
        )
        out = self._base(**batch, position_ids=position_ids, use_cache=True)
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        mask = batch["attention_mask"]
        last = position_ids[0, torch.arange(len(mask), device=mask.device), mask.sum(1) - 1]
        return _Prefix(kv=kv, mask=mask, rope_delta=(last + 1 - mask.shape[1])[:, None])

    def _suffix_ids(self, question: str) -> list[int]:
        return self.tokenizer.encode(self.split.text_after_video(question), add_special_tokens=False)

    def _pack(self, prefix: _Prefix) -> _Packed:
        """A fresh cache over the prefixes (the prefix tensors themselves are never written)."""
        from transformers import DynamicCache

        seg = torch.where(prefix.mask.bool(), packing.PREFIX, packing.PAD)
        return _Packed(DynamicCache(ddp_cache_data=prefix.kv), seg, prefix.rope_delta, prefix.length,
                       off=torch.full_like(seg, -1))

    def _forward(self, state: _Packed, pieces: packing.Pieces) -> torch.Tensor:
        """Append `pieces` to the packed cache in one forward; the decoder's last hidden state at each piece's end.

        Text after the video takes one position on all three mrope axes, counted for each question
        from the first slot after the prefix, so every question sits where it would alone.
        """
        layout = packing.lay_out(pieces, self.pad_id)
        ids, seg = layout.ids.to(self.device), layout.seg.to(self.device)
        off = torch.where(seg == packing.PAD, -1, layout.offsets.to(self.device))
        _supersede(state, pieces)
        positions = (layout.offsets.to(self.device) + state.start + state.rope_delta)[None].expand(3, -1, -1)
        mask = packing.block_mask(state.seg, seg, self.model.dtype)
        out = self._base(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=state.cache, use_cache=True)
        state.seg, state.off = torch.cat([state.seg, seg], 1), torch.cat([state.off, off], 1)
        rows, cols = (torch.tensor(x, device=self.device) for x in layout.last)
        return out.last_hidden_state[rows, cols]

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return answer_probs(logits, self.yes_ids, self.no_ids).cpu()

    def _answer_prefixes(self, prefix: _Prefix, suffixes: list[list[list[int]]]) -> list[tuple]:
        """(P(Yes)/P(No), reasons or None) per video of `prefix` for its questions' suffix token ids."""
        state = self._pack(prefix)
        hidden = self._forward(state, [[(q, s, 0) for q, s in enumerate(video)] for video in suffixes])
        counts = [len(video) for video in suffixes]
        if self.mode == "answer":
            return [(p, None) for p in self._probs(self._head(hidden)).split(counts)]
        questions = [(v, q, len(s)) for v, video in enumerate(suffixes) for q, s in enumerate(video)]
        probs, reasons = self._reason(state, questions, self._head(hidden))
        starts = [sum(counts[:v]) for v in range(len(counts))]
        return [(p, reasons[s : s + n]) for p, s, n in zip(probs.split(counts), starts, counts)]

    def _reason(self, state: _Packed, questions: list[tuple[int, int, int]], logits: torch.Tensor):
        """Reasons decoded together in the packed cache (`reasoning.decode_reasons`), then P(Yes)/P(No).

        `questions` holds (video row, question index, suffix length) in video order, `logits` the
        next-token logits after each suffix.
        """
        generated, last = decode_reasons(
            self.reason_tokens, questions, logits, lambda pieces: self._head(self._forward(state, pieces)),
            videos=state.seg.shape[0], max_new_tokens=self.max_new_tokens, temperature=self.temperature,
        )
        return self._probs(last), [self.reason_tokens.reason(g) for g in generated]

    # ---- reference path: one full forward (or generate) per question ---------------------------

    def _answer_plain(self, clip: Clip, questions: list[str]) -> Answers:
        probs, reasons = [], []
        for q in questions:
            inputs = self._model_inputs(self.split.prefix + self.split.text_after_video(q), clip)
            if self.mode == "reason":
                out = self.model.generate(
                    **with_rope_positions(self.model.config, inputs), max_new_tokens=self.max_new_tokens, do_sample=False,
                    stop_strings=[prompts.REASON_CLOSE, prompts.ANSWER_OPEN], tokenizer=self.tokenizer,
                    suppress_tokens=self.reason_tokens.suppressed or None,
                )
                generated = out[0, inputs["input_ids"].shape[1] :].tolist()
                reasons.append(self.reason_tokens.reason(generated))
                keep, closing = self.reason_tokens.closing(generated)
                inputs = _append_text_tokens(inputs, generated[:keep] + closing)
            inputs = with_rope_positions(self.model.config, inputs)
            probs.append(self._probs(self.model(**inputs, logits_to_keep=1).logits[:, -1]))
        return Answers(torch.cat(probs), reasons if self.mode == "reason" else None)


def _supersede(state: _Packed, pieces: packing.Pieces) -> None:
    """Hide the cached tokens a piece replaces: those of its question at or after the piece's first offset
    (a reason closed by re-tokenizing its text, `ReasonTokens.closing`), so nothing attends to them."""
    for row, row_pieces in enumerate(pieces):
        for q, tokens, first in row_pieces:
            if first < state.next_offset.get((row, q), first):
                stale = (state.seg[row] == q) & (state.off[row] >= first)
                state.seg[row] = state.seg[row].masked_fill(stale, packing.PAD)
            state.next_offset[(row, q)] = first + len(tokens)


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
