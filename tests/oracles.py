"""Drafters for tests that know the target's answers, so that long accepted paths, cache compaction and
EOS inside an accepted run are exercised. Both follow drafter.Drafter, one row at a time."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from eagle3.methods.drafter import Proposal
from eagle3.decoding.policy import TreePlan
from eagle3.methods.sps import DraftModelDrafter
from eagle3.decoding.tree import TreeGrowth, grow_trees


def grow_each(roots: list[tuple[int, Tensor, Tensor]], plan: TreePlan,
              expand_row: Callable[[int, Tensor, Tensor, int], tuple[Tensor, Tensor]]) -> list:  # fmt: skip
    """Every row's tree, its levels expanded one row at a time by expand_row(row, tokens, sources, depth)."""
    growths = [TreeGrowth(token, logp, ids, spec, plan.sizer(b, 0))
               for b, ((token, logp, ids), spec) in enumerate(zip(roots, plan.specs))]  # fmt: skip
    return grow_trees(growths, lambda rows, levels, depth: [expand_row(row, level[0], level[1], depth)
                                                            for row, level in zip(rows, levels)])  # fmt: skip


class TargetOracle(DraftModelDrafter):
    """The target model itself as the draft language model (SpS, sps.py; its own KV cache, a row per sequence):
    its top child is the target's argmax, so greedy decoding accepts every level; under sampling it proposes
    the target's most likely tokens."""


class ReferenceOracle:
    """Knows the reference continuation of one sequence (prompt + plain greedy output): on the reference path
    it proposes the reference's next token first; elsewhere, and as the other children, arbitrary tokens."""

    tap_layers = ()  # it reads no features

    def __init__(self, reference: Sequence[int], vocab_size: int):
        self.reference, self.vocab_size = list(reference), vocab_size

    def open(self, max_rows: int, max_len: int) -> None:
        if max_rows != 1:
            raise ValueError("a ReferenceOracle knows one sequence")
        self.start, self.pending = 0, []

    def join(self, row: int, prompt_ids: Sequence[int]) -> None:
        self.start, self.pending = 0, []  # positions whose tokens were read: pending tokens follow them

    def release(self, row: int) -> None:
        pass

    def commit(self, row: int, tokens: Tensor, features: Tensor | None) -> None:
        self.pending += tokens.tolist()

    def _children(self, next_index: int, on_path: bool, top_k: int) -> tuple[Tensor, Tensor]:
        ids = [(next_index * 7 + j * 13 + 3) % self.vocab_size for j in range(top_k)]
        if on_path and next_index < len(self.reference):
            right = self.reference[next_index]
            ids = [right] + [i for i in ids if i != right][: top_k - 1]
        logp = torch.log(torch.linspace(0.9, 0.1, len(ids)))
        return logp, torch.tensor(ids)

    def propose(self, plan: TreePlan) -> Proposal:
        tokens, top_k = self.pending, plan.specs[0].top_k
        on_path = self.reference[self.start + 1 : self.start + 1 + len(tokens)] == tokens
        root_index = self.start + 1 + len(tokens)  # reference index of the root's children
        self.start, self.pending = self.start + len(tokens), []
        rows = [(root_index, on_path)]

        def expand_row(row: int, node_tokens: Tensor, sources: Tensor, depth: int) -> tuple[Tensor, Tensor]:
            logps, ids = [], []
            for token, source in zip(node_tokens.tolist(), sources.tolist()):
                index, on = rows[source]
                on = on and index < len(self.reference) and self.reference[index] == token
                rows.append((index + 1, on))
                lp, i = self._children(index + 1, on, top_k)
                logps.append(lp)
                ids.append(i)
            return torch.stack(logps), torch.stack(ids)

        root = (tokens[-1], *self._children(root_index, on_path, top_k))
        return Proposal(grow_each([root], plan, expand_row), [0])
