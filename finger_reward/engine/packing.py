"""Many questions about one video in one row of tokens, over one copy of the video's KV cache.

After a video's prefix (system turn + video) is cached, its questions' suffixes are appended to
that same cache row one after another, and an attention mask lets each token see the prefix and
the earlier tokens of its own question only. Every question then computes what it would alone,
while the prefix's keys and values are stored and read once per video instead of once per
question. Reasons grow the same way: each decoding step appends one token per unfinished question.
Each slot of a row is tagged with whose it is: `PREFIX` (seen by all), a question's index, or `PAD`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREFIX, PAD = -1, -2

# One forward's new tokens: per video row, (question index, token ids, offset of the first token
# from where text after the prefix starts) for each question continued in this step.
Pieces = list[list[tuple[int, list[int], int]]]


@dataclass
class Layout:
    """`Pieces` as right-padded tensors (videos, width), and where each piece's last token landed."""

    ids: torch.Tensor
    seg: torch.Tensor  # the question index of each new slot, PAD for padding
    offsets: torch.Tensor  # text position of each new slot minus that of the first text token
    last: tuple[list[int], list[int]]  # (rows, columns) of every piece's last token, in piece order


def lay_out(pieces: Pieces, pad_id: int) -> Layout:
    """Concatenate each row's pieces; pad rows on the right to one width."""
    width = max(1, max(sum(len(ids) for _, ids, _ in row) for row in pieces))
    ids, seg, offsets, rows, cols = [], [], [], [], []
    for r, row in enumerate(pieces):
        row_ids, row_seg, row_off = [], [], []
        for q, tokens, first in row:
            row_ids += tokens
            row_seg += [q] * len(tokens)
            row_off += range(first, first + len(tokens))
            rows.append(r)
            cols.append(len(row_ids) - 1)
        pad = width - len(row_ids)
        ids.append(row_ids + [pad_id] * pad)
        seg.append(row_seg + [PAD] * pad)
        offsets.append(row_off + [0] * pad)
    return Layout(torch.tensor(ids), torch.tensor(seg), torch.tensor(offsets), (rows, cols))


def block_mask(cached: torch.Tensor, new: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask (videos, 1, new, cached + new) for `new` slots appended after `cached` ones.

    A token sees every earlier `PREFIX` slot and the earlier slots of its own question; padding is
    seen by nobody and sees only itself (a query that sees nothing would give NaN).
    """
    keys = torch.cat([cached, new], 1)[:, None, :]
    query = new[:, :, None]
    start = cached.shape[1]
    key_slot = torch.arange(keys.shape[-1], device=new.device)
    query_slot = torch.arange(start, start + new.shape[1], device=new.device)[:, None]
    causal = key_slot <= query_slot
    seen = causal & (keys != PAD) & (query != PAD) & ((keys == PREFIX) | (keys == query))
    seen |= key_slot == query_slot
    mask = torch.zeros(seen.shape, dtype=dtype, device=new.device)
    return mask.masked_fill_(~seen, torch.finfo(dtype).min)[:, None]
