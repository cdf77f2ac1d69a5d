"""How well the cost-aware tree's estimates match what happens, for a draft on a target (greedy, chat template,
first turns of the six suites):

1. Acceptance per tree depth and sibling rank, on a fixed tree (default 60,5,10, so that low-ranked children get
   drafted too): the nodes' cumulative draft probabilities summed against how many of them were accepted, and
   the same conditional on the parent accepted; then, given the parent accepted, per band of the child's draft
   probability (a reliability table). The policy corrects its estimates per depth only (autotree.py); ratios
   that moved with the rank or the band would say a finer correction is missing.
2. The auto tree, per size of the tree it chose: expected against accepted draft tokens, predicted against
   measured drafting and verification (ms), and the tokens per ms they imply. Timings: run it on a quiet machine.

    python benchmarks/policy_calibration.py [--draft default] [--runtime native] [--limit 4] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from eagle3.decoding.autotree import AutoTree, auto_tree
from eagle3.methods.drafter import load_drafter
from eagle3.fetch import resolve_draft
from eagle3.files import write_text
from eagle3.paths import MissingSharedData
from eagle3.decoding.policy import FixedTree, RoundReport, TreePlan, TreePolicy
from eagle3.decoding.speculative import speculative_generate
from eagle3.evaluation.suites import EAGLE_SUITES, data_dir, load_suite
from eagle3.runtimes.target import Target, encode_messages, load_target
from eagle3.decoding.tree import AUTO_TREE, TreeSpec

SIZE_BUCKETS = ((2, 2), (3, 4), (5, 8), (9, 16), (17, 32), (33, 64))
RANKS = 4  # sibling ranks 0, 1, 2 and "3 or lower"
CONFIDENCE_EDGES = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)  # the draft's probability of a child given its parent


@dataclass
class Recorder:
    """A tree policy that hands every round's report to `record` before its own policy sees it."""

    policy: TreePolicy
    record: object

    def size(self, report: RoundReport | None, contexts: list[int]) -> TreePlan:
        if report is not None:
            self.record(report, self.policy)
        return self.policy.size(report, contexts)


def band(p: float) -> int:
    """The CONFIDENCE_EDGES band holding probability p (1.0 in the last)."""
    return min(int(np.searchsorted(CONFIDENCE_EDGES, p, side="right")) - 1, len(CONFIDENCE_EDGES) - 2)


@dataclass
class RankTable:
    """Per (depth, sibling rank): nodes, summed cumulative probabilities, accepted; and conditional on the parent."""

    sums: dict = field(default_factory=lambda: defaultdict(lambda: np.zeros(6)))
    by_confidence: dict = field(default_factory=lambda: defaultdict(lambda: np.zeros(3)))  # (depth, band): given parent

    def __call__(self, report: RoundReport, policy) -> None:
        for tree, path in zip(report.trees, report.paths):
            accepted, scores, depths = set(path), tree.scores.tolist(), tree.depths.tolist()
            for parent, children in enumerate(tree.children):
                for rank, child in enumerate(children):
                    row = self.sums[(depths[child], min(rank, RANKS - 1))]
                    row[:3] += (1, np.exp(scores[child]), child in accepted)
                    if parent in accepted:
                        p = np.exp(scores[child] - scores[parent])
                        row[3:] += (1, p, child in accepted)
                        self.by_confidence[(min(depths[child], 3), band(p))] += (1, p, child in accepted)

    def rows(self) -> list[dict]:
        return [{"depth": d, "rank": r, "nodes": int(s[0]), "predicted": s[1], "accepted": int(s[2]),
                 "ratio": s[2] / max(s[1], 1e-9), "given_parent_nodes": int(s[3]), "given_parent_predicted": s[4],
                 "given_parent_ratio": s[5] / max(s[4], 1e-9)} for (d, r), s in sorted(self.sums.items())]  # fmt: skip

    def confidence_rows(self) -> list[dict]:
        """Given the parent accepted, per depth (3: 3 or deeper) and band of the child's draft probability."""
        edges = CONFIDENCE_EDGES
        return [{"depth": d, "p_from": edges[b], "p_to": edges[b + 1], "nodes": int(s[0]), "mean_p": s[1] / s[0],
                 "accepted_rate": s[2] / s[0], "ratio": s[2] / max(s[1], 1e-9)}
                for (d, b), s in sorted(self.by_confidence.items())]  # fmt: skip


