"""The dynamic draft tree (EAGLE-2): grow it from the draft's proposals, keep the most probable nodes.

From the root (the last accepted token), expand `depth` levels: every frontier node proposes its top_k
children, scored by cumulative draft log-probability, and the best top_k children of the level become the next
frontier. Finally the best `total_tokens - 1` nodes over all levels are kept. Sorting by score (ties broken by
creation order) keeps every parent before its children, since a child never scores above its parent.

The drafter is reached through one callback, so this module knows nothing about networks:
`expand(tokens [k], source_rows [k], depth, mask [k, rows]) -> (log-probs [k, k'], token ids [k, k'])`
runs the draft on k frontier nodes and returns each node's top children. A node's "source row" is the row
of the draft step whose output proposed it (row 0: the root step); expanded frontier nodes become rows
1, 2, ... in order, and `mask` says which of those rows (plus the new ones) each new node may attend to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
from torch import Tensor

Expand = Callable[[Tensor, Tensor, int, Tensor], tuple[Tensor, Tensor]]
MAX_TREE = (1024, 64, 64)  # caps on total tokens, depth and top-k: a verification is one forward pass


@dataclass(frozen=True)
class TreeSpec:
    total_tokens: int = 60  # tree size including the root (the EAGLE eval scripts' defaults)
    depth: int = 5
    top_k: int = 10
    auto: bool = False  # sizes are caps; each round's tree is chosen by the cost model (autotree.py)

    def __post_init__(self) -> None:
        sizes = (self.total_tokens, self.depth, self.top_k)
        if not all(1 <= s <= cap for s, cap in zip(sizes, MAX_TREE)):
            raise ValueError(f"tree sizes must be in [1, {MAX_TREE[0]}] tokens, [1, {MAX_TREE[1]}] levels and [1, "
                             f"{MAX_TREE[2]}] children, got total {self.total_tokens}, depth {self.depth}, "
                             f"top-k {self.top_k}")  # fmt: skip

    @property
    def label(self) -> str:
        return "auto" if self.auto else f"{self.total_tokens},{self.depth},{self.top_k}"

    @classmethod
    def parse(cls, text: str) -> "TreeSpec":
        """'TOTAL,DEPTH,TOPK', e.g. '60,5,10', or 'auto' (cost-aware, within 64 tokens, depth 8, top-k 8)."""
        if text.strip().lower() == "auto":
            return AUTO_TREE
        try:
            total, depth, top_k = (int(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"a tree is auto or TOTAL,DEPTH,TOPK (three integers, e.g. 60,5,10), got {text!r}") from None
        return cls(total, depth, top_k)


AUTO_TREE = TreeSpec(64, 8, 8, auto=True)
PLAIN = TreeSpec(1, 1, 1)  # the root alone: a plain decoding step


@dataclass
class DraftTree:
    tokens: Tensor  # [N] target token ids; node 0 is the root
    parents: list[int]  # parent node of each node (-1 for the root)
    depths: Tensor  # [N] root 0
    mask: Tensor  # [N, N] bool: node i sees node j iff j is i or an ancestor of i
    children: list[list[int]]  # per node, its children, most probable first
    scores: Tensor  # [N] cumulative draft log-probability (root 0)

    @property
    def size(self) -> int:
        return len(self.parents)


_ROOT_DEPTHS, _ROOT_MASK, _ROOT_SCORES = torch.zeros(1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool), torch.zeros(1)


def root_only(root_token: int) -> DraftTree:
    """The tree of a plain step: the root alone (verifying it is one ordinary decoding step). Its depths, mask
    and scores are shared, read-only tensors (a plain step makes one of these per token)."""
    return DraftTree(torch.tensor([root_token], dtype=torch.long), [-1], _ROOT_DEPTHS, _ROOT_MASK, [[]], _ROOT_SCORES)


def chain(tokens: Tensor) -> DraftTree:
    """A tree that is one path: each node the child of the one before (a cost measurement's tree)."""
    n = len(tokens)
    parents = list(range(-1, n - 1))
    return DraftTree(tokens, parents, torch.arange(n), ancestor_mask(parents), [[i + 1] for i in range(n - 1)] + [[]],
                     torch.zeros(n))  # fmt: skip


def ancestor_mask(parents: list[int]) -> Tensor:
    """[N, N] bool, True where j is i or an ancestor of i (parents listed before children)."""
    n = len(parents)
    mask = np.eye(n, dtype=bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]
    return torch.from_numpy(mask)


class SizePolicy(Protocol):
    def keep(self, scores: np.ndarray, levels: np.ndarray, expanded: list[int]) -> tuple[int, int]: ...


class TreeGrowth:
    """One row's tree while it grows, level by level: which frontier nodes to expand next, the children they
    got, and finally the best nodes. The bookkeeping is a few hundred numbers: it stays on the host, in numpy,
    where an op on them costs a microsecond (a torch op costs ten, and a round runs hundreds of them).

    With a sizer (autotree.AutoTree), after each level it says how many nodes to keep and how many of the newest
    level's best nodes to expand (0: stop), knowing how many were expanded at each level so far; the spec's
    sizes are then caps.
    """

    def __init__(self, root_token: int, root_logp: Tensor, root_ids: Tensor, spec: TreeSpec,
                 sizer: SizePolicy | None = None):  # fmt: skip
        self.root_token, self.spec, self.sizer = root_token, spec, sizer
        k = spec.top_k
        self.keep = spec.total_tokens - 1
        # Candidates (every proposed node), in creation order: cumulative score, token, level, source row.
        self.scores = root_logp[:k].float().cpu().numpy()
        self.tokens = root_ids[:k].cpu().numpy()
        self.levels = np.ones(len(self.scores), dtype=np.int64)
        self.sources = np.zeros(len(self.scores), dtype=np.int64)
        self.frontier = np.arange(len(self.scores))  # candidate indices of the current frontier
        self.row_candidate = [-1]  # candidate expanded by each draft row; row 0 is the root step
        self.row_mask = np.ones((1, 1), dtype=bool)  # row i may attend to row j
        self.expanded: list[int] = []  # frontier nodes expanded per level (the draft step sizes after the root's)
        self.depth = 0  # levels expanded so far
        self.done = False

    def next_level(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """(tokens [k], source rows [k], mask [k, rows]) of the frontier nodes to expand next, or None when
        the tree is complete: mask[i, j] says whether new node i sees draft row j (row 0 is the root step; the
        last k rows are the new nodes themselves)."""
        if self.done:
            return None
        self.depth += 1
        if self.sizer is not None:
            wanted, expand_count = self.sizer.keep(self.scores, self.levels, self.expanded)
            self.keep = min(wanted, self.spec.total_tokens - 1)
            if expand_count < 1:
                self.done = True
                return None
            self.frontier = np.sort(self.frontier[best_first(self.scores[self.frontier])[:expand_count]])
        if self.depth == self.spec.depth or self.keep < 1 or len(self.frontier) == 0:  # (no frontier: ran out)
            self.done = True
            return None
        frontier, row_mask = self.frontier, self.row_mask
        old, new = len(row_mask), len(frontier)
        grown = np.zeros((old + new, old + new), dtype=bool)
        grown[:old, :old] = row_mask
        grown[old:, :old] = row_mask[self.sources[frontier]]  # a new row sees its source's ancestry ...
        grown[old:, old:] = np.eye(new, dtype=bool)  # ... and itself
        self.row_mask = grown
        self.row_candidate += frontier.tolist()
        self.expanded.append(new)
        return (torch.from_numpy(self.tokens[frontier]), torch.from_numpy(self.sources[frontier]),
                torch.from_numpy(np.ascontiguousarray(grown[old:])))  # fmt: skip

    def add_children(self, child_logp: Tensor, child_ids: Tensor) -> None:
        """The expanded nodes' top children (log-probs and target ids [k, k'])."""
        child_logp, child_ids = child_logp.float().cpu().numpy(), child_ids.cpu().numpy()
        old = len(self.row_mask) - len(self.frontier)
        first = len(self.scores)
        level_scores = (self.scores[self.frontier][:, None] + child_logp).reshape(-1)
        self.scores = np.concatenate([self.scores, level_scores])
        self.tokens = np.concatenate([self.tokens, child_ids.reshape(-1)])
        self.levels = np.concatenate([self.levels, np.full(len(level_scores), self.depth + 1, dtype=np.int64)])
        self.sources = np.concatenate([self.sources, np.arange(old, old + len(self.frontier)).repeat(child_logp.shape[1])])
        self.frontier = first + np.sort(best_first(level_scores)[: self.spec.top_k])

    def finish(self) -> DraftTree:
        """The tree of the best nodes (parents before children, children most probable first)."""
        keep = min(self.keep, len(self.scores))
        chosen = np.sort(best_first(self.scores)[:keep])
        node_of_candidate = {c: i + 1 for i, c in enumerate(chosen.tolist())}
        parents = [-1] + [0 if s == 0 else node_of_candidate[self.row_candidate[s]] for s in self.sources[chosen].tolist()]
        node_scores = np.concatenate([np.zeros(1, dtype=np.float32), self.scores[chosen]])
        by_score = node_scores.tolist()
        children: list[list[int]] = [[] for _ in parents]
        for node in sorted(range(1, len(parents)), key=lambda i: -by_score[i]):
            children[parents[node]].append(node)
        return DraftTree(
            tokens=torch.from_numpy(np.concatenate([[self.root_token], self.tokens[chosen]]).astype(np.int64)),
            parents=parents,
            depths=torch.from_numpy(np.concatenate([np.zeros(1, dtype=np.int64), self.levels[chosen]])),
            mask=ancestor_mask(parents),
            children=children,
            scores=torch.from_numpy(node_scores),
        )


# The batched expand: for the rows that expand this level, each row's (tokens, source rows, mask) as in
# TreeGrowth.next_level -> each row's (log-probs, target ids) of its nodes' top children.
ExpandRows = Callable[[list[int], list[tuple[Tensor, Tensor, Tensor]], int], list[tuple[Tensor, Tensor]]]


def grow_trees(growths: list[TreeGrowth], expand: ExpandRows) -> list[DraftTree]:
    """Grows every row's tree level by level, one expand call per level for all rows still growing."""
    depth = 0
    while True:
        depth += 1
        levels = [(row, level) for row, g in enumerate(growths) if (level := g.next_level()) is not None]
        if not levels:
            return [g.finish() for g in growths]
        children = expand([row for row, _ in levels], [level for _, level in levels], depth)
        for (row, _), (logp, ids) in zip(levels, children):
            growths[row].add_children(logp, ids)


def grow_tree(
    root_token: int, root_logp: Tensor, root_ids: Tensor, expand: Expand, spec: TreeSpec, policy: SizePolicy | None = None
) -> DraftTree:
    """One tree (see TreeGrowth), its levels expanded by expand(tokens, source rows, depth, mask)."""
    growth = TreeGrowth(root_token, root_logp, root_ids, spec, policy)
    return grow_trees([growth], lambda rows, levels, depth: [expand(levels[0][0], levels[0][1], depth, levels[0][2])])[0]


def best_first(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score; on equal scores the earlier candidate (a parent before its child) first."""
    return np.argsort(-scores, kind="stable")
