"""Tree policies: how big each round's draft trees are.

The engine asks `policy.size(report, contexts)` before every round, handing it the last round's `RoundReport`
(what was proposed and accepted, how long each phase took) and every row's committed length; it answers with a
`TreePlan`: whether to draft at all this round, each row's tree spec, and optionally a sizer per row that the
drafter asks for once it knows how many tokens the row's catch-up read (the sizer then picks the tree level by
level, see tree.TreeGrowth). A policy keeps its statistics inside; nobody else writes them.

`FixedTree` is the trivial policy (every round the same spec); autotree.AutoTree is the cost-aware one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from eagle3.decoding.tree import DraftTree, SizePolicy, TreeSpec


@dataclass
class TreePlan:
    """A round's trees: drafted or not, a spec per row, and the sizers made for it (kept for the report)."""

    specs: list[TreeSpec]
    make_sizer: Callable[[int, int], SizePolicy] | None = None  # (row, tokens its catch-up read) -> sizer
    drafted: bool = True  # False: a plain round, every tree the root alone
    sizers: dict[int, SizePolicy] = field(default_factory=dict)
    # What verifying 1, 2, ... tree tokens per row costs this round (ms), as the policy prices it, computed when
    # asked (only lookup chains ask, pld.py); None where the policy does not price rounds.
    verify_prices: Callable[[], np.ndarray] | None = None

    def sizer(self, row: int, read: int) -> SizePolicy | None:
        """The sizer of a row's tree (None: the spec's fixed sizes)."""
        if self.make_sizer is None:
            return None
        self.sizers[row] = self.make_sizer(row, read)
        return self.sizers[row]


@dataclass(frozen=True)
class RoundReport:
    """What a round did: its plan, the verified trees, each row's accepted draft tokens, the phases' wall time."""

    plan: TreePlan
    trees: list[DraftTree]
    paths: list[list[int]]  # per row: the accepted nodes, the root first
    contexts: list[int]  # per row: committed tokens before the round
    draft_ms: float
    verify_ms: float

    @property
    def accepted(self) -> list[int]:
        """Per row: the accepted draft tokens (the accepted path's depth)."""
        return [len(path) - 1 for path in self.paths]


class TreePolicy(Protocol):
    def size(self, report: RoundReport | None, contexts: list[int]) -> TreePlan: ...


@dataclass
class FixedTree:
    """The same tree spec every round (the root alone: plain rounds)."""

    spec: TreeSpec

    def size(self, report: RoundReport | None, contexts: list[int]) -> TreePlan:
        return TreePlan([self.spec] * len(contexts), drafted=self.spec.total_tokens > 1)
