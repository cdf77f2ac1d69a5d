"""Prompt-lookup chains grafted onto every round's tree (pld.LookupGraft, `--lookup N`): the n-gram index answers
as the definition does, grafts merge where the tree agrees, and output stays the target's, greedy and sampled,
with any drafter or none."""

from __future__ import annotations

import json
import random

import numpy as np
import torch

from eagle3.cli import main
from eagle3.methods.draft import new_draft
from eagle3.methods.drafter import Eagle3Drafter, NoDrafter
from eagle3.decoding.engine import Engine, Request
from eagle3.decoding.generate import generate
from eagle3.methods.pld import GraftPrice, LookupGraft, NgramIndex, graft_chain
from eagle3.decoding.sampling import SamplingParams
from eagle3.decoding.speculative import speculative_generate
from eagle3.decoding.tree import DraftTree, TreeSpec, ancestor_mask, chain, root_only
from test_sampling_exact import (ALPHA, N_LOOP, PARAMS, batched_triples, chi_square_p_value, exact_triples,
                                 speculative_triples)

REPETITIVE = "Tom had a red ball. Tom had a red ball. Tom had a red"


def lookup(history: list[int], max_ngram: int, num_tokens: int, min_ngram: int = 1) -> list[int]:
    """The definition NgramIndex must answer: the tokens that followed the most recent earlier occurrence of
    the longest matching suffix n-gram, by scanning the history."""
    n_total = len(history)
    for n in range(min(max_ngram, n_total - 1), min_ngram - 1, -1):
        suffix = list(history[n_total - n :])
        for start in range(n_total - n - 1, -1, -1):  # most recent match first, not the suffix itself
            if list(history[start : start + n]) == suffix:
                return list(history[start + n : start + n + num_tokens])
    return []


def test_the_index_answers_as_the_definition():
    rng = random.Random(0)
    for _ in range(200):
        history = [rng.randrange(5) for _ in range(rng.randrange(1, 50))]
        index = NgramIndex(3)
        for i, token in enumerate(history):
            index.extend([token])
            for k in (1, 3):
                assert index.lookup(k) == lookup(history[: i + 1], 3, k)


def test_a_chain_merges_where_the_tree_agrees_and_grows_where_it_departs():
    parents = [-1, 0, 0, 1]
    tree = DraftTree(torch.tensor([5, 7, 8, 9]), parents, torch.tensor([0, 1, 1, 2]), ancestor_mask(parents),
                     [[1, 2], [3], [], []], torch.tensor([0.0, -0.5, -1.0, -1.5]))  # fmt: skip
    grafted, added = graft_chain(tree, [7, 9, 4, 6], [-0.1, -0.2, -0.3, -0.4])
    assert added == 2 and grafted.tokens.tolist() == [5, 7, 8, 9, 4, 6] and grafted.parents == [-1, 0, 0, 1, 3, 4]
    assert grafted.depths.tolist() == [0, 1, 1, 2, 3, 4] and grafted.children[3] == [4]
    assert torch.allclose(grafted.scores[4:], torch.tensor([-1.8, -2.2]))
    assert grafted.mask[5].tolist() == [True, True, False, True, True, True]
    departs, added = graft_chain(tree, [8, 1], [0.0, 0.0])  # along node 2, then a new child of it
    assert added == 1 and departs.parents[-1] == 2 and departs.children[2] == [4]
    assert graft_chain(tree, [7, 9], [0.0, 0.0]) == (tree, 0)
    single, added = graft_chain(root_only(3), [4, 4], [0.0, 0.0])
    assert added == 2 and single.tokens.tolist() == [3, 4, 4] and single.parents == [-1, 0, 1]


def test_chains_shrink_where_lookups_fail_grow_back_where_they_match_and_respect_the_room():
    graft = LookupGraft(num_tokens=4, min_prob=0.3)
    graft.open()
    graft.join(0, [1, 2, 3, 9, 1, 2])
    graft.commit(0, [3])  # history ...1 2 3 9 1 2 3: the chain after "1 2 3" is 9 1 2 3
    tree = graft.graft(0, root_only(3), room=10)
    assert tree.tokens.tolist() == [3, 9]  # (rates start at 1/2: only the first token's 0.5 >= 0.3 at start)
    assert graft.graft(0, root_only(3), room=0).size == 1
    for i in range(30):  # the chain's first token never matches: the estimate falls below min_prob
        graft.graft(0, root_only(3), room=10)
        graft.commit(0, [1000 + i, 1, 2, 3])
    assert graft.graft(0, root_only(3), room=10).size == 1
    for _ in range(60):  # the (pruned) chains match again: their estimates recover, chains come back
        found = graft.indexes[0].lookup(4)
        graft.graft(0, root_only(3), room=10)
        graft.commit(0, found[:1])
    assert graft.graft(0, root_only(3), room=10).size > 1


