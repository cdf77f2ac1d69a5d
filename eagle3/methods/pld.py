"""Prompt lookup decoding (PLD): look for the last few tokens earlier in the context and propose what followed
them there, as a chain; no draft model. As a drafter of its own (PromptLookupDrafter) or grafted onto another
drafter's trees (LookupGraft, `--lookup N`): n-gram drafts are strong where text repeats its context
(summaries, code edits, quotes), and cost nothing to propose. Verified by the same lossless tree path."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from eagle3.methods.drafter import Proposal
from eagle3.decoding.policy import TreePlan
from eagle3.decoding.tree import DraftTree, TreeGrowth, TreeSpec, ancestor_mask, grow_trees


class NgramIndex:
    """A token history with, for n = 1 .. max_ngram, where each n-gram last occurred with a token after it;
    updated as tokens arrive, so a lookup is a few dictionary reads instead of a scan of the history."""

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self.last: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram)]  # n - 1 -> n-gram -> start

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.tokens.append(int(token))
            end = len(self.tokens) - 1  # the n-grams ending just before this token now have a continuation
            for n in range(1, min(self.max_ngram, end) + 1):
                self.last[n - 1][tuple(self.tokens[end - n : end])] = end - n

    def lookup(self, num_tokens: int, min_ngram: int = 1) -> list[int]:
        """The tokens that followed the most recent earlier occurrence of the longest suffix n-gram of the history
        (at least min_ngram long) that occurred before, at most num_tokens of them."""
        for n in range(min(self.max_ngram, len(self.tokens) - 1), min_ngram - 1, -1):
            start = self.last[n - 1].get(tuple(self.tokens[len(self.tokens) - n :]))
            if start is not None:
                return self.tokens[start + n : start + n + num_tokens]
        return []


def along(tree: DraftTree, chain: Sequence[int]) -> tuple[int, int]:
    """How far `chain` (tokens after the root) runs along the tree's existing nodes: (the last node it reaches,
    how many of its tokens it matched)."""
    tokens, node, shared = tree.tokens.tolist(), 0, 0
    for token in chain:
        child = next((c for c in tree.children[node] if tokens[c] == token), None)
        if child is None:
            break
        node, shared = child, shared + 1
    return node, shared


def graft_chain(tree: DraftTree, chain: Sequence[int], logp: Sequence[float]) -> tuple[DraftTree, int]:
    """The tree with `chain` (tokens after the root) merged in: it follows existing nodes while they agree and
    adds new nodes from where it departs (each after its parent's existing children); a new node's score is
    its parent's plus logp[i] (the chain token's log-probability of acceptance). Returns the tree and how many
    nodes were added."""
    node, shared = along(tree, chain)
    if shared == len(chain):
        return tree, 0
    tokens, parents = tree.tokens.tolist(), list(tree.parents)
    children = [list(c) for c in tree.children]
    depths, scores = tree.depths.tolist(), tree.scores.tolist()
    for token, lp in zip(chain[shared:], logp[shared:]):
        child = len(tokens)
        tokens.append(int(token))
        parents.append(node)
        depths.append(depths[node] + 1)
        scores.append(scores[node] + lp)
        children[node].append(child)
        children.append([])
        node = child
    added = len(chain) - shared
    return DraftTree(torch.tensor(tokens, dtype=torch.long), parents, torch.tensor(depths), ancestor_mask(parents),
                     children, torch.tensor(scores, dtype=torch.float32)), added  # fmt: skip


@dataclass(frozen=True)
class GraftPrice:
    """What the batch's round brings and costs without (more) chains: its expected tokens (per row, 1 + the
    tree's expected accepted draft tokens, summed over the rows), its ms so far and to come (drafting spent,
    verifying its trees), the verify cost of the batch with 1, 2, ... tree tokens per row (ms) that extra nodes
    are priced by, and its largest tree (every row is verified padded to it, so a row's nodes up to that size
    cost nothing and beyond it cost as much for every row)."""

    tokens: float
    ms: float
    verify_ms: np.ndarray
    padded: int = 1

    def after(self, tokens: float, size: int) -> GraftPrice:
        """The price once a row's chain added `tokens` expected tokens and grew its tree to `size` nodes."""
        v = self.verify_ms
        extra_ms = float(v[min(max(self.padded, size), len(v)) - 1] - v[min(self.padded, len(v)) - 1])
        return GraftPrice(self.tokens + tokens, self.ms + extra_ms, v, max(self.padded, size))


