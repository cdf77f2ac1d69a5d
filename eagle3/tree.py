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

import torch
from torch import Tensor

Expand = Callable[[Tensor, Tensor, int, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class TreeSpec:
    total_tokens: int = 60  # tree size including the root (the EAGLE eval scripts' defaults)
    depth: int = 5
    top_k: int = 10
    auto: bool = False  # sizes are caps; each round's tree is chosen by the cost model (autotree.py)

    def __post_init__(self) -> None:
        if self.total_tokens < 1 or self.depth < 1 or self.top_k < 1:
            raise ValueError(f"tree sizes must be >= 1, got total {self.total_tokens}, depth {self.depth}, top-k {self.top_k}")

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
            raise ValueError(f"--tree takes auto or TOTAL,DEPTH,TOPK (three integers, e.g. 60,5,10), got {text!r}") from None
        return cls(total, depth, top_k)


AUTO_TREE = TreeSpec(64, 8, 8, auto=True)


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


def root_only(root_token: int) -> DraftTree:
    """The tree of a plain step: the root alone (verifying it is one ordinary decoding step)."""
    return DraftTree(torch.tensor([root_token], dtype=torch.long), [-1], torch.zeros(1, dtype=torch.long),
                     torch.ones(1, 1, dtype=torch.bool), [[]], torch.zeros(1))  # fmt: skip


def ancestor_mask(parents: list[int]) -> Tensor:
    """[N, N] bool, True where j is i or an ancestor of i (parents listed before children)."""
    n = len(parents)
    mask = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]
    return mask


class SizePolicy(Protocol):
    def keep(self, scores: Tensor, levels: Tensor, levels_drafted: int) -> tuple[int, bool]: ...


def grow_tree(
    root_token: int, root_logp: Tensor, root_ids: Tensor, expand: Expand, spec: TreeSpec, policy: SizePolicy | None = None
) -> DraftTree:
    """Builds the draft tree. root_logp / root_ids: the root step's top children (log-probs, target ids).

    With a policy (autotree.AutoTree), after each level it says how many nodes to keep and whether to draft
    deeper; spec's sizes are then caps.
    """
    k = spec.top_k
    keep = spec.total_tokens - 1
    root_logp, root_ids = root_logp.float().cpu(), root_ids.cpu()  # bookkeeping is small: keep it on the host
    # Candidates (every proposed node), in creation order: cumulative score, token, level, source row.
    scores, tokens = [root_logp[:k].float()], [root_ids[:k]]
    levels, sources = [torch.ones(len(scores[0]), dtype=torch.long)], [torch.zeros(len(scores[0]), dtype=torch.long)]
    frontier = torch.arange(len(scores[0]))  # candidate indices of the current frontier
    row_candidate = [-1]  # candidate expanded by each draft row; row 0 is the root step
    row_mask = torch.ones(1, 1, dtype=torch.bool)  # row i may attend to row j
    for depth in range(1, spec.depth + 1):
        if policy is not None:
            wanted, deeper = policy.keep(torch.cat(scores), torch.cat(levels), depth)
            keep = min(wanted, spec.total_tokens - 1)
            if not deeper:
                break
        if depth == spec.depth or keep < 1 or len(frontier) == 0:  # (no frontier: the drafter ran out)
            break
        all_scores, all_tokens, all_sources = torch.cat(scores), torch.cat(tokens), torch.cat(sources)
        old, new = row_mask.shape[0], len(frontier)
        grown = torch.zeros(old + new, old + new, dtype=torch.bool)
        grown[:old, :old] = row_mask
        grown[old:, :old] = row_mask[all_sources[frontier]]  # a new row sees its source's ancestry ...
        grown[old:, old:] = torch.eye(new, dtype=torch.bool)  # ... and itself
        row_mask = grown
        row_candidate += frontier.tolist()
        new_rows = torch.arange(old, old + new)
        # Row 0 (the root step) is already committed in the draft cache: masks cover the tree rows only.
        child_logp, child_ids = expand(all_tokens[frontier], all_sources[frontier], depth, row_mask[old:, 1:])
        child_logp, child_ids = child_logp.float().cpu(), child_ids.cpu()
        first = len(all_scores)
        level_scores = (all_scores[frontier][:, None] + child_logp.float()).reshape(-1)
        scores.append(level_scores)
        tokens.append(child_ids.reshape(-1))
        levels.append(torch.full_like(level_scores, depth + 1, dtype=torch.long))
        sources.append(new_rows.repeat_interleave(child_logp.shape[1]))
        frontier = first + torch.topk(level_scores, min(k, level_scores.numel())).indices.sort().values

    all_scores, all_tokens = torch.cat(scores), torch.cat(tokens)
    all_levels, all_sources = torch.cat(levels), torch.cat(sources)
    keep = min(keep, len(all_scores))
    # Stable: on equal scores the earlier candidate (a parent before its child) wins.
    chosen = torch.sort(all_scores, descending=True, stable=True).indices[:keep].sort().values.tolist()
    node_of_candidate = {c: i + 1 for i, c in enumerate(chosen)}
    parents = [-1]
    for c in chosen:
        source = int(all_sources[c])
        parents.append(0 if source == 0 else node_of_candidate[row_candidate[source]])
    node_scores = torch.cat([torch.zeros(1), all_scores[chosen]])
    children: list[list[int]] = [[] for _ in parents]
    for node in sorted(range(1, len(parents)), key=lambda i: -float(node_scores[i])):
        children[parents[node]].append(node)
    return DraftTree(
        tokens=torch.cat([torch.tensor([root_token], dtype=torch.long), all_tokens[chosen].long().cpu()]),
        parents=parents,
        depths=torch.cat([torch.zeros(1, dtype=torch.long), all_levels[chosen]]),
        mask=ancestor_mask(parents),
        children=children,
        scores=node_scores,
    )
