"""What the interop tests share: the same inputs for both engines, our draft's logits on them, and norm weights
moved away from 1 so that a norm applied to the wrong tensor shows."""

from __future__ import annotations

import torch

T = 12  # tokens in the compared sequence


def inputs(stories, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, three taps of the target and positions, as the drafter pairs them: the feature of position t
    with token t + 1 (every engine takes them so paired)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, stories.model.config.vocab_size, (T,), generator=g)
    hidden = torch.randn(T, 3 * stories.model.config.hidden_size, generator=g)
    return tokens, hidden, torch.arange(T)


def ours(draft, stories, tokens, hidden, positions) -> torch.Tensor:
    draft.attach(stories.model.embed.weight)
    draft.setup_cache(T + 1)
    with torch.no_grad():
        return draft.logits(draft(tokens[None], hidden[None], positions))[0]


def varied(draft):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return draft


def scattered(draft, target_vocab_size: int, seed: int = 9):
    """A draft vocabulary of random target ids, so that an engine reading d2t wrongly shows."""
    n = draft.d2t.numel()
    g = torch.Generator().manual_seed(seed)
    kept = torch.randperm(target_vocab_size, generator=g)[:n].sort().values  # target ids
    with torch.no_grad():
        draft.d2t.copy_(kept - torch.arange(n))  # (draft id i is target id i + d2t[i])
        draft.t2d.zero_()
        draft.t2d[kept] = True
    return draft
