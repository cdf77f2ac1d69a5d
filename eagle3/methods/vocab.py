"""The draft vocabulary: the most frequent target tokens among trained-on (assistant) tokens.

Draft id i stands for target id used[i] (used sorted ascending): d2t[i] = used[i] - i, and t2d marks the used
target ids, so that `target_logits[..., t2d]` lists the draft vocabulary in draft-id order.
"""

from __future__ import annotations

import torch
from torch import Tensor


def count_tokens(token_ids: Tensor, loss_mask: Tensor, vocab_size: int) -> Tensor:
    """Counts [vocab] of the token ids where loss_mask is set."""
    return torch.bincount(token_ids[loss_mask.bool()].flatten(), minlength=vocab_size)[:vocab_size]


def build_vocab_map(counts: Tensor, draft_vocab_size: int) -> tuple[Tensor, Tensor]:
    """(d2t [draft_vocab] int64, t2d [vocab] bool) for the draft_vocab_size most frequent ids.

    When the data has fewer distinct tokens, unused ids (lowest first) fill the rest; ties in frequency go to
    the lower id, so the map is deterministic.
    """
    vocab = counts.numel()
    if not 0 < draft_vocab_size <= vocab:
        raise ValueError(f"draft vocabulary size must be in [1, {vocab}], got {draft_vocab_size}")
    # Stable sort by descending count: equal counts keep ascending id order.
    order = torch.sort(counts.to(torch.int64), descending=True, stable=True).indices
    used = torch.sort(order[:draft_vocab_size]).values
    d2t = used - torch.arange(draft_vocab_size)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[used] = True
    return d2t, t2d