# `eagle3 generate`'s chain length with a draft on the auto tree, where the policy prices every chain (measured:
# docs/results/2026-12-04-six-suites-lookup.md). Unpriced (a fixed tree) a chain can cost more than it brings, so
# there it stays opt-in.
DEFAULT_LOOKUP = 4


class LookupGraft:
    """Each row's prompt-lookup chain grafted onto the tree its drafter proposed, in drafted and plain rounds
    alike (a plain round's tree is its root alone): the engine's --lookup. How far a chain goes in rests on the
    estimated chance that it is right that far: how often chain tokens at each position matched what was
    committed (given the ones before matched; counted with one match and one miss to start). With the policy's
    prices (GraftPrice) the chain goes in as far as it raises the round's expected tokens per ms; without them,
    while that chance stays at least `min_prob`. Where lookups keep failing the chains shrink to nothing, and
    verifying costs what it did without them; they come back where lookups start matching again."""

    def __init__(self, num_tokens: int = 4, max_ngram: int = 3, min_prob: float = 0.3):
        self.num_tokens, self.min_prob = num_tokens, min_prob
        self.max_ngram = max_ngram
        self.indexes: list[NgramIndex] = []
        self.pending: list[list[int]] = []  # per row: this round's lookup chain, grafted or not
        self.proposed = np.zeros(num_tokens)  # chain tokens proposed at each position ...
        self.accepted = np.zeros(num_tokens)  # ... and accepted there

    def open(self) -> None:
        self.indexes, self.pending = [], []

    def join(self, row: int, prompt_ids: Sequence[int]) -> None:
        if row != len(self.indexes):
            raise ValueError(f"a new sequence takes row {len(self.indexes)}, not {row}")
        index = NgramIndex(self.max_ngram)
        index.extend(prompt_ids)
        self.indexes.append(index)
        self.pending.append([])

    def release(self, row: int) -> None:
        self.indexes[row], self.pending[row] = self.indexes[-1], self.pending[-1]
        self.indexes.pop()
        self.pending.pop()

    def commit(self, row: int, tokens: Sequence[int]) -> None:
        """A row's newly committed tokens (the first: the token drawn after the prompt): they extend its history,
        and score last round's lookup chain, grafted or not (so a pruned chain's estimates can recover): chain
        token j counts as proposed where the tokens before it matched and the round committed that far, as
        accepted where it matched too."""
        chain = self.pending[row]
        checkable = min(len(chain), len(tokens))
        matched = next((j for j in range(checkable) if chain[j] != tokens[j]), checkable)
        self.proposed[: min(matched + 1, checkable)] += 1
        self.accepted[:matched] += 1
        self.pending[row] = []
        self.indexes[row].extend(tokens)

    def graft(self, row: int, tree: DraftTree, room: int, price: GraftPrice | None = None) -> DraftTree:
        """The row's tree with its lookup chain grafted on, adding at most `room` nodes: with a price, the chain
        prefix that maximizes the round's expected tokens per ms (none, where no prefix pays for its
        verification); without one, the prefix whose estimated chance of being right stays >= min_prob."""
        return self._graft(row, tree, room, price)[0]

    def graft_rows(self, trees: list[DraftTree], rooms: list[int], price: GraftPrice | None = None) -> list[DraftTree]:
        """Every row's tree with its chain grafted on, row after row; with a price (the batch's round), each
        chain weighed against the round as the rows before left it: what it adds to the batch's tokens against
        what it adds to the batch's verify (nothing up to the largest tree, every row's padding beyond)."""
        grafted = []
        for row, (tree, room) in enumerate(zip(trees, rooms)):
            tree, gain = self._graft(row, tree, room, price)
            grafted.append(tree)
            if price is not None:
                price = price.after(gain, tree.size)
        return grafted

    def _graft(self, row: int, tree: DraftTree, room: int, price: GraftPrice | None) -> tuple[DraftTree, float]:
        """graft, and the expected accepted tokens its new nodes add."""
        found = self.indexes[row].lookup(self.num_tokens)
        self.pending[row] = found
        rates = (self.accepted[: len(found)] + 1) / (self.proposed[: len(found)] + 2)
        reach = np.cumprod(rates)  # chance the chain is right through each position
        shared = along(tree, found)[1]  # (chain positions the tree already holds)
        if price is None:
            keep = int(np.sum(reach >= self.min_prob))  # (a product of rates <= 1 only falls)
        else:
            keep = self._paying_prefix(tree, shared, reach, price)
        keep = min(keep, shared + max(room, 0))  # (near the context's end: what still fits)
        gain = float(reach[shared:keep].sum())
        return graft_chain(tree, found[:keep], [math.log(r) for r in rates[:keep]])[0], gain

    @staticmethod
    def _paying_prefix(tree: DraftTree, shared: int, reach: np.ndarray, price: GraftPrice) -> int:
        """The chain length m maximizing (tokens + expected new accepted tokens) / (ms + added verify ms); the
        positions the tree already holds add neither, nor does verify time below the batch's padded size."""
        price = replace(price, padded=max(price.padded, tree.size))  # (its ms verifies this tree as it is)
        best, best_rate = 0, price.tokens / price.ms
        for m in range(shared + 1, len(reach) + 1):
            grown = price.after(float(reach[shared:m].sum()), tree.size + m - shared)
            if grown.tokens / grown.ms > best_rate:
                best, best_rate = m, grown.tokens / grown.ms
        return best


