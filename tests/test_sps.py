"""Classic speculative sampling (SpS, eagle3/methods/sps.py): a draft language model with the target's vocabulary, and
its distillation (`eagle3 train --method sps`, eagle3/training/distill.py).

`--draft FOLDER` with a language model in it gives the SpS drafter; its greedy output is the target's, token
for token, on chains and trees, alone and batched. Its sampling exactness is test_sampling_exact.py's and
test_batch.py's "oracle" case: TargetOracle is this drafter with the target itself as the draft model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from eagle3.cli import main
from eagle3.methods.drafter import load_drafter
from eagle3.decoding.engine import Engine, Request
from eagle3.decoding.generate import generate
from eagle3.methods.sps import DraftModelDrafter
from eagle3.decoding.speculative import speculative_generate
from eagle3.training.train import TrainConfig, train
from eagle3.decoding.tree import AUTO_TREE, TreeSpec
from training_checks import assert_loss_fell, assert_resumes_exactly, story_conversations

PROMPTS = ("Once upon a time", "The little dog", "One day, Tom")


@pytest.fixture(scope="module")
def draft_folder(stories, tmp_path_factory):
    """stories260K with noise on every matrix: a draft that agrees with the target often, not always."""
    folder = tmp_path_factory.mktemp("sps") / "draft"
    shutil.copytree(stories.path, folder)
    g = torch.Generator().manual_seed(0)
    weights = {name: w + 0.05 * w.std() * torch.randn(w.shape, generator=g) if w.dim() == 2 else w
               for name, w in load_file(folder / "model.safetensors").items()}  # fmt: skip
    save_file(weights, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("tree", [TreeSpec(5, 4, 1), TreeSpec(8, 3, 2)], ids=["chain", "tree"])
def test_a_draft_model_proposes_and_greedy_output_is_the_targets(stories, draft_folder, tree):
    drafter = load_drafter(draft_folder, stories)
    assert isinstance(drafter, DraftModelDrafter) and drafter.tap_layers == ()
    accepted = []
    for text in PROMPTS:
        prompt = stories.encode(text)
        out = speculative_generate(stories, drafter, prompt, 48, tree=tree, method="sps")
        assert out.token_ids == generate(stories, prompt, 48).token_ids, text
        accepted += out.accept_lengths
    assert sum(accepted) / len(accepted) > 1.5  # (the noisy copy is right more often than not)


def test_auto_trees_price_the_draft_model_and_decode_losslessly(stories, draft_folder, tmp_path, monkeypatch):
    from eagle3.decoding.autotree import auto_tree

    monkeypatch.setenv("EAGLE3_HOME", str(tmp_path))
    drafter = load_drafter(draft_folder, stories)
    policy = auto_tree(stories, drafter, AUTO_TREE)
    first, level = policy.cost.first_ms, policy.cost.draft_ms
    assert first[64] > first[1] > 0 and level[64] > level[1] > 0  # (a level of n nodes runs n forwards)
    for text in PROMPTS:
        prompt = stories.encode(text)
        out = speculative_generate(stories, drafter, prompt, 48, tree=AUTO_TREE, method="sps", policy=policy)
        assert out.token_ids == generate(stories, prompt, 48).token_ids, text


def test_rows_decoded_together_equal_each_alone(stories, draft_folder):
    drafter = load_drafter(draft_folder, stories)
    prompts = [stories.encode(text) for text in PROMPTS]
    alone = [generate(stories, p, 40).token_ids for p in prompts]
    engine = Engine(stories, drafter, TreeSpec(5, 4, 1), max_rows=2)  # (three prompts on two rows: one waits)
    assert [r.token_ids for r in engine.run([Request(p, 40) for p in prompts])] == alone


def test_the_cli_runs_sps_and_refuses_what_it_cannot_do(stories, draft_folder, tmp_path, capsys):
    args = ["generate", "Once upon a time", "--target", str(stories.path), "--max-new-tokens", "24", "--json",
            "--threads", "1"]  # fmt: skip
    assert main([*args, "--draft", "none"]) == 0
    plain = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert main([*args, "--draft", str(draft_folder), "--tree", "5,4,1"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["token_ids"] == plain["token_ids"]
    assert main([*args, "--draft", str(draft_folder)]) == 0  # (--tree auto: the draft model times its steps)
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["token_ids"] == plain["token_ids"]
    assert main([*args, "--draft", str(draft_folder), "--tree", "5,4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tree") and err.count("\n") == 1
    # A language model with another vocabulary is refused in one line.
    other = tmp_path / "other"
    shutil.copytree(draft_folder, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 8}))
    weights = load_file(other / "model.safetensors")
    weights = {k: torch.cat([v, torch.zeros(8, v.shape[1])]) if v.shape[0] == config["vocab_size"] else v
               for k, v in weights.items()}  # fmt: skip
    save_file(weights, other / "model.safetensors")
    assert main([*args, "--draft", str(other), "--tree", "5,4,1"]) == 2
    assert "vocabulary" in capsys.readouterr().err


def test_the_bench_runs_sps_beside_vanilla(stories, draft_folder, tmp_path):
    from test_bench import write_suite

    data = tmp_path / "eval"
    data.mkdir()
    write_suite(data, "mt_bench", [("writing", ["Once upon a time", "Then the dog said"]),
                                   ("roleplay", ["Lily and Ben went", "They were happy"])])  # fmt: skip
    out = tmp_path / "out"
    assert main(["bench", "--target", str(stories.path), "--threads", "1", "--suites", "mt_bench", "--methods",
                 "vanilla,sps", "--assistant", str(draft_folder), "--sps-tokens", "3", "--max-new-tokens", "16",
                 "--data-dir", str(data), "--out", str(out)]) == 0  # fmt: skip
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary["sps"]["all"]["identical"] == summary["sps"]["all"]["n"] == 2
    assert summary["sps"]["all"]["tau"] > 1


# ---------------------------------------------------------------------------------------------- distillation

SPS = TrainConfig(method="sps", lm_layers=2, lm_hidden=64, steps=60, batch_size=4, lr=3e-3, warmup=5, save_every=30)


def test_distillation_learns_and_the_draft_model_decodes_losslessly(stories, examples, tmp_path):
    model, state = train(stories, examples, tmp_path, SPS, progress=False)
    assert_loss_fell(state, 0.7)
    drafter = load_drafter(tmp_path / "draft", stories)  # a transformers Llama folder with the target's tokenizer
    assert isinstance(drafter, DraftModelDrafter) and drafter.model.config.num_layers == 2
    prompt = stories.encode("Once upon a time")
    out = speculative_generate(stories, drafter, prompt, 64, tree=TreeSpec(5, 4, 1))
    assert out.token_ids == generate(stories, prompt, 64).token_ids
    assert out.tau > 1.2  # the distilled model agrees with the target often (an untrained one: about 1.0)


def test_distillation_resumes_exactly(stories, examples, tmp_path):
    assert_resumes_exactly(stories, examples, tmp_path, SPS)


def test_the_cli_distills_and_refuses_features(tmp_path, capsys):
    data = story_conversations(tmp_path / "data.jsonl")
    args = ["train", "--method", "sps", "--target", "stories260k", "--data", str(data), "--steps", "3",
            "--batch-size", "2", "--lm-layers", "1", "--lm-hidden", "64", "--eval-conversations", "2"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["tau"]["chain"] >= 1 and "tree" not in summary["tau"]
    assert (tmp_path / "run" / "draft" / "config.json").is_file()
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "run2"), "--features", str(tmp_path / "cache")]) == 2
    assert "--method sps" in capsys.readouterr().err and not (tmp_path / "cache").exists()
    assert main([*args, "--out", str(tmp_path / "run3"), "--lm-hidden", "100"]) == 2  # (not a multiple of 64)
