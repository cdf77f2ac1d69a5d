"""Cost-aware trees: the cost model, the size choice, online corrections, and losslessness with --tree auto."""

import json

import pytest
import torch

from dataclasses import replace

from eagle3.decoding.autotree import AutoTree, Prices, RoundSizer, Throughput
from eagle3.decoding.cost import CostModel, calibrate, cost_path, interpolate, monotone
from eagle3.methods.draft import new_draft
from eagle3.methods.drafter import Eagle3Drafter
from eagle3.decoding.generate import generate
from eagle3.runtimes.model import load_model
from eagle3.decoding.speculative import speculative_generate
from eagle3.decoding.policy import RoundReport, TreePlan
from eagle3.decoding.tree import AUTO_TREE, DraftTree, grow_tree, root_only
from oracles import TargetOracle


def cost_model(verify_slope: float, draft_ms: float = 1.0) -> CostModel:
    """Target forward: 10 ms for one token plus verify_slope ms per extra token, at any context."""
    points = {n: 10.0 + verify_slope * (n - 1) for n in (1, 2, 4, 8, 16, 32, 64)}
    return CostModel({128: points, 1024: points}, {1: draft_ms, 8: draft_ms, 32: draft_ms})


def confident_expand(p_top=0.9):
    """Each node's best child has probability p_top; the others share the rest."""

    def expand(tokens, sources, depth, mask):
        k = 8
        probs = torch.tensor([p_top] + [(1 - p_top) / (k - 1)] * (k - 1))
        return probs.log().expand(len(tokens), k).clone(), torch.arange(k).expand(len(tokens), k).clone()

    return expand


def root(p_top=0.9):
    return torch.tensor([p_top] + [(1 - p_top) / 7] * 7).log(), torch.arange(8)


def test_interpolation_and_context():
    assert interpolate({1: 10.0, 4: 40.0}, 2) == pytest.approx(20.0)
    assert interpolate({1: 10.0, 4: 40.0}, 8) == pytest.approx(80.0)  # extrapolates linearly
    model = CostModel({100: {1: 10.0, 8: 20.0}, 1100: {1: 20.0, 8: 40.0}}, {1: 1.0})
    assert model.verify(8, context=600) == pytest.approx(30.0)
    assert CostModel.from_json(json.loads(json.dumps(model.to_json()))) == model
    # A noisy calibration (2 tokens slower than 4) is made monotone: no size costs more than a larger one.
    assert monotone({1: 48.0, 2: 122.0, 4: 110.0, 8: 190.0}) == {1: 48.0, 2: 110.0, 4: 110.0, 8: 190.0}


class Rounds:
    """Drives an AutoTree the way the engine does, on synthetic trees: plan, grow, report the round's times
    (as predicted, times a factor) and what was accepted."""

    def __init__(self, policy: AutoTree, batch: int = 1, context: int = 256):
        self.policy, self.contexts, self.report = policy, [context] * batch, None

    def plan(self) -> TreePlan:
        return self.policy.size(self.report, self.contexts)

    def grow(self, plan: TreePlan, p_top: float = 0.9) -> list[DraftTree]:
        if not plan.drafted:
            return [root_only(0) for _ in self.contexts]
        return [grow_tree(0, *root(p_top), confident_expand(p_top), spec, plan.sizer(row, 1))
                for row, spec in enumerate(plan.specs)]  # fmt: skip

    def report_on(self, plan, trees, accepted=0, draft_factor=1.0, verify_factor=1.0) -> None:
        predicted_draft = max((s.draft_ms for s in plan.sizers.values()), default=0.0)
        size = max(t.size for t in trees)
        predicted_verify = float(self.policy._verify_ms(self.contexts[0], len(trees))[size - 1])
        paths = [path_to_depth(t, min(accepted, int(t.depths.max()))) for t in trees]  # (a plain round: the root)
        self.report = RoundReport(plan, trees, paths, self.contexts, draft_factor * predicted_draft,
                                  verify_factor * predicted_verify)  # fmt: skip

    def round(self, p_top=0.9, accepted=0, **factors) -> tuple[TreePlan, list[DraftTree]]:
        plan = self.plan()
        trees = self.grow(plan, p_top)
        self.report_on(plan, trees, accepted, **factors)
        return plan, trees


def path_to_depth(tree: DraftTree, depth: int) -> list[int]:
    """The accepted nodes, the root first, of a path to the first node at that depth."""
    path = [int((tree.depths == depth).nonzero()[0])]
    while path[-1] != 0:
        path.append(tree.parents[path[-1]])
    return path[::-1]