def test_a_priced_chain_goes_in_as_far_as_it_pays():
    """With the policy's prices the chain prefix maximizes the round's tokens per ms: all of it where verifying
    more tokens is nearly free, none where each token costs a step, and nodes the tree already has cost nothing."""
    graft = LookupGraft(num_tokens=4)
    graft.open()
    graft.join(0, [1, 2, 3, 9, 8, 7, 1, 2])
    graft.commit(0, [3])  # the chain after "1 2 3": 9 8 7 1 (estimated right 1/2, 1/4, 1/8, 1/16 of the time)
    flat = GraftPrice(tokens=1.0, ms=10.0, verify_ms=np.array([10.0, 10.2, 10.4, 10.6, 10.8, 11.0]))
    steep = GraftPrice(tokens=1.0, ms=10.0, verify_ms=np.array([10.0, 20.0, 30.0, 40.0, 50.0, 60.0]))
    assert graft.graft(0, root_only(3), room=10, price=flat).tokens.tolist() == [3, 9, 8, 7, 1]
    assert graft.graft(0, root_only(3), room=10, price=steep).size == 1
    along = chain(torch.tensor([3, 9, 8]))  # a tree already holding the chain's first two tokens
    assert graft.graft(0, along, room=10, price=steep).size == 3
    middle = GraftPrice(tokens=1.0, ms=10.0, verify_ms=np.array([10.0, 13.0, 16.0, 19.0, 22.0, 25.0]))
    assert graft.graft(0, root_only(3), room=10, price=middle).size == 2  # the first token pays, the rest not


def test_a_batchs_chains_are_priced_against_the_whole_batchs_round():
    """At a batch every row's verify is padded to the largest tree: a chain that pays for one row alone does not
    pay when its extra token costs the whole batch a step for one row's expected gain, and a row's chain fills
    the padding another row's larger tree already pays for at no cost."""
    graft = LookupGraft(num_tokens=4)
    graft.open()
    for row in (0, 1):
        graft.join(row, [1, 2, 3, 9, 8, 7, 1, 2])
        graft.commit(row, [3])  # each row's chain: 9 8 7 1
    middle = np.array([10.0, 13.0, 16.0, 19.0, 22.0, 25.0])  # (the batch's verify, per tree size)
    alone = graft.graft_rows([root_only(3)], [10], GraftPrice(tokens=1.0, ms=10.0, verify_ms=middle))
    assert alone[0].size == 2  # as for one sequence: the first token pays
    pair = graft.graft_rows([root_only(3), root_only(3)], [10, 10], GraftPrice(2.0, 10.0, middle, padded=1))
    assert [t.size for t in pair] == [1, 1]  # (the batch's rate with the chain, 2.5 / 13, is below 2 / 10)
    steep = np.array([10.0, 20.0, 30.0, 40.0, 50.0, 60.0])
    drafted = chain(torch.tensor([3, 5, 6]))  # row 0 drafted 2 tokens: the batch is verified at 3 per row
    filled = graft.graft_rows([drafted, root_only(3)], [10, 10], GraftPrice(2.5, 30.0, steep, padded=3))
    assert filled[0].size == 3  # (its chain departs at the root: each node would cost the batch a step)
    assert filled[1].tokens.tolist() == [3, 9, 8]  # up to the padded size for free, no further


def test_greedy_output_is_the_targets_with_lookup_whatever_the_drafter(stories):
    untrained = Eagle3Drafter(new_draft(stories.model.config).attach(stories.model.embed.weight))
    accepted = {}
    for text in (REPETITIVE, "Once upon a time"):
        prompt = stories.encode(text)
        plain = generate(stories, prompt, 60).token_ids
        alone = speculative_generate(stories, NoDrafter(), prompt, 60, tree=TreeSpec(1, 1, 1), lookup=5)
        assert alone.token_ids == plain, text
        assert speculative_generate(stories, untrained, prompt, 60, tree=TreeSpec(6, 3, 2), lookup=5).token_ids == plain
        accepted[text] = alone.accept_lengths
    assert max(accepted[REPETITIVE], default=1) > 1, accepted  # the repetitive prompt's chains got accepted
    rows = [stories.encode(t) for t in (REPETITIVE, "Once upon a time", "The little dog")]
    plain_rows = [generate(stories, p, 40).token_ids for p in rows]
    engine = Engine(stories, untrained, TreeSpec(6, 3, 2), max_rows=2, lookup=LookupGraft(4))
    assert [r.token_ids for r in engine.run([Request(p, 40) for p in rows])] == plain_rows
    # on the auto tree the chains are priced against the batch's round (pld.GraftPrice), rows joining and leaving
    engine = Engine(stories, untrained, TreeSpec.parse("auto"), max_rows=2, lookup=LookupGraft(4))
    assert [r.token_ids for r in engine.run([Request(p, 40) for p in rows])] == plain_rows


