"""Cost-aware tree sizing (`--tree auto`): each round, the tree that maximizes expected tokens per second.

As in EAGLE-2, the expected number of accepted draft tokens of a tree is the sum over its nodes of the
probability that the node is accepted, estimated by the node's cumulative draft probability. As in CAST
("Inference-Cost-Aware Dynamic Tree Construction", 2025), the tree's size and depth are chosen against what
the round costs on this hardware (cost.py): a round that drafts d levels and verifies n tree tokens yields

    rate(n, d) = (1 + sum of the n - 1 best node estimates) / (draft time(d levels) + verify time(n))

tokens per ms. After each drafted level the best n is recomputed; drafting goes one level deeper only while
the newest level is part of the best tree (a child never scores above its parent, so once a level adds
nothing, deeper ones cannot either), and then expands only the newest level's nodes in that tree (a draft
step over many nodes costs more than one over a single node).

Draft probabilities are miscalibrated (usually optimistic), so estimates are corrected online: per depth, the
ratio of acceptances observed to acceptances predicted over recent rounds scales that depth's estimates.
The nodes kept are still the best by draft score, so the kept set always contains every node's parent.

Costs are corrected online too: the cost model is measured once, on a machine whose speed drifts (a shared
machine's memory bandwidth varies; docs/results/2026-11-22-calibration.md shows how far), and it leaves out
the loop's own work. So the decoding loop reports the wall time of each round's
two phases, drafting and verifying; the ratio of observed to predicted time scales the draft predictions, and
the verify predictions per tree size (pooled in buckets, each starting from the ratio over all sizes, capped
at 1 so that sizes not yet seen get tried when the ones seen are slow).

A round whose best tree, drafting included, is expected to yield fewer tokens per ms than a plain step pauses
drafting for a while (see should_draft), so drafting costs about what plain decoding costs where it does not
pay, up to the rounds spent finding that out. Design notes and measurements: docs/design/cost-aware-trees.md.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

from eagle3.cost import CostModel
from eagle3.tree import best_first


@dataclass
class TimeRatio:
    """Observed / predicted time of one phase of a round, over recent rounds (decayed sums)."""

    observed: float = 0.0
    predicted: float = 0.0
    rounds: float = 0.0

    def add(self, observed_ms: float, predicted_ms: float, decay: float) -> None:
        self.observed = decay * self.observed + observed_ms
        self.predicted = decay * self.predicted + predicted_ms
        self.rounds = decay * self.rounds + 1

    def scale(self, prior_rounds: float, prior_ratio: float = 1.0) -> float:
        """The ratio after prior_rounds of ratio prior_ratio (prior_ratio before any round)."""
        if self.rounds == 0 or self.predicted == 0:
            return prior_ratio
        prior = prior_rounds * self.predicted / self.rounds
        return (self.observed + prior * prior_ratio) / (self.predicted + prior)


# Tree sizes whose verify times are pooled for the per-size correction (a size counts toward the first bucket
# at or above it): verification cost is far from linear on a CPU (matrix kernels change with the row count).
VERIFY_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64)


def verify_bucket(n: int) -> int:
    return min(bisect_left(VERIFY_BUCKETS, n), len(VERIFY_BUCKETS) - 1)


@dataclass
class AutoTree:
    cost: CostModel
    max_tokens: int = 64  # caps, so that a wildly optimistic draft cannot build a huge tree
    max_depth: int = 8  # (the tree's top-k cap is the TreeSpec's, applied by grow_tree)
    decay: float = 0.95  # weight of the past in the per-depth corrections (about 20 rounds of memory)
    prior_rounds: float = 2.0  # pseudo-rounds of ratio 1 before any observation
    context: int = 256  # cached tokens, for the verify cost (set per round by the decoding loop)
    catch_up: int = 1  # tokens the draft catches up on this round (set per round too: more after a pause)
    predicted: list[float] = field(default_factory=list)  # per depth (1-based at index d-1), decayed sums
    observed: list[float] = field(default_factory=list)
    max_pause: int = 16
    pause: int = 0  # plain rounds left before drafting again
    backoff: int = 1  # the next pause's length: doubles while drafting keeps not paying
    phase_time: dict[str, TimeRatio] = field(default_factory=lambda: {"draft": TimeRatio(), "verify": TimeRatio()})
    verify_time: list[TimeRatio] = field(default_factory=lambda: [TimeRatio() for _ in VERIFY_BUCKETS])  # per size
    predicted_ms: tuple[float, float] = (0.0, 0.0)  # the round under way's (draft, verify) ms, as chosen by keep
    _verify_tables: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _bucket_of_size: np.ndarray = field(init=False, repr=False)  # [max_tokens]: size n's bucket at n - 1

    def __post_init__(self) -> None:
        self._bucket_of_size = np.array([verify_bucket(n) for n in range(1, self.max_tokens + 1)])

    def should_draft(self) -> bool:
        """False for a few rounds after a round whose best tree was the root alone: then even drafting costs
        more than it can win, so the decoding loop runs plain steps (the draft catches up later, in one step).
        The pause doubles each time drafting still does not pay, so a hopeless stretch of text costs about
        what plain decoding costs."""
        if self.pause > 0:
            self.pause -= 1
            self.predicted_ms = (0.0, float(self._verify_ms()[0]))
            return False
        return True

    def cost_scale(self, phase: str) -> float:
        """Observed / predicted time of a round's "draft" or "verify" phase."""
        return self.phase_time[phase].scale(self.prior_rounds)

    def verify_scales(self) -> np.ndarray:
        """Observed / predicted verify time per tree size 1..max_tokens: each size bucket's own ratio, starting
        from (and pulled toward) the ratio over all sizes until the bucket has been seen a few times; but never
        from above 1 (a size not yet seen is assumed no slower than calibrated, so that it gets tried when the
        sizes seen so far are slow, and then priced as seen)."""
        prior = min(self.cost_scale("verify"), 1.0)
        per_bucket = np.array([r.scale(self.prior_rounds, prior) for r in self.verify_time])
        return per_bucket[self._bucket_of_size]

    def correction(self, depth: int) -> float:
        """Observed / predicted acceptances at a tree depth (1 = the root's children)."""
        if depth > len(self.predicted):
            return 1.0
        prior = self.prior_rounds
        return (self.observed[depth - 1] + prior) / (self.predicted[depth - 1] + prior)

    def estimates(self, scores: np.ndarray, levels: np.ndarray) -> np.ndarray:
        """Corrected acceptance estimates of candidate nodes from cumulative log-probs and depths."""
        factors = np.array([self.correction(d) for d in range(1, int(levels.max()) + 1)])
        return np.minimum(np.exp(scores) * factors[levels - 1], 1.0)

    def keep(self, scores: np.ndarray, levels: np.ndarray, expanded: list[int]) -> tuple[int, int]:
        """(nodes to keep besides the root, how many of the newest level's best nodes to expand next, 0 for
        none), for the candidates so far; `expanded` holds the node count of each tree level drafted so far
        (the root's children, level 1, come from the catch-up step, so len(expanded) + 1 levels are drafted).

        Keep: the best rate with the drafting already done counted whole (it is spent). Expand: the newest
        level's nodes in the best tree that charges each size just the levels it needs, if the cap allows.
        Once the round's tree is final, drafting pauses if that tree is expected to pay less than a plain step.
        """
        levels_drafted = len(expanded) + 1
        order = best_first(scores)[: self.max_tokens - 1]
        gains = np.concatenate([[0.0], self.estimates(scores[order], levels[order]).cumsum()])
        level_ms = np.cumsum([0.0] + [self.cost.draft(n) for n in [self.catch_up, *expanded]])
        needed = np.concatenate([[1], np.maximum.accumulate(levels[order])])
        verify_ms = self._verify_ms()[: len(gains)]
        draft_scale, verify_scaled = self.cost_scale("draft"), verify_ms * self.verify_scales()[: len(gains)]
        best = int(np.argmax((1.0 + gains) / (draft_scale * level_ms[levels_drafted] + verify_scaled)))
        best_needed = int(np.argmax((1.0 + gains) / (draft_scale * level_ms[needed] + verify_scaled)))
        newest_used = int((levels[order[:best_needed]] == levels_drafted).sum())
        expand = newest_used if levels_drafted < self.max_depth else 0
        # The round's phases as the cost model has them (the last call's are the round's), for observe.
        self.predicted_ms = (float(level_ms[levels_drafted]), float(verify_ms[best]))
        if expand == 0:  # the round's final choice: would such rounds pay? (their catch-up is a token or two)
            steady_draft_ms = self.predicted_ms[0] - self.cost.draft(self.catch_up) + self.cost.draft(1)
            drafted_ms = draft_scale * steady_draft_ms + float(verify_scaled[best])
            drafted_rate, plain_rate = (1.0 + float(gains[best])) / drafted_ms, 1.0 / float(verify_scaled[0])
            if best == 0 or drafted_rate < plain_rate:
                self.pause, self.backoff = self.backoff, min(2 * self.backoff, self.max_pause)
            else:
                self.backoff = 1
        return best, expand

    def _verify_ms(self) -> np.ndarray:
        """Verify cost of 1..max_tokens tree tokens at the current context (tabled per 64 tokens of context)."""
        bucket = self.context // 64
        if bucket not in self._verify_tables:
            context = bucket * 64 + 32
            ms = np.array([self.cost.verify(n, context) for n in range(1, self.max_tokens + 1)])
            self._verify_tables[bucket] = ms.clip(min=1e-3)  # (a tiny model can measure 0 ms: rates stay finite)
        return self._verify_tables[bucket]

    def observe(self, depths: Tensor, scores: Tensor, accepted_depth: int,
                phases_ms: tuple[float, float] | None = None) -> None:  # fmt: skip
        """After verification: the verified tree's node depths and draft scores, how deep the accepted path
        went (0: no draft token accepted), and if measured the wall time of the round's (draft, verify) phases
        (a plain step drafts nothing: 0)."""
        if phases_ms is not None:
            for phase, observed, predicted in zip(("draft", "verify"), phases_ms, self.predicted_ms):
                if predicted > 0:
                    self.phase_time[phase].add(observed, predicted, self.decay)
            if self.predicted_ms[1] > 0:
                self.verify_time[verify_bucket(len(depths) + 1)].add(phases_ms[1], self.predicted_ms[1], self.decay)
        depths, probs = np.asarray(depths), np.exp(np.asarray(scores, dtype=np.float64))
        depth_max = int(depths.max()) if len(depths) else 0
        while len(self.predicted) < depth_max:
            self.predicted.append(0.0)
            self.observed.append(0.0)
        per_depth = np.bincount(depths, weights=probs, minlength=depth_max + 1)
        for d in range(1, depth_max + 1):
            self.predicted[d - 1] = self.decay * self.predicted[d - 1] + min(float(per_depth[d]), 1.0)
            self.observed[d - 1] = self.decay * self.observed[d - 1] + float(accepted_depth >= d)


def auto_tree(target, drafter, spec) -> AutoTree:
    """An AutoTree for a target and EAGLE-3 drafter, on this machine's cost model (measured once, cached)."""
    from eagle3.cost import calibrate

    draft = getattr(drafter, "draft", None)
    if draft is None:
        raise ValueError("--tree auto needs an EAGLE-3 draft (its cost is part of the model); give a fixed tree")
    return AutoTree(calibrate(target, draft), max_tokens=spec.total_tokens, max_depth=spec.depth)