class PromptLookupDrafter:
    """Drafter protocol (see drafter.py) over n-gram matches in each row's token history."""

    tap_layers = ()  # it reads no target features: the decoding loop skips the taps

    def __init__(self, num_tokens: int = 10, max_ngram: int = 3):
        self.num_tokens, self.max_ngram = num_tokens, max_ngram
        self.histories: list[NgramIndex] = []  # per row: the committed tokens (the last one is the next root)

    @property
    def tree(self) -> TreeSpec:
        """A chain: one proposal per level."""
        return TreeSpec(total_tokens=self.num_tokens + 1, depth=self.num_tokens, top_k=1)

    def open(self, max_rows: int, max_len: int) -> None:
        self.histories = []

    def join(self, row: int, prompt_ids: Sequence[int]) -> None:
        self.histories.append(NgramIndex(self.max_ngram))
        self.histories[-1].extend(prompt_ids[:1])  # (the first commit brings the rest of the prompt)

    def release(self, row: int) -> None:
        self.histories[row] = self.histories[-1]
        self.histories.pop()

    def commit(self, row: int, tokens: Tensor, features: Tensor | None) -> None:
        self.histories[row].extend(tokens.tolist())

    def propose(self, plan: TreePlan) -> Proposal:
        proposals = [h.lookup(self.num_tokens) for h in self.histories]

        def children(row: int, depth: int, nodes: int = 1) -> tuple[Tensor, Tensor]:
            if depth < len(proposals[row]):
                return torch.zeros(nodes, 1), torch.tensor([[proposals[row][depth]]] * nodes)
            return torch.zeros(nodes, 0), torch.zeros(nodes, 0, dtype=torch.long)

        growths = [TreeGrowth(h.tokens[-1], *(x[0] for x in children(b, 0)), spec, plan.sizer(b, 0))
                   for b, (h, spec) in enumerate(zip(self.histories, plan.specs))]  # fmt: skip
        trees = grow_trees(growths, lambda rows, levels, depth: [children(row, depth, len(level[0]))
                                                                  for row, level in zip(rows, levels)])  # fmt: skip
        return Proposal(trees, [0] * len(trees))
