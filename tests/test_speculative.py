"""Speculative decoding is lossless: greedy output equals plain greedy token for token."""

import dataclasses

import pytest
import torch

from eagle3.methods.draft import new_draft, quantize_int8
from eagle3.methods.drafter import Eagle3Drafter
from eagle3.decoding.policy import TreePlan
from eagle3.decoding.generate import generate
from eagle3.runtimes.model import load_model
from eagle3.decoding.speculative import speculative_generate
from eagle3.decoding.tree import TreeSpec, grow_tree, static_tree
from oracles import ReferenceOracle, TargetOracle

TREES = [TreeSpec(), TreeSpec(20, 4, 4), TreeSpec(6, 5, 1), TreeSpec(1, 1, 1), static_tree(9)]


# ---------------------------------------------------------------------------------------------- tree


def fake_expand(vocab=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    calls = []

    def expand(tokens, sources, depth, mask):
        calls.append((tokens.clone(), sources.clone(), depth, mask.clone()))
        logits = torch.randn(len(tokens), vocab, generator=gen)
        logp = torch.log_softmax(logits, -1)
        values, ids = logp.topk(4, dim=-1)
        return values, ids

    return expand, calls


def test_tree_keeps_best_nodes_parents_first():
    expand, calls = fake_expand()
    root_logp, root_ids = torch.log_softmax(torch.randn(50), -1).topk(4)
    tree = grow_tree(7, root_logp, root_ids, expand, TreeSpec(total_tokens=12, depth=4, top_k=4))
    assert tree.size == 12 and tree.tokens[0] == 7 and tree.parents[0] == -1
    assert len(calls) == 3  # depth 4: the root step plus three expansions
    for i, p in enumerate(tree.parents[1:], start=1):
        assert 0 <= p < i  # parents before children
        assert tree.depths[i] == tree.depths[p] + 1
        assert tree.scores[i] <= tree.scores[p] + 1e-6  # cumulative log-probability never grows
        assert i in tree.children[p]
        assert tree.mask[i, p] and tree.mask[i, i] and tree.mask[i].sum() == tree.depths[i] + 1
    for kids in tree.children:  # most probable first, distinct tokens among siblings
        assert [float(tree.scores[c]) for c in kids] == sorted((float(tree.scores[c]) for c in kids), reverse=True)
        assert len({int(tree.tokens[c]) for c in kids}) == len(kids)
    # Frontier masks: each expanded node sees the root step (row 0), its expanded ancestors and itself.
    tokens, sources, depth, mask = calls[1]
    assert depth == 2 and mask.shape == (4, 9) and mask[:, 5:].equal(torch.eye(4, dtype=torch.bool))
    assert mask[:, 0].all() and all(mask[i, 1:5].sum() == 1 for i in range(4))


def test_tree_total_one_is_the_root_alone():
    expand, calls = fake_expand()
    tree = grow_tree(3, *torch.log_softmax(torch.randn(50), -1).topk(4), expand, TreeSpec(1, 5, 4))
    assert tree.size == 1 and not calls


def test_tree_spec_parse():
    assert TreeSpec.parse("60,5,10") == TreeSpec(60, 5, 10)
    assert TreeSpec.parse("static:7") == static_tree(7) and static_tree(7).label == "static:7"
    for bad in ["60,5", "a,b,c", "0,5,10", "static:0", "static:x"]:
        with pytest.raises(ValueError):
            TreeSpec.parse(bad)
    for bad in [((0,), (0,)), ((0, 0),), ((1,), ()), ((0,), (-1,))]:  # repeated, orphan, empty, negative paths
        with pytest.raises(ValueError):
            TreeSpec(len(bad) + 1, 2, 2, static=bad)


def test_a_static_tree_keeps_the_same_paths_whatever_the_scores():
    """Static trees (EAGLE-1, Medusa): the nodes are the spec's paths of child ranks every round, each path's
    last rank the node's place among its parent's children by draft probability; paths parents first."""
    spec = static_tree(12)
    assert len(spec.static) == 12 and (0,) in spec.static and all(p[:-1] in spec.static for p in spec.static if len(p) > 1)
    for seed in range(3):
        torch.manual_seed(seed)
        expand, calls = fake_expand()
        tree = grow_tree(7, *torch.log_softmax(torch.randn(50), -1).topk(spec.top_k), expand, spec)
        paths = {0: ()}
        for node in range(1, tree.size):
            parent = tree.parents[node]
            siblings = sorted(tree.children[parent], key=lambda c: -float(tree.scores[c]))
            paths[node] = paths[parent] + (siblings.index(node),)
        assert sorted(paths[n] for n in range(1, tree.size)) == sorted(spec.static)
        assert len(calls) == spec.depth - 1  # every level of the static tree expanded, no more


# ---------------------------------------------------------------------------------------------- greedy


@pytest.fixture(scope="module")
def untrained(stories):
    return Eagle3Drafter(new_draft(stories.model.config).attach(stories.model.embed.weight))


@pytest.fixture(scope="module")
def oracle(stories):
    return TargetOracle(load_model(stories.path, device="cpu"))


PROMPTS = ["Once upon a time", "Tom had a big red"]


@pytest.mark.parametrize("tree", TREES, ids=str)
def test_greedy_untrained_draft_equals_plain(stories, untrained, tree, monkeypatch):
    forward = stories.model.forward
    calls = []
    monkeypatch.setattr(stories.model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    for prompt in PROMPTS:
        ids = stories.encode(prompt)
        plain = generate(stories, ids, 300)
        calls.clear()
        spec = speculative_generate(stories, untrained, ids, 300, tree=tree)
        assert spec.token_ids == plain.token_ids
        # One target forward per round after the prefill, and the output is every accepted token (the prefill's
        # one, then each round's), cut only inside the last round.
        # (The root-alone tree, 1,1,1, runs plain rounds: one token each.)
        lengths = spec.accept_lengths + [1] * spec.plain_rounds
        assert len(calls) == 1 + spec.rounds == 1 + len(lengths)
        assert (spec.plain_rounds > 0) == (tree.total_tokens == 1)
        assert len(spec.token_ids) <= 1 + sum(lengths) < len(spec.token_ids) + max(lengths)


def test_int8_draft_head_is_close_and_lossless(stories):
    """quantize_int8 packs the lm_head: logits within a few percent of float, training still sees the float
    weights, and greedy speculation with the int8 draft still equals plain greedy."""
    draft = new_draft(stories.model.config, seed=3).attach(stories.model.embed.weight)
    h = torch.randn(7, draft.config.hidden_size)
    with torch.inference_mode():
        exact = draft.logits(h)
        quantize_int8(draft)
        assert draft.lm_head.int8 is not None
        approx = draft.logits(h)
    assert not torch.equal(approx, exact) and (approx - exact).abs().max() < 0.05 * exact.abs().max()
    with torch.enable_grad():  # training ignores the packed copy: gradients reach the float weights
        draft.logits(h).sum().backward()
    assert draft.lm_head.weight.grad is not None
    ids = stories.encode(PROMPTS[1])
    plain = generate(stories, ids, 200)
    assert speculative_generate(stories, Eagle3Drafter(draft), ids, 200, tree=TreeSpec(20, 4, 4)).token_ids == plain.token_ids


def test_window_reads_the_prompt_end_at_its_own_positions(stories):
    """A drafter that reads only a prompt's last W tokens proposes what a drafter given just those W tokens
    from position 0 proposes (attention sees relative positions only), in its later catch-ups and tree levels
    too: its positions, cache slots and tree masks stay in step."""
    draft = new_draft(stories.model.config, seed=5).attach(stories.model.embed.weight)
    gen = torch.Generator().manual_seed(0)
    prompt, window, spec = 20, 6, TreeSpec(10, 3, 3)
    tokens = torch.randint(0, 512, (prompt + 3,), generator=gen)
    features = torch.randn(prompt + 3, 3 * stories.model.config.hidden_size, generator=gen)

    def rounds(drafter, tokens, features, first):
        drafter.open(1, 64)
        drafter.join(0, tokens[:1].tolist())
        trees = []
        with torch.inference_mode():
            for chunk in (slice(0, first), slice(first, None)):
                drafter.commit(0, tokens[chunk], features[chunk])
                trees.append(drafter.propose(TreePlan([spec])).trees[0])
        return trees

    windowed = Eagle3Drafter(draft, window=window)
    got = rounds(windowed, tokens, features, prompt)
    row = windowed.rows[0]
    assert (row.offset, row.committed, draft.cache.lengths[0]) == (prompt - window, prompt + 3, window + 3)
    want = rounds(Eagle3Drafter(draft), tokens[prompt - window :], features[prompt - window :], window)
    for a, b in zip(got, want):
        assert a.tokens.tolist() == b.tokens.tolist() and a.parents == b.parents
        assert torch.allclose(torch.as_tensor(a.scores), torch.as_tensor(b.scores), atol=1e-4)
    whole = rounds(Eagle3Drafter(draft), tokens, features, prompt)  # the start of the prompt does matter here
    assert any(not torch.allclose(torch.as_tensor(a.scores), torch.as_tensor(b.scores), atol=1e-4) for a, b in zip(got, whole))


def test_window_bounds_the_catch_up_after_a_pause(stories):
    """After a pause in drafting left 10 tokens unread, a drafter with a window of 6 reads the last 6 at their
    own positions (its root children are those of the draft run directly on what it read), and later rounds
    read on from there."""
    draft = new_draft(stories.model.config, seed=5).attach(stories.model.embed.weight)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 512, (16,), generator=gen)
    features = torch.randn(16, 3 * stories.model.config.hidden_size, generator=gen)
    drafter, spec = Eagle3Drafter(draft, window=6), TreeSpec(10, 3, 3)
    drafter.open(1, 64)
    drafter.join(0, tokens[:1].tolist())
    read, trees = [], []
    with torch.inference_mode():
        for chunk in (slice(0, 4), slice(4, 14), slice(14, 16)):  # a prompt, a pause's 10 tokens, a round's 2
            drafter.commit(0, tokens[chunk], features[chunk])
            proposal = drafter.propose(TreePlan([spec]))
            read.append(proposal.read[0])
            trees.append(proposal.trees[0])
            row = drafter.rows[0]
            assert draft.cache.lengths[0] == row.committed - row.offset
        assert read == [4, 6, 2] and (row.offset, row.committed) == (4, 16)
        draft.setup_cache(64)  # the same draft run by hand on positions 0-3 and 8-13
        draft(tokens[None, :4], features[None, :4], torch.arange(4))
        h = draft(tokens[None, 8:14], features[None, 8:14], torch.arange(8, 14))
        logp, ids = torch.topk(torch.log_softmax(draft.logits(h[0, -1]).float(), -1), 3)
    children = [i for i, parent in enumerate(trees[1].parents) if parent == 0]
    assert [int(trees[1].tokens[i]) for i in children] == draft.to_target_ids(ids).tolist()
    assert torch.allclose(torch.as_tensor([trees[1].scores[i] for i in children]), logp, atol=1e-4)


@pytest.mark.parametrize("tree", TREES[1:3], ids=str)
def test_greedy_with_a_window_equals_plain(stories, untrained, tree):
    ids = stories.encode("Once upon a time, there was a little girl named Lily. She loved to play outside")
    plain = generate(stories, ids, 200)
    drafter = Eagle3Drafter(untrained.draft, window=5)
    offsets = []
    catch_up = drafter._catch_up

    def recording(top_k):
        out = catch_up(top_k)
        offsets.append(drafter.rows[0].offset)
        return out

    drafter._catch_up = recording
    spec = speculative_generate(stories, drafter, ids, 200, tree=tree)
    assert len(ids) > 5 and offsets[0] == len(ids) - 5 and spec.token_ids == plain.token_ids


@pytest.mark.parametrize("tree", TREES[:3], ids=str)
def test_greedy_oracle_draft_equals_plain_with_long_accepts(stories, oracle, tree):
    ids = stories.encode(PROMPTS[0])
    plain = generate(stories, ids, 300)
    for drafter in (oracle, ReferenceOracle(ids + plain.token_ids, 512)):
        spec = speculative_generate(stories, drafter, ids, 300, tree=tree)
        assert spec.token_ids == plain.token_ids
        assert spec.tau > 0.9 * (tree.depth + 1) or tree.total_tokens <= tree.depth  # nearly every level accepted


def test_eos_inside_an_accepted_run(stories, oracle):
    period = stories.tokenizer.convert_tokens_to_ids(".")
    target = dataclasses.replace(stories, eos_token_ids=frozenset({period}))
    ids = target.encode("Once upon a time")
    plain = generate(target, ids, 300)
    assert plain.finish_reason == "eos" and plain.token_ids[-1] == period
    spec = speculative_generate(target, oracle, ids, 300, tree=TreeSpec(30, 6, 3))
    assert spec.token_ids == plain.token_ids and spec.finish_reason == "eos"
    assert sum(spec.accept_lengths) > len(spec.token_ids) - 1  # the last round ran past the EOS


def test_stop_string_and_budget_inside_an_accepted_run(stories, oracle):
    ids = stories.encode("Once upon a time")
    plain = generate(stories, ids, 300, stop_strings=["park"])
    spec = speculative_generate(stories, oracle, ids, 300, stop_strings=["park"], tree=TreeSpec(30, 6, 3))
    assert plain.finish_reason == spec.finish_reason == "stop"
    assert spec.token_ids == plain.token_ids and spec.text == plain.text
    for budget in (1, 2, 7, 23):
        spec = speculative_generate(stories, oracle, ids, budget, tree=TreeSpec(30, 6, 3))
        assert spec.token_ids == generate(stories, ids, budget).token_ids and spec.finish_reason == "length"


def test_context_end_shrinks_the_tree(stories, oracle):
    ids = stories.encode("Once upon a time " * 150)[:490]  # 22 positions left in the 512 context
    plain = generate(stories, ids, 100)
    spec = speculative_generate(stories, oracle, ids, 100, tree=TreeSpec(30, 6, 3))
    assert len(plain.token_ids) == 512 - 490 and spec.token_ids == plain.token_ids


@pytest.mark.slow
def test_smollm2_greedy_equals_plain(smollm2):
    ids = smollm2.encode("Write a short poem about the sea, then explain it.", chat=True)
    plain = generate(smollm2, ids, 300)
    poem = plain.token_ids
    assert len(poem) > 200
    reference = ReferenceOracle(ids + poem, smollm2.model.config.vocab_size)
    spec = speculative_generate(smollm2, reference, ids, 300, tree=TreeSpec(12, 6, 2))
    assert spec.token_ids == poem and spec.tau > 6
    short = smollm2.encode("What is 2+2?", chat=True)
    plain = generate(smollm2, short, 300)
    assert plain.finish_reason == "eos"
    spec = speculative_generate(smollm2, ReferenceOracle(short + plain.token_ids, 49152), short, 300, tree=TreeSpec(12, 6, 2))
    assert spec.token_ids == plain.token_ids and spec.finish_reason == "eos"
    draft = new_draft(smollm2.model.config, draft_vocab_size=2048).attach(smollm2.model.embed.weight)
    spec = speculative_generate(smollm2, Eagle3Drafter(draft), ids, 60, tree=TreeSpec(8, 3, 2))
    assert spec.token_ids == poem[:60]


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_generate_with_a_draft(capsys, tmp_path):
    import json

    from eagle3.cli import main

    assert main(["draft-init", str(tmp_path / "draft"), "--target", "stories260k"]) == 0
    capsys.readouterr()
    common = ["generate", "--target", "stories260k", "--max-new-tokens", "60", "--json", "Once upon a time"]
    assert main(common + ["--draft", "none"]) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(common + ["--draft", str(tmp_path / "draft"), "--tree", "10,3,3"]) == 0
    spec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plain["method"] == "vanilla" and spec["method"] == "eagle3"
    assert spec["token_ids"] == plain["token_ids"] and spec["text"] == plain["text"]
    assert spec["rounds"] == len(spec["accept_lengths"]) + spec["plain_rounds"]
    assert spec["tau"] == sum(spec["accept_lengths"]) / len(spec["accept_lengths"])
    assert main(common + ["--draft", str(tmp_path / "draft"), "--tree", "10,3,3", "--draft-window", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"] == plain["token_ids"]
    assert main(common + ["--draft", str(tmp_path / "draft"), "--tree", "10,3"]) == 2
    assert "TOTAL,DEPTH,TOPK" in capsys.readouterr().err
    assert main(common + ["--draft", str(tmp_path / "draft"), "--draft-window", "-1"]) == 2
    assert "--draft-window" in capsys.readouterr().err


def test_cli_refuses_a_draft_for_another_target(capsys, tmp_path, smollm2_path):
    from eagle3.cli import main

    assert main(["draft-init", str(tmp_path / "draft"), "--target", str(smollm2_path), "--draft-vocab", "1024"]) == 0
    capsys.readouterr()
    code = main(["generate", "--target", "stories260k", "--draft", str(tmp_path / "draft"), "hi"])
    assert code == 2 and "draft and target do not match" in capsys.readouterr().err
