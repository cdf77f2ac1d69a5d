"""Medusa-1 heads (eagle3/methods/medusa.py) and Hydra's sequentially dependent heads (eagle3/methods/hydra.py): checkpoint
layouts (Medusa's and Hydra's published ones), training (`train --method medusa|hydra`, exact resume), and decoding with
them: greedy output equal to plain decoding on chains and trees, alone and batched, and sampled output drawn
from the target's distribution."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from eagle3.cli import main
from eagle3.methods.drafter import load_drafter
from eagle3.decoding.generate import generate
from eagle3.methods.medusa import HEADS_FILE, MedusaDrafter, load_medusa, new_heads, save_medusa
from eagle3.decoding.speculative import speculative_generate
from eagle3.training.train import TrainConfig, train
from eagle3.decoding.tree import AUTO_TREE, TreeSpec
from training_checks import (PROMPTS, assert_batched_and_sampled_exactly, assert_decodes_losslessly, assert_loss_fell,
                             assert_resumes_exactly, story_conversations)  # fmt: skip

MEDUSA = TrainConfig(method="medusa", heads=3, head_layers=1, steps=60, batch_size=4, lr=3e-3, warmup=5,
                     save_every=30)  # fmt: skip
HYDRA = dataclasses.replace(MEDUSA, method="hydra")


@pytest.fixture(scope="module")
def trained(stories, examples, tmp_path_factory):
    out = tmp_path_factory.mktemp("medusa") / "run"
    heads, state = train(stories, examples, out, MEDUSA, progress=False)
    return out / "draft", heads, state


def test_the_checkpoint_is_in_medusas_layout_and_round_trips(stories, tmp_path):
    heads = new_heads(stories.model, num_heads=2, num_layers=1, seed=3)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.01 * torch.randn(p.shape))
    save_medusa(heads, tmp_path / "m", "stories260k")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["medusa_num_heads"] == 2 and config["medusa_num_layers"] == 1
    assert config["base_model_name_or_path"] == "stories260k"
    H, V = stories.model.config.hidden_size, stories.model.config.vocab_size
    assert {k: tuple(v.shape) for k, v in load_file(tmp_path / "m" / HEADS_FILE).items()} == {
        "0.0.linear.weight": (H, H), "0.0.linear.bias": (H,), "0.1.weight": (V, H),
        "1.0.linear.weight": (H, H), "1.0.linear.bias": (H,), "1.1.weight": (V, H)}  # fmt: skip
    loaded = load_medusa(tmp_path / "m", stories.model.config)
    for key, value in heads.state_dict().items():
        assert torch.equal(value.cpu(), loaded.state_dict()[key]), key
    # The heads' output layers start as the target's lm_head: head 0 on the normed feature of a position gives
    # the target's own logits for it.
    fresh = new_heads(stories.model, num_heads=1, num_layers=1)
    ids = torch.tensor([stories.encode("Once upon a time")])
    stories.model.setup_cache(ids.shape[1])
    out = stories.model(ids, taps=(stories.model.config.num_layers,))
    from eagle3.methods.heads import normed_feature

    torch.testing.assert_close(fresh(normed_feature(stories.model, out.taps))[0], out.logits, atol=1e-4, rtol=1e-4)


def test_hydra_checkpoints_are_in_hydras_layout_and_round_trip(stories, tmp_path, capsys):
    from eagle3.methods.hydra import HEADS_FILE as HYDRA_FILE, load_hydra, new_heads as new_hydra_heads, save_hydra

    heads = new_hydra_heads(stories.model, num_heads=2, num_layers=2, seed=3)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.01 * torch.randn(p.shape))
    save_hydra(heads, tmp_path / "h", "stories260k")
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    assert config["hydra_num_heads"] == 2 and config["hydra_num_layers"] == 2 and config["hydra_head_arch"] == "mlp"
    assert config["grounded_heads"] is True and config["hidden_state_offset"] == 0
    H, V = stories.model.config.hidden_size, stories.model.config.vocab_size
    state = torch.load(tmp_path / "h" / HYDRA_FILE, weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        **{f"hydra_mlp.{k}.0.{name}.{part}": (H, (k + 2) * H) if part == "weight" else (H,)
           for k in range(2) for name in ("linear", "res_connection") for part in ("weight", "bias")},
        **{f"hydra_mlp.{k}.1.linear.{part}": (H, H) if part == "weight" else (H,) for k in range(2) for part in ("weight", "bias")},
        **{f"hydra_lm_head.{k}.{part}": (V, H) if part == "weight" else (V,) for k in range(2) for part in ("weight", "bias")},
    }  # fmt: skip
    loaded = load_hydra(tmp_path / "h", stories.model.config)
    for key, value in heads.state_dict().items():
        assert torch.equal(value.cpu(), loaded.state_dict()[key]), key
    (tmp_path / "h" / "config.json").write_text(json.dumps({**config, "hydra_head_arch": "cross-attn"}))
    args = ["generate", "Once", "--target", str(stories.path), "--draft", str(tmp_path / "h"), "--tree", "4,3,1"]
    assert main(args) == 2 and "cross-attn" in capsys.readouterr().err


def test_a_checkpoint_for_another_model_is_refused(stories, tmp_path, capsys):
    from eagle3.methods.medusa import MedusaHeads

    save_medusa(MedusaHeads(2, 1, stories.model.config.hidden_size, 100), tmp_path / "m", "x")
    with pytest.raises(ValueError, match="do not fit this target"):
        load_medusa(tmp_path / "m", stories.model.config)
    (tmp_path / "m" / HEADS_FILE).write_bytes(b"not a safetensors file")
    args = ["generate", "Once", "--target", str(stories.path), "--draft", str(tmp_path / "m"), "--tree", "4,3,1"]
    assert main(args) == 2 and "not a readable Medusa checkpoint" in capsys.readouterr().err


@pytest.fixture(scope="module")
def hydra_trained(stories, examples, tmp_path_factory):
    out = tmp_path_factory.mktemp("hydra") / "run"
    heads, state = train(stories, examples, out, HYDRA, progress=False)
    return out / "draft", heads, state


@pytest.fixture(params=["medusa", "hydra"])
def kind(request):
    """Each kind of heads: (its name, its trained run, its training config)."""
    run = request.getfixturevalue("trained" if request.param == "medusa" else "hydra_trained")
    return request.param, run, MEDUSA if request.param == "medusa" else HYDRA


def test_training_learns_and_the_heads_decode_losslessly(stories, kind):
    from eagle3.methods.hydra import HydraDrafter, load_hydra

    name, (folder, heads, state), _ = kind
    assert_loss_fell(state, 0.8)
    loaded = (load_medusa if name == "medusa" else load_hydra)(folder, stories.model.config)
    for key, value in heads.state_dict().items():
        assert torch.equal(value.cpu(), loaded.state_dict()[key]), key
    drafter = load_drafter(folder, stories)
    assert isinstance(drafter, MedusaDrafter if name == "medusa" else HydraDrafter)
    assert drafter.tap_layers == (stories.model.config.num_layers,)
    assert_decodes_losslessly(stories, drafter, (TreeSpec(4, 3, 1), TreeSpec(10, 3, 3)), name, 1.2)


def test_rows_decoded_together_equal_each_alone_and_sampling_is_exact(stories, kind):
    drafter = load_drafter(kind[1][0], stories)
    assert_batched_and_sampled_exactly(stories, drafter, TreeSpec(6, 3, 2))


def test_auto_trees_price_the_heads_and_decode_losslessly(stories, kind, tmp_path, monkeypatch):
    from eagle3.decoding.autotree import auto_tree

    monkeypatch.setenv("EAGLE3_HOME", str(tmp_path))
    name, (folder, _, _), _ = kind
    drafter = load_drafter(folder, stories)
    policy = auto_tree(stories, drafter, AUTO_TREE)  # (measured: the heads' pass apart from the tree levels)
    assert set(policy.cost.first_ms) == {1} and policy.cost.first_ms[1] > 0
    assert all(ms >= 0 for ms in policy.cost.draft_ms.values())
    for text in PROMPTS:
        prompt = stories.encode(text)
        out = speculative_generate(stories, drafter, prompt, 48, tree=AUTO_TREE, method=name, policy=policy)
        assert out.token_ids == generate(stories, prompt, 48).token_ids, text


def test_training_resumes_exactly(stories, examples, tmp_path, kind):
    assert_resumes_exactly(stories, examples, tmp_path, kind[2])


def test_the_cli_trains_heads_and_decodes_with_them(stories, trained, tmp_path, capsys):
    data = story_conversations(tmp_path / "data.jsonl")
    assert main(["train", "--method", "medusa", "--target", "stories260k", "--data", str(data), "--steps", "3",
                 "--batch-size", "2", "--heads", "2", "--eval-conversations", "2",
                 "--out", str(tmp_path / "run")]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["tau"]["chain"] >= 1 and summary["tau"]["tree"] >= 1
    assert (tmp_path / "run" / "draft" / HEADS_FILE).is_file()
    args = ["generate", "Once upon a time", "--target", str(stories.path), "--max-new-tokens", "24", "--json",
            "--threads", "1"]  # fmt: skip
    capsys.readouterr()
    assert main([*args, "--draft", "none"]) == 0
    plain = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert main([*args, "--draft", str(trained[0]), "--tree", "8,3,2"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["token_ids"] == plain["token_ids"]
    assert main([*args, "--draft", str(trained[0])]) == 0  # (the auto tree, lookup chains grafted on by default)
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["token_ids"] == plain["token_ids"]


def test_the_bench_runs_medusa_beside_vanilla(stories, trained, tmp_path, capsys):
    from test_bench import write_suite

    data = tmp_path / "eval"
    data.mkdir()
    write_suite(data, "mt_bench", [("writing", ["Once upon a time", "Then the dog said"])])
    args = ["bench", "--target", str(stories.path), "--threads", "1", "--suites", "mt_bench", "--methods",
            "vanilla,medusa", "--medusa", str(trained[0]), "--max-new-tokens", "16", "--data-dir", str(data)]  # fmt: skip
    assert main([*args, "--heads-tree", "6,3,2", "--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["config"]["heads_tree"] == "6,3,2"
    assert results["summary"]["medusa"]["all"]["identical"] == results["summary"]["medusa"]["all"]["n"] == 1
    capsys.readouterr()
    assert main([*args, "--heads-tree", "auto", "--out", str(tmp_path / "out2")]) == 2
    assert "auto is for the tree methods" in capsys.readouterr().err
    # Heads of the other kind under a method's option are refused in one line.
    assert main([*args[:8], "vanilla,hydra", "--hydra", str(trained[0]), *args[11:], "--out", str(tmp_path / "o3")]) == 2
    assert "not a readable Hydra checkpoint" in capsys.readouterr().err


def test_hydra_children_depend_on_their_path(stories, hydra_trained):
    """What makes Hydra Hydra: two nodes of one depth get different children when their paths differ (Medusa
    gives every node of a depth the same)."""
    from eagle3.decoding.policy import TreePlan

    drafter = load_drafter(hydra_trained[0], stories)
    drafter.open(1, 64)
    prompt = stories.encode("Once upon a time")
    drafter.join(0, prompt)
    stories.model.setup_cache(len(prompt))
    taps = stories.model(torch.tensor([prompt]), taps=drafter.tap_layers).taps[0]
    drafter.commit(0, torch.tensor(prompt[1:] + [prompt[-1]]), taps)
    tree = drafter.propose(TreePlan([TreeSpec(13, 2, 3)])).trees[0]
    level2 = [[int(tree.tokens[c]) for c in tree.children[n]] for n in tree.children[0] if tree.children[n]]
    assert len(level2) >= 2 and any(children != level2[0] for children in level2[1:])
