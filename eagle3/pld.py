"""Prompt lookup decoding (PLD): the drafter looks for the last few tokens earlier in the context and proposes
what followed them there, as a chain. Verified by the same lossless tree path as EAGLE-3; no draft model."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from eagle3.drafter import Proposal
from eagle3.policy import TreePlan
from eagle3.tree import TreeGrowth, TreeSpec, grow_trees


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
    """Drafter protocol (see drafter.py) over n-gram matches in each row's token history."""

    tap_layers = ()  # it reads no target features: the decoding loop skips the taps

    def __init__(self, num_tokens: int = 10, max_ngram: int = 3):
        self.num_tokens, self.max_ngram = num_tokens, max_ngram
        self.histories: list[list[int]] = []  # per row: the committed tokens (the last one is the next root)

    @property
    def tree(self) -> TreeSpec:
        """A chain: one proposal per level."""
        return TreeSpec(total_tokens=self.num_tokens + 1, depth=self.num_tokens, top_k=1)

    def open(self, max_rows: int, max_len: int) -> None:
        self.histories = []

    def join(self, row: int, prompt_ids: Sequence[int]) -> None:
        self.histories.append(list(prompt_ids[:1]))  # (the first commit brings the rest of the prompt)

    def release(self, row: int) -> None:
        self.histories[row] = self.histories[-1]
        self.histories.pop()

    def commit(self, row: int, tokens: Tensor, features: Tensor | None) -> None:
        self.histories[row] += tokens.tolist()

    def propose(self, plan: TreePlan) -> Proposal:
        proposals = [lookup(h, self.max_ngram, self.num_tokens) for h in self.histories]

        def children(row: int, depth: int, nodes: int = 1) -> tuple[Tensor, Tensor]:
            if depth < len(proposals[row]):
                return torch.zeros(nodes, 1), torch.tensor([[proposals[row][depth]]] * nodes)
            return torch.zeros(nodes, 0), torch.zeros(nodes, 0, dtype=torch.long)

        growths = [TreeGrowth(h[-1], *(x[0] for x in children(b, 0)), spec, plan.sizer(b, 0))
                   for b, (h, spec) in enumerate(zip(self.histories, plan.specs))]  # fmt: skip
        trees = grow_trees(growths, lambda rows, levels, depth: [children(row, depth, len(level[0]))
                                                                  for row, level in zip(rows, levels)])  # fmt: skip
        return Proposal(trees, [0] * len(trees))
