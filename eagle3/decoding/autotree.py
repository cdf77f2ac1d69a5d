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

Whether to draft at all is decided on what rounds realized: the tokens per ms that drafted rounds actually
yielded (their catch-up beyond a token taken out) against those of plain rounds with as many rows; drafting
pauses while it falls short, for twice as long each time it still does (up to max_pause rounds), so it costs
about what plain decoding costs where it does not pay. A round that pays halves the next pause rather than
resetting it: where drafting pays about as much as plain decoding, one lucky round would otherwise restart a
run of short pauses, each ended by a drafted round and its catch-up. (The drafter's window bounds what a
catch-up after a long pause reads.) Expectations alone stay wrong where they are close (a weak draft on a fast
target), and one round's draft confidence says little about the next round's: a round whose tree is the root
alone still counts, as the drafting it wasted. A plain round every PROBE_EVERY drafted ones keeps the plain
rate current; the drafted rate ages with every round, plain ones too, so that a long pause ends in a judgment
on the text at hand (after a few drafted rounds) rather than on rounds drafted hundreds of tokens before, whose
weight would otherwise lock drafting out for the rest of a run. Until both kinds of round have been seen
recently, a round expected to yield fewer tokens per ms than a plain step pauses drafting.

Batches: B rows each verify their tree in one forward, and each draft level runs every row, so a round costs
what B times as many tokens cost in one row (weight-streaming kernels price rows, not sequences; attention is
the part this leaves out). Each row's tree is sized at those prices, as if every row chose its size: as the
batch grows, verification stops being nearly free and the best trees shrink (the CAST paper's point).

The policy (`AutoTree.size`, see policy.py) absorbs the last round's report and hands out, per row, a
`RoundSizer`: a frozen view of its statistics that picks the row's tree level by level and records what it
chose and predicted, for the next report. Design notes and measurements: docs/design/cost-aware-trees.md.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

import numpy as np

from eagle3.decoding.cost import CostModel
from eagle3.decoding.policy import RoundReport, TreePlan
from eagle3.decoding.tree import PLAIN, TreeSpec, best_first


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


@dataclass
class Throughput:
    """Tokens and wall time of recent rounds of one kind, drafted or plain (decayed sums)."""

    tokens: float = 0.0
    ms: float = 0.0
    rounds: float = 0.0

    def add(self, tokens: float, ms: float, decay: float) -> None:
        self.age(decay)
        self.tokens, self.ms, self.rounds = self.tokens + tokens, self.ms + ms, self.rounds + 1

    def age(self, decay: float) -> None:
        """A round of the other kind went by."""
        self.tokens, self.ms, self.rounds = decay * self.tokens, decay * self.ms, decay * self.rounds

    def rate(self) -> float:
        return self.tokens / max(self.ms, 1e-9)


# Drafted rounds seen (decayed) before their realized tokens per ms decide whether drafting pays.
REALIZED_ROUNDS = 3.0

# Drafted rounds in a row after which one plain round is run, to measure what plain decoding yields now.
PROBE_EVERY = 16

# Tokens per verification (all rows' trees together) whose verify times are pooled for the per-size correction
# (a size counts toward the first bucket at or above it): verification cost is far from linear on a CPU
# (matrix kernels change with the row count).
VERIFY_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def verify_bucket(n: int) -> int:
    return min(bisect_left(VERIFY_BUCKETS, n), len(VERIFY_BUCKETS) - 1)


@dataclass(frozen=True)
class Prices:
    """What a round costs at one batch size and context, as the policy's statistics have it when the round is
    planned: the draft step of n nodes per row, the verification of n tokens per row (scaled by what was seen
    per size), and the acceptance correction per depth."""

    cost: CostModel
    batch: int
    draft_scale: float
    verify_ms: np.ndarray  # [max_tokens]: n tree tokens per row at index n - 1, scaled
    corrections: np.ndarray  # [depths]: observed / predicted acceptances at depth d at index d - 1

    def draft(self, nodes: int) -> float:
        return self.cost.draft(self.batch * nodes)

    def first(self, read: int) -> float:
        """The drafter's first step, every row reading `read` committed tokens."""
        return self.cost.first(self.batch * read)

    def estimates(self, scores: np.ndarray, levels: np.ndarray) -> np.ndarray:
        """Corrected acceptance estimates of candidate nodes from cumulative log-probs and depths."""
        factors = np.ones(int(levels.max()))
        known = min(len(factors), len(self.corrections))
        factors[:known] = self.corrections[:known]
        return np.minimum(np.exp(scores) * factors[levels - 1], 1.0)


class RoundSizer:
    """One row's tree this round (tree.SizePolicy): after each drafted level, how many nodes to keep and how many
    of the newest level's best nodes to expand. It remembers its last choice for the round's report."""

    def __init__(self, prices: Prices, read: int, max_tokens: int, max_depth: int):
        self.prices, self.read, self.max_tokens, self.max_depth = prices, read, max_tokens, max_depth
        self.best = 0  # tree tokens kept besides the root
        self.gain = 0.0  # expected accepted draft tokens of that tree
        self.draft_ms = 0.0  # the drafting its choice took, as predicted (levels drafted, catch-up included)

    def keep(self, scores: np.ndarray, levels: np.ndarray, expanded: list[int]) -> tuple[int, int]:
        """(nodes to keep besides the root, how many of the newest level's best nodes to expand next, 0 for
        none), for the candidates so far; `expanded` holds the node count of each tree level drafted so far
        (the root's children, level 1, come from the catch-up step, so len(expanded) + 1 levels are drafted).

        Keep: the best rate with the drafting already done counted whole (it is spent). Expand: the newest
        level's nodes in the best tree that charges each size just the levels it needs, if the cap allows.
        """
        prices = self.prices
        levels_drafted = len(expanded) + 1
        order = best_first(scores)[: self.max_tokens - 1]
        gains = np.concatenate([[0.0], prices.estimates(scores[order], levels[order]).cumsum()])
        level_ms = np.cumsum([0.0, prices.first(self.read)] + [prices.draft(n) for n in expanded]) * prices.draft_scale
        needed = np.concatenate([[1], np.maximum.accumulate(levels[order])])
        verify_ms = prices.verify_ms[: len(gains)]
        best = int(np.argmax((1.0 + gains) / (level_ms[levels_drafted] + verify_ms)))
        best_needed = int(np.argmax((1.0 + gains) / (level_ms[needed] + verify_ms)))
        newest_used = int((levels[order[:best_needed]] == levels_drafted).sum())
        self.best, self.gain = best, float(gains[best])
        self.draft_ms = float(level_ms[levels_drafted]) / prices.draft_scale
        return best, newest_used if levels_drafted < self.max_depth else 0

    def steady_draft_ms(self) -> float:
        """Its drafting as it costs in a steady run of drafted rounds (a catch-up of one token), unscaled."""
        return self.draft_ms - self.prices.first(self.read) + self.prices.first(1)


@dataclass
class AutoTree:
    """The cost-aware tree policy (policy.TreePolicy): statistics of past rounds in, each round's sizers out."""

    cost: CostModel
    max_tokens: int = 64  # caps, so that a wildly optimistic draft cannot build a huge tree
    max_depth: int = 8
    top_k: int = 8
    decay: float = 0.95  # weight of the past in the per-depth corrections (about 20 rounds of memory)
    prior_rounds: float = 2.0  # pseudo-rounds of ratio 1 before any observation
    predicted: list[float] = field(default_factory=list)  # per depth (1-based at index d-1), decayed sums
    observed: list[float] = field(default_factory=list)
    max_pause: int = 256
    pause: int = 0  # plain rounds left before drafting again
    streak: int = 0  # drafted rounds since the last plain one
    backoff: int = 1  # the next pause's length: doubles while drafting keeps not paying, halves when it pays
    phase_time: dict[str, TimeRatio] = field(default_factory=lambda: {"draft": TimeRatio(), "verify": TimeRatio()})
    verify_time: list[TimeRatio] = field(default_factory=lambda: [TimeRatio() for _ in VERIFY_BUCKETS])  # per size
    realized: dict[int, dict[str, Throughput]] = field(default_factory=dict)  # per batch size: drafted, plain
    _verify_tables: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def spec(self) -> TreeSpec:
        return TreeSpec(self.max_tokens, self.max_depth, self.top_k, auto=True)

    def size(self, report: RoundReport | None, contexts: list[int]) -> TreePlan:
        """The next round's plan after the last round's report: a plain round while drafting is paused, else
        the caps and a RoundSizer per row, priced for this batch."""
        if report is not None:
            self._observe(report)
        batch, context = len(contexts), sum(contexts) // len(contexts)
        if self.pause > 0 or self.streak >= PROBE_EVERY:
            self.pause, self.streak = max(self.pause - 1, 0), 0
            return TreePlan([PLAIN] * batch, drafted=False, verify_prices=lambda: self.verify_prices(context, batch))
        self.streak += 1
        prices = Prices(self.cost, batch, self.cost_scale("draft"), self.verify_prices(context, batch), self._corrections())
        return TreePlan([self.spec] * batch, lambda row, read: RoundSizer(prices, read, self.max_tokens, self.max_depth),
                        verify_prices=lambda: prices.verify_ms)  # fmt: skip

    def realized_at(self, batch: int) -> dict[str, Throughput]:
        """Tokens and time of recent drafted and plain rounds of `batch` rows (a batch's rate is only comparable
        with rounds of as many rows: a server's batch grows and shrinks as requests come and go)."""
        if batch not in self.realized:
            self.realized[batch] = {"drafted": Throughput(), "plain": Throughput()}
        return self.realized[batch]

    def verify_prices(self, context: int, batch: int = 1) -> np.ndarray:
        """What verifying 1..max_tokens tree tokens per row is expected to take now (ms), at a context and batch:
        the cost model's time scaled by what was seen per size."""
        return self._verify_ms(context, batch) * self.verify_scales(batch)

    def cost_scale(self, phase: str) -> float:
        """Observed / predicted time of a round's "draft" or "verify" phase."""
        return self.phase_time[phase].scale(self.prior_rounds)

    def verify_scales(self, batch: int = 1) -> np.ndarray:
        """Observed / predicted verify time per tree size 1..max_tokens (per row, at this batch): each size
        bucket's own ratio, starting from (and pulled toward) the ratio over all sizes until the bucket has been
        seen a few times; but never from above 1 (a size not yet seen is assumed no slower than calibrated, so
        that it gets tried when the sizes seen so far are slow, and then priced as seen)."""
        prior = min(self.cost_scale("verify"), 1.0)
        per_bucket = np.array([r.scale(self.prior_rounds, prior) for r in self.verify_time])
        return per_bucket[[verify_bucket(batch * n) for n in range(1, self.max_tokens + 1)]]

    def correction(self, depth: int) -> float:
        """Observed / predicted acceptances at a tree depth (1 = the root's children)."""
        if depth > len(self.predicted):
            return 1.0
        prior = self.prior_rounds
        return (self.observed[depth - 1] + prior) / (self.predicted[depth - 1] + prior)

    def _corrections(self) -> np.ndarray:
        return np.array([self.correction(d) for d in range(1, len(self.predicted) + 1)])

    def _verify_ms(self, context: int, batch: int) -> np.ndarray:
        """Verify cost of 1..max_tokens tree tokens per row, for a batch at a context (tabled per 64 tokens of
        context): a forward of batch * n tokens."""
        key = (context // 64, batch)
        if key not in self._verify_tables:
            middle = key[0] * 64 + 32
            ms = np.array([self.cost.verify(batch * n, middle) for n in range(1, self.max_tokens + 1)])
            self._verify_tables[key] = ms.clip(min=1e-3)  # (a timer can read zero for a tiny model)
        return self._verify_tables[key]

    def _observe(self, report: RoundReport) -> None:
        """Learns from a round: the phases' time against the prediction, acceptance per depth, and whether
        drafting paid (else drafting pauses, for twice as long each time it still does not)."""
        batch = len(report.trees)
        context = sum(report.contexts) // len(report.contexts)
        size = max(tree.size for tree in report.trees)
        verify_table = self._verify_ms(context, batch)
        predicted_verify = float(verify_table[size - 1])
        sizers = list(report.plan.sizers.values())
        predicted_draft = max((s.draft_ms for s in sizers), default=0.0) if report.plan.drafted else 0.0
        for phase, observed, predicted in (("draft", report.draft_ms, predicted_draft),
                                           ("verify", report.verify_ms, predicted_verify)):  # fmt: skip
            if predicted > 0:
                self.phase_time[phase].add(observed, predicted, self.decay)
        self.verify_time[verify_bucket(batch * size)].add(report.verify_ms, predicted_verify, self.decay)
        round_ms = report.draft_ms + report.verify_ms
        accepted = report.accepted
        tokens = sum(1 + a for a in accepted)
        realized = self.realized_at(batch)
        if not report.plan.drafted:  # (a grafted lookup chain can add accepted tokens to a plain round)
            realized["plain"].add(tokens, round_ms, self.decay)
            realized["drafted"].age(self.decay)
        elif sizers:  # (a long catch-up, after a prompt or a pause, is not what a steady drafted round costs)
            catch_up = predicted_draft - max(s.steady_draft_ms() for s in sizers)
            steady_ms = max(round_ms - self.cost_scale("draft") * catch_up, 1e-3)
            realized["drafted"].add(tokens, steady_ms, self.decay)
        if report.plan.drafted:
            for tree, depth in zip(report.trees, accepted):
                self._observe_acceptance(tree, depth)
            if sizers:
                self._pause_unless_paying(sizers, verify_table * self.verify_scales(batch), batch)

    def _pause_unless_paying(self, sizers: list[RoundSizer], verify_ms: np.ndarray, batch: int) -> None:
        """Does drafting pay? Tokens per ms of the batch, drafted rounds against plain ones of as many rows, as
        realized once both have been seen (the drafted rounds recent ones: a long pause ages them away); before
        that, as expected for rounds like this one (their catch-up a token or two), a batch whose best trees are
        all the root alone not paying. Only realized rates shorten the pauses: an expectation can be wrong for
        as long as it likes, and would otherwise undo the backoff at every resumption."""
        realized = self.realized_at(batch)
        plain, drafted = realized["plain"], realized["drafted"]
        if drafted.rounds >= REALIZED_ROUNDS and plain.rounds > 0:
            paying = drafted.rate() >= plain.rate()
            if paying:
                self.backoff = max(self.backoff // 2, 1)
        else:
            draft_ms = self.cost_scale("draft") * max(s.steady_draft_ms() for s in sizers)
            largest = max(s.best for s in sizers)
            drafted_rate = sum(1.0 + s.gain for s in sizers) / (draft_ms + float(verify_ms[largest]))
            plain_rate = batch / float(verify_ms[0])
            fell_short = drafted.rounds >= REALIZED_ROUNDS and drafted.rate() < plain_rate
            paying = largest > 0 and drafted_rate >= plain_rate and not fell_short
        if not paying:
            self.pause, self.backoff = self.backoff, min(2 * self.backoff, self.max_pause)

    def _observe_acceptance(self, tree, accepted_depth: int) -> None:
        depths = np.asarray(tree.depths[1:])
        probs = np.exp(np.asarray(tree.scores[1:], dtype=np.float64))
        depth_max = int(depths.max()) if len(depths) else 0
        while len(self.predicted) < depth_max:
            self.predicted.append(0.0)
            self.observed.append(0.0)
        per_depth = np.bincount(depths, weights=probs, minlength=depth_max + 1)
        for d in range(1, depth_max + 1):
            self.predicted[d - 1] = self.decay * self.predicted[d - 1] + min(float(per_depth[d]), 1.0)
            self.observed[d - 1] = self.decay * self.observed[d - 1] + float(accepted_depth >= d)


def auto_tree(target, drafter, spec: TreeSpec) -> AutoTree:
    """An AutoTree for a target and a drafter that times its own steps (drafter.TimedDrafter: EAGLE-3, EAGLE,
    HASS, Medusa, Hydra, a draft model), on this machine's cost model (measured once, cached)."""
    from eagle3.decoding.cost import calibrate

    if not hasattr(drafter, "step_timers"):
        raise ValueError(f"--tree auto needs a drafter whose steps the cost model can time, not {type(drafter).__name__}; "
                         "give a fixed tree, e.g. --tree 5,4,1 (a chain of 4)")  # fmt: skip
    return AutoTree(calibrate(target, drafter), max_tokens=spec.total_tokens, max_depth=spec.depth, top_k=spec.top_k)