@dataclass
class SizeTable:
    """Drafted rounds of one row: the chosen tree's size, the policy's expectations and what happened."""

    rounds: list = field(default_factory=list)

    def __call__(self, report: RoundReport, policy: AutoTree) -> None:
        if not (report.plan.drafted and report.plan.sizers):
            return
        sizer, size = report.plan.sizers[0], report.trees[0].size
        verify = policy.verify_prices(report.contexts[0], 1)[size - 1]
        draft = sizer.draft_ms * policy.cost_scale("draft")
        self.rounds.append((size, sizer.gain, report.accepted[0], draft, report.draft_ms, verify, report.verify_ms))

    def rows(self) -> list[dict]:
        table = np.array(self.rounds).reshape(-1, 7)
        out = []
        for low, high in SIZE_BUCKETS:
            chosen = table[(table[:, 0] >= low) & (table[:, 0] <= high)]
            if len(chosen):
                gain, accepted, draft, draft_ms, verify, verify_ms = chosen[:, 1:].mean(0)
                out.append({"sizes": f"{low}-{high}", "rounds": len(chosen), "expected": gain, "accepted": accepted,
                            "draft_predicted_ms": draft, "draft_ms": draft_ms, "verify_predicted_ms": verify,
                            "verify_ms": verify_ms, "rate_predicted": (1 + gain) / (draft + verify),
                            "rate": (1 + accepted) / (draft_ms + verify_ms)})  # fmt: skip
        return out


def run(target: Target, drafter, policy: Recorder, prompts: list[list[int]], tree: TreeSpec, max_new: int) -> None:
    for ids in prompts:
        speculative_generate(target, drafter, ids, max_new, tree=tree, policy=policy)


def show(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    if rows:
        print(" ".join(f"{k:>10}" for k in rows[0]))
    for row in rows:
        print(" ".join(f"{v:>10.3f}" if isinstance(v, float) else f"{v!s:>10}" for v in row.values()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--draft", default="default", help="an EAGLE-3 draft folder (default: the shipped one)")
    p.add_argument("--runtime", default="native")
    p.add_argument("--tree", default="60,5,10", help="the fixed tree of part 1")
    p.add_argument("--limit", type=int, default=4, help="questions per suite")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="also write both tables to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target(args.target, runtime=args.runtime)
    draft = resolve_draft(args.draft, args.target)
    if draft is None:
        raise SystemExit(f"error: no draft for {args.target}; pass --draft PATH")
    drafter = load_drafter(draft, target)
    prompts = [encode_messages(target, [{"role": "user", "content": q.turns[0]}])
               for suite in EAGLE_SUITES for q in load_suite(suite, data_dir(), args.limit)]  # fmt: skip
    ranks, sizes = RankTable(), SizeTable()
    fixed = TreeSpec.parse(args.tree)
    run(target, drafter, Recorder(FixedTree(fixed), ranks), prompts, fixed, args.max_new_tokens)
    auto = Recorder(auto_tree(target, drafter, AUTO_TREE), sizes)
    run(target, drafter, auto, prompts, AUTO_TREE, args.max_new_tokens)
    tables = {"ranks": ranks.rows(), "confidence": ranks.confidence_rows(), "sizes": sizes.rows()}
    show(f"1. acceptance per depth and sibling rank, tree {args.tree}", tables["ranks"])
    show("   and given the parent accepted, per band of the draft's probability", tables["confidence"])
    show("2. the auto tree per chosen size: expected and predicted against measured", tables["sizes"])
    if args.out:
        write_text(args.out, json.dumps({"config": vars(args), **tables}, indent=1) + "\n")


if __name__ == "__main__":
    try:
        main()
    except (MissingSharedData, ValueError, OSError) as err:  # (a missing suite, a bad draft folder or tree)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
