"""Cost-aware trees: the cost model, the size choice, online corrections, and losslessness with --tree auto."""

import json

import pytest
import torch

from eagle3.autotree import AutoTree
from eagle3.cost import CostModel, calibrate, cost_path, interpolate, monotone
from eagle3.draft import new_draft
from eagle3.drafter import Eagle3Drafter
from eagle3.generate import generate
from eagle3.model import load_model
from eagle3.speculative import speculative_generate
from eagle3.tree import AUTO_TREE, TreeSpec, grow_tree
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


def test_cheap_verification_grows_big_deep_trees_and_dear_verification_small_ones():
    free = grow_tree(0, *root(), confident_expand(), AUTO_TREE, AutoTree(cost_model(0.0)))
    cheap = grow_tree(0, *root(), confident_expand(), AUTO_TREE, AutoTree(cost_model(0.05)))
    dear = grow_tree(0, *root(), confident_expand(), AUTO_TREE, AutoTree(cost_model(4.0)))
    assert free.size == AUTO_TREE.total_tokens and int(free.depths.max()) == AUTO_TREE.depth
    # Cheap: the likely chain to full depth, but siblings of 1.4% are not worth 0.05 ms each.
    assert cheap.size == AUTO_TREE.depth + 1 and cheap.parents == list(range(-1, AUTO_TREE.depth))
    assert 2 <= dear.size <= 6 and int(dear.depths.max()) < AUTO_TREE.depth
    # A hopeless draft is not worth verifying at all: the root alone, like plain decoding.
    hopeless = grow_tree(0, *root(0.01), confident_expand(0.01), AUTO_TREE, AutoTree(cost_model(5.0)))
    assert hopeless.size == 1


def test_observed_acceptance_corrects_optimistic_estimates():
    policy = AutoTree(cost_model(1.0))
    before = grow_tree(0, *root(), confident_expand(), AUTO_TREE, policy)
    for _ in range(50):  # the draft claims 0.9 at depth 1, but nothing is ever accepted
        policy.observe(before.depths[1:], before.scores[1:], accepted_depth=0)
    assert policy.correction(1) < 0.15  # the prior (2 rounds of ratio 1) against ~18 decayed misses
    after = grow_tree(0, *root(), confident_expand(), AUTO_TREE, policy)
    assert after.size < before.size
    for _ in range(200):  # now everything drafted is accepted: estimates recover
        policy.observe(before.depths[1:], before.scores[1:], accepted_depth=int(before.depths.max()))
    assert policy.correction(1) > 0.9


def test_fixed_caps_hold():
    tree = grow_tree(0, *root(), confident_expand(), TreeSpec(5, 3, 8, auto=True), AutoTree(cost_model(0.0)))
    assert tree.size <= 5 and int(tree.depths.max()) <= 3


def test_auto_tree_greedy_equals_plain(stories, tmp_path, monkeypatch):
    monkeypatch.setenv("EAGLE3_HOME", str(tmp_path))
    drafter = Eagle3Drafter(new_draft(stories.model.config).attach(stories.model.embed.weight))
    oracle = TargetOracle(load_model(stories.path, device="cpu"))
    measured = calibrate(stories, drafter.draft)
    assert cost_path(measured.key).is_file() and calibrate(stories, drafter.draft) == measured  # cached
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
    policy = AutoTree(cost_model(5.0))
    pauses = []
    for _ in range(4):
        tree = grow_tree(0, *root(0.01), confident_expand(0.01), AUTO_TREE, policy)
        assert tree.size == 1
        pauses.append(policy.pause)
        while not policy.should_draft():
            pass
    assert pauses == [1, 2, 4, 8]  # backing off exponentially
    grow_tree(0, *root(), confident_expand(), AUTO_TREE, policy)  # drafting pays again: the back-off resets
    assert policy.pause == 0 and policy.backoff == 1


def test_slow_drafting_observed_pauses_it():
    """A tree that pays on the cost model's word stops being drafted once drafting is seen to take ten times
    its predicted time while verification takes what was predicted; it resumes when drafting speeds up."""
    policy = AutoTree(cost_model(1.0, draft_ms=1.0))
    tree = grow_tree(0, *root(0.6), confident_expand(0.6), AUTO_TREE, policy)
    assert tree.size > 1 and policy.pause == 0  # drafting pays as predicted
    for _ in range(30):
        if policy.should_draft():
            tree = grow_tree(0, *root(0.6), confident_expand(0.6), AUTO_TREE, policy)
            draft_ms, verify_ms = policy.predicted_ms
            policy.observe(tree.depths[1:], tree.scores[1:], 1, (10 * draft_ms, verify_ms))
        else:
            policy.observe(tree.depths[:0], tree.scores[:0], 0, (0.0, policy.predicted_ms[1]))
    assert policy.cost_scale("draft") > 5 and abs(policy.cost_scale("verify") - 1) < 1e-6
    assert policy.backoff > 1  # drafting paused, and paused longer each time it was tried again
    for _ in range(60):  # drafting takes what the cost model says again (tried every round here)
        policy.pause = 0
        tree = grow_tree(0, *root(0.6), confident_expand(0.6), AUTO_TREE, policy)
        policy.observe(tree.depths[1:], tree.scores[1:], 1, policy.predicted_ms)
    assert policy.cost_scale("draft") < 1.2 and policy.pause == 0 and policy.backoff == 1


def test_verify_cost_is_learned_per_tree_size():
    """The cost model prices every tree size alike, but trees of more than 4 tokens are seen to verify 4x
    slower than predicted (as multi-row kernels can on a CPU): the policy tries smaller sizes in turn and
    settles on trees of at most 4 tokens, whose ratio stays near 1."""
    policy = AutoTree(cost_model(0.0))
    tree = grow_tree(0, *root(), confident_expand(), AUTO_TREE, policy)
    assert tree.size == AUTO_TREE.total_tokens
    sizes = []
    for _ in range(80):
        policy.pause = 0
        tree = grow_tree(0, *root(), confident_expand(), AUTO_TREE, policy)
        draft_ms, verify_ms = policy.predicted_ms
        slow = 4.0 if tree.size > 4 else 1.0
        policy.observe(tree.depths[1:], tree.scores[1:], int(tree.depths.max()), (draft_ms, slow * verify_ms))
        sizes.append(tree.size)
    assert max(sizes[-20:]) <= 4
    # Each bigger size was tried once, seen slow (pulled toward 1 by the prior: 2.0 after one 4x round), left.
    assert abs(policy.verify_scales()[sizes[-1] - 1] - 1) < 0.15 and policy.verify_scales()[-1] > 1.5


def test_plain_rounds_between_drafted_ones_stay_lossless(stories):
    """A draft that never pays under a steep cost model: most rounds are plain steps, and the draft catches
    up on several tokens at once when it drafts again; the output is still plain greedy's."""
    drafter = Eagle3Drafter(new_draft(stories.model.config).attach(stories.model.embed.weight))
    policy = AutoTree(cost_model(50.0, draft_ms=20.0))
    ids = stories.encode("Tom had a big red")
    plain = generate(stories, ids, 150)
    spec = speculative_generate(stories, drafter, ids, 150, tree=AUTO_TREE, policy=policy)
    assert spec.token_ids == plain.token_ids
    assert policy.backoff > 1 and spec.rounds >= len(spec.token_ids) - 1  # mostly one token per round
    assert spec.plain_rounds > spec.rounds / 2 and spec.rounds == spec.plain_rounds + len(spec.accept_lengths)
