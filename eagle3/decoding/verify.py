"""Verification: which path of the draft tree the target accepts, and the token it adds after it.

The target has scored every tree node in one forward pass (node i's logits predict the token after node i).
Greedy: follow the children that equal the target's argmax. Sampling: recursive rejection for deterministic
drafts, which leaves the output distributed exactly as the target's: at each node try the children in order,
accepting child x with probability p(x); on rejection set p(x) = 0 and renormalize; when every child is
rejected, draw the next token from what is left of p. Both walk the tree on the host, over numbers fetched
from the device in one go per row (greedy: every node's argmax; sampling: each child's probability and a
uniform).
"""

from __future__ import annotations

import torch
from torch import Tensor

from eagle3.decoding.sampling import SamplingParams, probs_from_logits, sample_from_probs
from eagle3.decoding.tree import DraftTree


def accept_greedy(tree: DraftTree, logits: Tensor) -> tuple[list[int], int]:
    """(accepted node path from the root, the target's next token after it) for logits [N, V]."""
    return follow_greedy(tree, logits.argmax(dim=-1).tolist())


def follow_greedy(tree: DraftTree, best: list[int]) -> tuple[list[int], int]:
    """The greedy path for the target's argmax `best` of every node (at least the tree's nodes)."""
    tokens = tree.tokens.tolist()
    path = [0]
    while True:
        node = path[-1]
        child = next((c for c in tree.children[node] if tokens[c] == best[node]), None)
        if child is None:
            return path, best[node]
        path.append(child)


def accept_sampling(
    tree: DraftTree, logits: Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[list[int], int]:
    """Recursive rejection sampling over the tree; the returned tokens follow the target's distribution.

    The walk runs on the host over numbers fetched in one go: every node's distribution is computed at once,
    and every child's probability under its parent and one uniform per child come to the host together (one
    device sync); the last step draws from the residual (a second). Trying the children of a node in order,
    after rejecting siblings of mass R the next child x is accepted with probability p(x) / (1 - R), which is
    p(x) renormalized after zeroing the rejected ones.
    """
    probs = probs_from_logits(logits[: tree.size], params)  # [N, V]
    edges = [(node, child) for node, children in enumerate(tree.children) for child in children]
    if edges:
        parents = torch.tensor([node for node, _ in edges], device=probs.device)
        children = tree.tokens[[child for _, child in edges]].to(probs.device)
        uniforms = torch.rand(len(edges), generator=generator, device=probs.device)
        edge_p, edge_u = torch.stack([probs[parents, children], uniforms]).tolist()
        index = {child: i for i, (_, child) in enumerate(edges)}
    path = [0]
    while True:
        node, rejected, accepted = path[-1], [], None
        for child in tree.children[node]:
            p, u = edge_p[index[child]], edge_u[index[child]]
            remaining = 1.0 - sum(edge_p[index[c]] for c in rejected)
            # (a child holding all that is left is accepted surely, whatever float rounding says)
            if p > 0 and (p >= remaining * (1 - 1e-6) or u * remaining < p):
                accepted = child
                break
            rejected.append(child)
        if accepted is None:
            residual = probs[node]
            if rejected:
                residual = residual.index_fill(0, tree.tokens[rejected].to(residual.device), 0.0)
            return path, int(sample_from_probs(residual / residual.sum(), generator))
        path.append(accepted)


def accept(
    tree: DraftTree, logits: Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[list[int], int]:
    if params.greedy:
        return accept_greedy(tree, logits)
    return accept_sampling(tree, logits, params, generator)


def accept_rows(
    trees: list[DraftTree], logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[tuple[list[int], int]]:
    """Every row's (accepted path, next token) from one verify forward's logits [B, n, V] (row b's tree
    padded to n): greedy rows through one argmax over the batch, sampling rows each by its own rule."""
    greedy = [b for b, p in enumerate(params) if p.greedy]
    rows = logits if len(greedy) == len(params) else logits[greedy]
    best = rows.argmax(dim=-1).tolist() if greedy else []  # (one device sync for every greedy row)
    out: list[tuple[list[int], int]] = []
    for b, (tree, p, generator) in enumerate(zip(trees, params, generators)):
        if p.greedy:
            out.append(follow_greedy(tree, best[greedy.index(b)]))
        else:
            out.append(accept_sampling(tree, logits[b, : tree.size], p, generator))
    return out
