"""The dynamic draft tree (EAGLE-2): grow it from the draft's proposals, keep the most probable nodes; or a
static tree (EAGLE-1, Medusa): the same paths of child ranks every round.

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
    # A static tree (EAGLE-1's and Medusa's kind): the same paths every round, each a tuple of child ranks
    # from the root ((0, 1): the root's most probable child's second child); sizes follow from them.
    static: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if self.static:
            check_static_paths(self.static)
            sizes = (len(self.static) + 1, max(map(len, self.static)), 1 + max(max(p) for p in self.static))
            if (self.total_tokens, self.depth, self.top_k) != sizes or self.auto:
                raise ValueError(f"a static tree of {len(self.static)} paths is {sizes[0]} tokens, {sizes[1]} levels and "
                                 f"{sizes[2]} children; use static_tree()")  # fmt: skip
        sizes = (self.total_tokens, self.depth, self.top_k)
        if not all(1 <= s <= cap for s, cap in zip(sizes, MAX_TREE)):
            raise ValueError(f"tree sizes must be in [1, {MAX_TREE[0]}] tokens, [1, {MAX_TREE[1]}] levels and [1, "
                             f"{MAX_TREE[2]}] children, got total {self.total_tokens}, depth {self.depth}, "
                             f"top-k {self.top_k}")  # fmt: skip

    @property
    def label(self) -> str:
        if self.static:
            return f"static:{len(self.static)}"
        return "auto" if self.auto else f"{self.total_tokens},{self.depth},{self.top_k}"

    @classmethod
    def parse(cls, text: str) -> "TreeSpec":
        """'TOTAL,DEPTH,TOPK', e.g. '60,5,10'; 'auto' (cost-aware, within 64 tokens, depth 8, top-k 8); or
        'static:N', the static tree of N draft tokens (static_tree)."""
        if text.strip().lower() == "auto":
            return AUTO_TREE
        if text.strip().lower().startswith("static:"):
            try:
                n = int(text.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"a static tree is static:N (N draft tokens, e.g. static:10), got {text!r}") from None
            return static_tree(n)
        try:
            total, depth, top_k = (int(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"a tree is auto or TOTAL,DEPTH,TOPK (three integers, e.g. 60,5,10), got {text!r}") from None
        return cls(total, depth, top_k)


AUTO_TREE = TreeSpec(64, 8, 8, auto=True)
PLAIN = TreeSpec(1, 1, 1)  # the root alone: a plain decoding step

# The acceptance a static tree is built for: a node's child of rank r is accepted with probability
# FIRST * RATIO^r whatever its depth (a prior; Medusa calibrates such rates per head on data).
STATIC_PRIOR = (0.6, 0.4)


def check_static_paths(paths: tuple[tuple[int, ...], ...]) -> None:
    """A static tree's paths must be distinct, each with its parent path listed before it."""
    seen: set[tuple[int, ...]] = set()
    for path in paths:
        if not path or len(path) > MAX_TREE[1] or min(path) < 0 or max(path) >= MAX_TREE[2] or path in seen:
            raise ValueError(f"static tree path {path} is empty, out of range or repeated")
        if len(path) > 1 and path[:-1] not in seen:
            raise ValueError(f"static tree path {path} comes before its parent {path[:-1]}")
        seen.add(path)
    if len(paths) + 1 > MAX_TREE[0]:
        raise ValueError(f"a static tree holds at most {MAX_TREE[0] - 1} paths, got {len(paths)}")


def static_tree(n: int, max_depth: int = 8) -> TreeSpec:
    """The static tree of n draft tokens most likely accepted under STATIC_PRIOR (Medusa's construction: add the
    path of highest expected acceptance, one at a time), at most max_depth deep; paths listed by level."""
    if not 1 <= n < MAX_TREE[0]:
        raise ValueError(f"a static tree holds 1 to {MAX_TREE[0] - 1} draft tokens, got {n}")
    first, ratio = STATIC_PRIOR
    frontier = {(0,): np.log(first)}  # candidate paths -> log-probability of being accepted
    chosen: list[tuple[int, ...]] = []
    while len(chosen) < n:
        path = max(frontier, key=lambda p: (frontier[p], -len(p), [-r for r in p]))
        score = frontier.pop(path)
        chosen.append(path)
        frontier[path[:-1] + (path[-1] + 1,)] = score + np.log(ratio)  # its next sibling
        if len(path) < max_depth:
            frontier[path + (0,)] = score + np.log(first)  # its first child
    paths = tuple(sorted(chosen, key=lambda p: (len(p), p)))
    return TreeSpec(n + 1, max(map(len, paths)), 1 + max(max(p) for p in paths), static=paths)


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
        # A static tree: each candidate's path of child ranks, and the paths the tree keeps or expands.
        self.paths: list[tuple[int, ...]] = [(r,) for r in range(len(self.scores))]
        self.static = set(spec.static)
        self.expandable = {p[:i] for p in spec.static for i in range(1, len(p))}
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
        if self.static:
            self.frontier = np.array([c for c in self.frontier.tolist() if self.paths[c] in self.expandable], dtype=np.int64)
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
        if self.static:  # (next_level keeps the nodes the static tree expands)
            self.paths += [self.paths[f] + (r,) for f in self.frontier.tolist() for r in range(child_logp.shape[1])]
            self.frontier = first + np.arange(len(level_scores))
        else:
            self.frontier = first + np.sort(best_first(level_scores)[: self.spec.top_k])

    def finish(self) -> DraftTree:
        """The tree of the best nodes (parents before children, children most probable first)."""
        if self.static:
            chosen = np.array([c for c, path in enumerate(self.paths) if path in self.static], dtype=np.int64)
        else:
            chosen = np.sort(best_first(self.scores)[: min(self.keep, len(self.scores))])
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
