"""Prompt lookup decoding (PLD): the drafter looks for the last few tokens earlier in the context and proposes
what followed them there, as a chain. Verified by the same lossless tree path as EAGLE-3; no draft model."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from eagle3.tree import TreeSpec


def lookup(history: Sequence[int], max_ngram: int, num_tokens: int, min_ngram: int = 1) -> list[int]:
    """The tokens that followed the most recent earlier occurrence of the longest matching suffix n-gram."""
    n_total = len(history)
    for n in range(min(max_ngram, n_total - 1), min_ngram - 1, -1):
        suffix = list(history[n_total - n :])
        for start in range(n_total - n - 1, -1, -1):  # most recent match first, not the suffix itself
            if list(history[start : start + n]) == suffix:
                return list(history[start + n : start + n + num_tokens])
    return []


class PromptLookupDrafter:
    """Drafter protocol (see drafter.py) over n-gram matches in the token history."""

    tap_layers = ()  # it reads no target features: the decoding loop skips the taps

    def __init__(self, num_tokens: int = 10, max_ngram: int = 3):
        self.num_tokens, self.max_ngram = num_tokens, max_ngram
        self.history: list[int] = []
        self.proposal: list[int] = []

    @property
    def tree(self) -> TreeSpec:
        """A chain: one proposal per level."""
        return TreeSpec(total_tokens=self.num_tokens + 1, depth=self.num_tokens, top_k=1)

    def reset(self, prompt_ids: Sequence[int], max_len: int) -> None:
        self.history = list(prompt_ids)

    def _step(self, depth: int) -> tuple[Tensor, Tensor]:
        if depth < len(self.proposal):
            return torch.zeros(1), torch.tensor([self.proposal[depth]])
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)

    def catch_up(self, tokens: Tensor, features: Tensor | None, start: int, top_k: int) -> tuple[Tensor, Tensor]:
        # history holds positions 0..start (the previous root at `start`); tokens follow it.
        self.history = self.history[: start + 1] + tokens.tolist()
        self.proposal = lookup(self.history, self.max_ngram, self.num_tokens)
        return self._step(0)

    def expand(self, tokens: Tensor, source_rows: Tensor, depth: int, mask: Tensor) -> tuple[Tensor, Tensor]:
        logp, ids = self._step(depth)
        return logp.view(len(tokens), -1), ids.view(len(tokens), -1)

    def end_round(self) -> None:
        pass