def grown(policy: AutoTree, p_top: float = 0.9, batch: int = 1) -> DraftTree:
    rounds = Rounds(policy, batch)
    return rounds.grow(rounds.plan(), p_top)[0]


def test_cheap_verification_grows_big_deep_trees_and_dear_verification_small_ones():
    free, cheap, dear = (grown(AutoTree(cost_model(slope))) for slope in (0.0, 0.05, 4.0))
    assert free.size == AUTO_TREE.total_tokens and int(free.depths.max()) == AUTO_TREE.depth
    # Cheap: the likely chain to full depth, but siblings of 1.4% are not worth 0.05 ms each.
    assert cheap.size == AUTO_TREE.depth + 1 and cheap.parents == list(range(-1, AUTO_TREE.depth))
    assert 2 <= dear.size <= 6 and int(dear.depths.max()) < AUTO_TREE.depth
    # A hopeless draft is not worth verifying at all: the root alone, like plain decoding.
    assert grown(AutoTree(cost_model(5.0)), 0.01).size == 1


def test_bigger_batches_get_smaller_trees():
    """Verification free up to 16 tokens, then 1 ms per token (a GPU's profile): one sequence verifies a
    16-token tree for nothing; eight share those 16 tokens, so each row's best tree is 2 tokens."""
    points = {n: 10.0 + max(0, n - 16) * 1.0 for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)}
    model = CostModel({128: points, 1024: points}, {n: 0.2 for n in (1, 8, 64, 512)})
    sizes = [grown(AutoTree(model), 0.9, batch).size for batch in (1, 2, 4, 8)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] >= 16 and sizes[-1] <= 3, sizes


def test_observed_acceptance_corrects_optimistic_estimates():
    rounds = Rounds(AutoTree(cost_model(1.0)))
    plan, (before,) = rounds.round()
    for _ in range(50):  # the draft claims 0.9 at depth 1, but nothing is ever accepted
        rounds.policy.pause = 0
        rounds.report_on(plan, [before], accepted=0)
        plan = rounds.plan()
    assert rounds.policy.correction(1) < 0.15  # the prior (2 rounds of ratio 1) against ~18 decayed misses
    rounds.policy.pause = 0
    (after,) = rounds.grow(rounds.plan())
    assert after.size < before.size
    for _ in range(200):  # now everything drafted is accepted: estimates recover
        rounds.report_on(plan, [before], accepted=int(before.depths.max()))
        plan = rounds.plan()
    assert rounds.policy.correction(1) > 0.9


def test_a_drafters_first_step_is_priced_apart():
    """Heads pay one pass before any tree level (CostModel.first_ms): every round's drafting costs at least that,
    and a cost model without it prices the first step as a draft step."""
    import numpy as np

    plain = cost_model(1.0, draft_ms=1.0)
    heads = replace(plain, first_ms={1: 30.0})
    assert heads.first(1) == 30.0 and heads.draft(4) == plain.draft(4) and plain.first(3) == plain.draft(3)
    assert CostModel.from_json(json.loads(json.dumps(heads.to_json()))) == heads
    scores, levels = np.log(np.full(8, 0.9)), np.ones(8, dtype=np.int64)
    for model, first in ((plain, 1.0), (heads, 30.0)):
        verify = np.array([model.verify(n) for n in range(1, 9)])
        sizer = RoundSizer(Prices(model, 1, 1.0, verify, np.ones(1)), read=1, max_tokens=8, max_depth=4)
        sizer.keep(scores, levels, [])
        assert sizer.draft_ms == first and sizer.steady_draft_ms() == first


def test_fixed_caps_hold():
    tree = grown(AutoTree(cost_model(0.0), max_tokens=5, max_depth=3))
    assert tree.size <= 5 and int(tree.depths.max()) <= 3


def test_auto_tree_greedy_equals_plain(stories, tmp_path, monkeypatch):
    monkeypatch.setenv("EAGLE3_HOME", str(tmp_path))
    drafter = Eagle3Drafter(new_draft(stories.model.config).attach(stories.model.embed.weight))
    oracle = TargetOracle(load_model(stories.path, device="cpu"))
    measured = calibrate(stories, drafter)
    assert cost_path(measured.key).is_file() and calibrate(stories, drafter) == measured  # cached
    assert all(ms > 0 for points in measured.target_ms.values() for ms in points.values())
    ids = stories.encode("Once upon a time")
    plain = generate(stories, ids, 200)
    spec = speculative_generate(stories, drafter, ids, 200, tree=AUTO_TREE)  # the cached cost model
    assert spec.token_ids == plain.token_ids
    # An oracle draft with cheap verification: long accepted runs, still identical.
    policy = AutoTree(cost_model(0.1))
    spec = speculative_generate(stories, oracle, ids, 200, tree=AUTO_TREE, policy=policy)
    assert spec.token_ids == plain.token_ids and spec.tau > 3