def test_sampling_with_lookup_is_the_targets_distribution(stories):
    prompt = stories.encode("Tom had a ball. Tom had a")
    table = exact_triples(stories, prompt, SamplingParams(**PARAMS))
    samples = speculative_triples(stories, NoDrafter(), prompt, PARAMS, N_LOOP, lookup=3)
    assert chi_square_p_value(samples, table) > ALPHA
    # Chains merged into an EAGLE-3 head's trees (generate's default with a draft on the auto tree): a node can
    # have children from both, some the same token.
    untrained = Eagle3Drafter(new_draft(stories.model.config, seed=3).attach(stories.model.embed.weight))
    samples = speculative_triples(stories, untrained, prompt, PARAMS, N_LOOP, seed0=N_LOOP, lookup=3)
    assert chi_square_p_value(samples, table) > ALPHA


class CountingGraft(LookupGraft):
    """LookupGraft that counts the nodes its chains added."""

    added = 0

    def graft_rows(self, trees, rooms, price=None):
        grafted = super().graft_rows(trees, rooms, price)
        self.added += sum(g.size - t.size for g, t in zip(grafted, trees))
        return grafted


def test_batched_sampling_with_priced_chains_is_the_targets_distribution(stories):
    """Four sampled rows at a time on the auto tree, chains priced against the batch's round: the first three
    tokens still fit the target's exact distribution."""
    prompt = stories.encode("Tom had a ball. Tom had a")
    table = exact_triples(stories, prompt, SamplingParams(**PARAMS))
    untrained = Eagle3Drafter(new_draft(stories.model.config, seed=4).attach(stories.model.embed.weight))
    lookup = CountingGraft(3)
    samples = batched_triples(Engine(stories, untrained, TreeSpec.parse("auto"), max_rows=4, lookup=lookup), prompt)
    assert lookup.added > 0  # (chains did go in)
    assert chi_square_p_value(samples, table) > ALPHA


def test_the_cli_generates_with_lookup(stories, capsys):
    args = ["generate", REPETITIVE, "--target", str(stories.path), "--max-new-tokens", "24", "--json", "--threads", "1"]
    assert main([*args, "--draft", "none"]) == 0
    plain = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert main([*args, "--draft", "none", "--lookup", "4"]) == 0
    looked = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert looked["token_ids"] == plain["token_ids"] and looked["tau"] > 1


def test_the_cli_grafts_chains_by_default_with_a_draft_on_the_auto_tree(stories, capsys, tmp_path, monkeypatch):
    """Default --lookup: 4 with a draft on the auto tree (priced there), none with a fixed tree or no draft;
    an explicit value always wins. The output stays plain decoding's."""
    import eagle3.decoding.speculative

    assert main(["draft-init", str(tmp_path / "draft"), "--target", str(stories.path)]) == 0
    capsys.readouterr()
    chosen, run = [], eagle3.decoding.speculative.speculative_generate
    monkeypatch.setattr(eagle3.decoding.speculative, "speculative_generate",
                        lambda *a, **k: (chosen.append(k["lookup"]), run(*a, **k))[1])  # fmt: skip
    args = ["generate", REPETITIVE, "--target", str(stories.path), "--max-new-tokens", "24", "--json", "--threads", "1"]
    assert main([*args, "--draft", "none"]) == 0
    plain = json.loads(capsys.readouterr().out.splitlines()[-1])
    draft = ["--draft", str(tmp_path / "draft")]
    for extra in ([], ["--tree", "6,3,2"], ["--lookup", "0"], ["--tree", "6,3,2", "--lookup", "2"]):
        assert main([*args, *draft, *extra]) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["token_ids"] == plain["token_ids"]
    assert chosen == [4, 0, 0, 2]