def test_pauses_drafting_while_it_does_not_pay():
    rounds = Rounds(AutoTree(cost_model(5.0)))
    drafted = []
    for _ in range(20):
        plan, (tree,) = rounds.round(p_top=0.01)
        drafted.append(plan.drafted)
        assert tree.size == 1
    pauses = [len(run) for run in "".join("d" if d else "p" for d in drafted).split("d")[1:-1]]
    assert pauses[:3] == [1, 2, 4]  # plain rounds between drafted ones, backing off exponentially
    policy = rounds.policy
    policy.pause, rounds.report, backoff = 0, None, policy.backoff
    assert backoff >= 8
    plan, halvings = rounds.plan(), []
    for _ in range(3 + backoff.bit_length()):  # drafting pays again, as expected and as realized
        trees = rounds.grow(plan, 0.9)
        rounds.report_on(plan, trees, accepted=int(trees[0].depths.max()))
        plan = rounds.plan()
        assert plan.drafted and policy.pause == 0
        halvings.append(policy.backoff == max(backoff // 2, 1))
        assert halvings[-1] or policy.backoff == backoff  # (while only expected to pay: the backoff stands)
        backoff = policy.backoff
    # once realized, each paying round halves the next pause: one lucky round does not restart the short ones
    assert halvings[-backoff.bit_length():] == [True] * backoff.bit_length() and policy.backoff == 1
    assert halvings.count(False) <= 3  # (drafted rounds aged by the pauses: a few rounds to be realized again)


def test_a_long_pause_ages_the_drafted_rate_so_drafting_can_resume():
    """Drafting fell far short a long while ago (a stale average of 20 rounds at a tenth of plain's rate) and
    was paused for 64 rounds; now it pays three times what plain rounds do. The rounds drafted after the pause
    decide, not the stale ones: without ageing, one fresh round weighs a twentieth and pauses would double to
    max_pause for the rest of the run."""
    rounds = Rounds(AutoTree(cost_model(1.0)))
    policy = rounds.policy
    policy.realized_at(1)["drafted"] = Throughput(tokens=20.0, ms=2000.0, rounds=20.0)
    policy.pause, policy.backoff = 64, 128
    drafted = [rounds.round(p_top=0.9, accepted=8)[0].drafted for _ in range(64 + 12)]
    assert drafted[:64] == [False] * 64 and all(drafted[64:])
    rounds.plan()
    assert policy.pause == 0 and policy.backoff < 128
    realized = policy.realized_at(1)
    assert realized["drafted"].rate() > 2 * realized["plain"].rate()


def test_pauses_grow_to_max_pause():
    rounds = Rounds(AutoTree(cost_model(5.0), max_pause=8))
    drafted = [rounds.round(p_top=0.01)[0].drafted for _ in range(60)]
    pauses = [len(run) for run in "".join("d" if d else "p" for d in drafted).split("d")[1:-1]]
    assert pauses[:4] == [1, 2, 4, 8] and set(pauses[4:]) == {8}


def test_drafted_rounds_that_realize_less_than_plain_ones_pause_drafting():
    """Expected to pay, and each round accepts its whole chain; but plain rounds were seen to yield more tokens
    per ms than the drafted ones realized: drafting pauses (the backstop for expectations that stay wrong)."""
    rounds = Rounds(AutoTree(cost_model(1.0)))
    for _ in range(5):
        plan = rounds.plan()
        trees = rounds.grow(plan, 0.9)
        rounds.report_on(plan, trees, accepted=int(trees[0].depths.max()))
    rounds.plan()
    assert rounds.policy.pause == 0 and rounds.policy.realized_at(1)["drafted"].rounds >= 3
    rounds.policy.realized_at(1)["plain"] = Throughput(tokens=10.0, ms=1.0, rounds=10.0)  # plain: 10 tokens/ms
    plan = rounds.plan()
    trees = rounds.grow(plan, 0.9)
    rounds.report_on(plan, trees, accepted=int(trees[0].depths.max()))
    rounds.plan()
    assert rounds.policy.backoff > 1


def test_realized_rates_are_compared_at_the_same_batch_size():
    """A server's batch grows and shrinks: slow plain rounds of one row must not make drafted rounds of four
    rows look good when plain rounds of four rows yield more (tokens per ms grow with the rows)."""
    rounds = Rounds(AutoTree(cost_model(1.0)), batch=4)
    policy = rounds.policy
    policy.realized_at(1)["plain"] = Throughput(tokens=0.01, ms=1000.0, rounds=1000.0)  # (pooled: far below)
    policy.realized_at(4)["plain"] = Throughput(tokens=10.0, ms=1.0, rounds=10.0)
    for _ in range(4):
        plan = rounds.plan()
        trees = rounds.grow(plan, 0.9)
        rounds.report_on(plan, trees, accepted=int(trees[0].depths.max()))
    rounds.plan()
    assert policy.realized_at(4)["drafted"].rounds >= 3 and policy.backoff > 1
    assert policy.realized_at(1)["drafted"].rounds == 0


def test_slow_drafting_observed_pauses_it():
    """A tree that pays on the cost model's word stops being drafted once drafting is seen to take ten times
    its predicted time while verification takes what was predicted; it resumes when drafting speeds up."""
    rounds = Rounds(AutoTree(cost_model(1.0, draft_ms=1.0)))
    plan, (tree,) = rounds.round(p_top=0.6, accepted=1)
    assert tree.size > 1 and rounds.policy.pause == 0  # drafting pays as predicted
    for _ in range(30):
        rounds.round(p_top=0.6, accepted=1, draft_factor=10.0)
    policy = rounds.policy
    assert policy.cost_scale("draft") > 5 and abs(policy.cost_scale("verify") - 1) < 1e-6
    assert policy.backoff > 1  # drafting paused, and paused longer each time it was tried again
    for _ in range(60):  # drafting takes what the cost model says again (tried every round here)
        policy.pause = 0
        rounds.round(p_top=0.6, accepted=1)
    rounds.plan()
    assert policy.cost_scale("draft") < 1.2 and policy.pause == 0 and policy.backoff == 1


def test_verify_cost_is_learned_per_tree_size():
    """The cost model prices every tree size alike, but trees of more than 4 tokens are seen to verify 4x
    slower than predicted (as multi-row kernels can on a CPU): the policy tries smaller sizes in turn and
    settles on trees of at most 4 tokens, whose ratio stays near 1."""
    rounds = Rounds(AutoTree(cost_model(0.0)))
    assert grown(rounds.policy).size == AUTO_TREE.total_tokens
    sizes = []
    for _ in range(80):
        rounds.policy.pause = 0
        plan = rounds.plan()
        (tree,) = rounds.grow(plan)
        rounds.report_on(plan, [tree], int(tree.depths.max()), verify_factor=4.0 if tree.size > 4 else 1.0)
        sizes.append(tree.size)
    assert max(sizes[-20:]) <= 4
    # Each bigger size was tried once, seen slow (pulled toward 1 by the prior: 2.0 after one 4x round), left.
    scales = rounds.policy.verify_scales()
    assert abs(scales[sizes[-1] - 1] - 1) < 0.15 and scales[-1] > 1.5


def test_plain_rounds_between_drafted_ones_stay_lossless(stories):
    """A draft that never pays under a steep cost model: most rounds are plain steps, and the draft catches
    up on several tokens at once when it drafts again (at most its window's 4, the last ones, after the longer
    pauses); the output is still plain greedy's."""
    drafter = Eagle3Drafter(new_draft(stories.model.config).attach(stories.model.embed.weight), window=4)
    policy = AutoTree(cost_model(50.0, draft_ms=20.0))
    ids = stories.encode("Tom had a big red")
    plain = generate(stories, ids, 150)
    reads, propose = [], drafter.propose
    drafter.propose = lambda plan: (proposal := propose(plan), reads.extend(proposal.read))[0]
    spec = speculative_generate(stories, drafter, ids, 150, tree=AUTO_TREE, policy=policy)
    assert spec.token_ids == plain.token_ids
    assert max(reads) == 4 and reads.count(4) >= 3  # the prompt, and pauses of 4 rounds and more
    # (not the policy's final backoff: once realized rates decide, one noisy round on a busy machine resets it)
    assert spec.rounds >= len(spec.token_ids) - 1  # mostly one token per round
    assert spec.plain_rounds > spec.rounds / 2 and spec.rounds == spec.plain_rounds + len(spec.accept_lengths)
