"""EAGLE's draft (eagle3/methods/eagle1.py), for EAGLE, EAGLE-2 and HASS: the layer computes what EAGLE's draft
computes, checkpoints in EAGLE's published layout (what its own training writes loads too), training
(`train --method eagle|hass`, exact resume), and decoding: greedy output equal to plain decoding on chains and
trees, alone and batched, and sampled output drawn from the target's distribution."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from eagle3.cli import main
from eagle3.methods.drafter import load_drafter
from eagle3.methods.eagle1 import (WEIGHTS, Eagle1Drafter, is_eagle1_checkpoint, load_eagle1, new_eagle1_draft,
                                   save_eagle1)  # fmt: skip
from eagle3.decoding.generate import generate
from eagle3.methods.heads import normed_feature, target_lm_head
from eagle3.decoding.speculative import speculative_generate
from eagle3.training.train import TrainConfig, train
from eagle3.decoding.tree import TreeSpec
from training_checks import (PROMPTS, assert_batched_and_sampled_exactly, assert_decodes_losslessly, assert_loss_fell,
                             assert_resumes_exactly, story_conversations)  # fmt: skip

EAGLE = TrainConfig(method="eagle", steps=60, batch_size=4, lr=3e-3, warmup=5, save_every=30)
HASS = dataclasses.replace(EAGLE, method="hass", ttt_steps=3)


def perturbed(draft, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return draft


def reference_features(draft, embed: torch.Tensor, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """EAGLE's draft written out by hand from its state dict (fc over [embedding ; feature], one causal Llama
    layer without an input norm, RoPE with half-split pairs): the predicted features [L, H]."""
    s, cfg = draft.state_dict(), draft.config
    L, hd = len(tokens), cfg.head_dim
    x = F.linear(torch.cat([embed[tokens], features], -1), s["fc.weight"], s["fc.bias"])
    q = (x @ s["layers.0.self_attn.q_proj.weight"].t()).view(L, cfg.num_heads, hd).transpose(0, 1)
    k = (x @ s["layers.0.self_attn.k_proj.weight"].t()).view(L, cfg.num_kv_heads, hd).transpose(0, 1)
    v = (x @ s["layers.0.self_attn.v_proj.weight"].t()).view(L, cfg.num_kv_heads, hd).transpose(0, 1)
    inv = 1.0 / cfg.rope.theta ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.arange(L).float()[:, None] * inv
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(t):
        return t * cos + torch.cat([-t[..., hd // 2 :], t[..., : hd // 2]], -1) * sin

    groups = cfg.num_heads // cfg.num_kv_heads
    att = F.scaled_dot_product_attention(rope(q), rope(k).repeat_interleave(groups, 0), v.repeat_interleave(groups, 0),
                                         is_causal=True)  # fmt: skip
    h = x + att.transpose(0, 1).reshape(L, -1) @ s["layers.0.self_attn.o_proj.weight"].t()
    normed = F.rms_norm(h, (h.shape[-1],), s["layers.0.post_attention_layernorm.weight"], cfg.rms_norm_eps)
    mlp = (F.silu(normed @ s["layers.0.mlp.gate_proj.weight"].t()) * (normed @ s["layers.0.mlp.up_proj.weight"].t()))
    return h + mlp @ s["layers.0.mlp.down_proj.weight"].t()


def test_the_draft_computes_eagles_layer_and_reads_the_targets_normed_top_feature(stories):
    model = stories.model
    draft = perturbed(new_eagle1_draft(model.config, seed=2))
    draft.attach(model.embed.weight, target_lm_head(model))
    ids = torch.tensor([stories.encode("Once upon a time there was a dog")])
    model.setup_cache(ids.shape[1])
    out = model(ids, taps=(model.config.num_layers,))
    feature = normed_feature(model, out.taps)
    # The target's lm_head on its own normed feature gives its logits: the head the draft shares is right.
    torch.testing.assert_close(draft.logits(feature), out.logits, atol=1e-4, rtol=1e-4)
    tokens, features = ids[0, 1:], feature[0, :-1]
    draft.setup_cache(64)
    h = draft(tokens[None], features[None], torch.arange(len(tokens)))
    reference = reference_features(draft, model.embed.weight.detach(), tokens, features)
    torch.testing.assert_close(h[0], reference, atol=1e-5, rtol=1e-4)


def test_the_checkpoint_is_in_eagles_layout_and_round_trips(stories, tmp_path):
    cfg = stories.model.config
    draft = perturbed(new_eagle1_draft(cfg, seed=3))
    save_eagle1(draft, tmp_path / "e", "stories260k")
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 1
    assert config["bias"] is True and (config["hidden_size"], config["vocab_size"]) == (cfg.hidden_size, cfg.vocab_size)
    H, I, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = "layers.0."
    assert {k: tuple(v.shape) for k, v in load_file(tmp_path / "e" / WEIGHTS).items()} == {
        "fc.weight": (H, 2 * H), "fc.bias": (H,), layer + "self_attn.q_proj.weight": (q, H),
        layer + "self_attn.k_proj.weight": (kv, H), layer + "self_attn.v_proj.weight": (kv, H),
        layer + "self_attn.o_proj.weight": (H, q), layer + "post_attention_layernorm.weight": (H,),
        layer + "mlp.gate_proj.weight": (I, H), layer + "mlp.up_proj.weight": (I, H),
        layer + "mlp.down_proj.weight": (H, I)}  # fmt: skip
    loaded = load_eagle1(tmp_path / "e", cfg)
    for key, value in draft.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert is_eagle1_checkpoint(tmp_path / "e")
    # What EAGLE's own training writes: pytorch_model.bin with the token embeddings in it (ignored: the
    # target's are used).
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "e" / "config.json").read_text())
    state = {**draft.state_dict(), "embed_tokens.weight": torch.zeros(cfg.vocab_size, H)}
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    assert is_eagle1_checkpoint(tmp_path / "bin")
    assert torch.equal(load_eagle1(tmp_path / "bin", cfg).fc.weight, draft.fc.weight)
    assert isinstance(load_drafter(tmp_path / "bin", stories), Eagle1Drafter)


def test_other_checkpoints_are_not_taken_for_eagles_and_bad_ones_are_refused(stories, tmp_path, capsys):
    from eagle3.formats.checkpoint import save_draft
    from eagle3.methods.draft import new_draft

    save_draft(new_draft(stories.model.config), tmp_path / "eagle3")
    assert not is_eagle1_checkpoint(tmp_path / "eagle3") and not is_eagle1_checkpoint(stories.path)
    draft = new_eagle1_draft(stories.model.config)
    save_eagle1(draft, tmp_path / "e", "x")
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    (tmp_path / "e" / "config.json").write_text(json.dumps({**config, "hidden_size": 2 * config["hidden_size"]}))
    with pytest.raises(ValueError, match="do not match"):
        load_eagle1(tmp_path / "e", stories.model.config)
    (tmp_path / "e" / "config.json").write_text(json.dumps(config))
    state = load_file(tmp_path / "e" / WEIGHTS)
    state.pop("fc.bias")
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "e" / WEIGHTS))
    args = ["generate", "Once", "--target", str(stories.path), "--draft", str(tmp_path / "e"), "--tree", "4,3,1"]
    assert main(args) == 2 and "fc.bias" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(stories, examples, tmp_path_factory):
    out = tmp_path_factory.mktemp("eagle") / "run"
    draft, state = train(stories, examples, out, EAGLE, progress=False)
    return out / "draft", draft, state


@pytest.fixture(scope="module")
def hass_trained(stories, examples, tmp_path_factory):
    out = tmp_path_factory.mktemp("hass") / "run"
    draft, state = train(stories, examples, out, HASS, progress=False)
    return out / "draft", draft, state


@pytest.fixture(params=["eagle", "hass"])
def kind(request):
    """Each training method: (its name, its trained run, its training config)."""
    run = request.getfixturevalue("trained" if request.param == "eagle" else "hass_trained")
    return request.param, run, EAGLE if request.param == "eagle" else HASS


def test_training_learns_and_the_draft_decodes_losslessly(stories, kind):
    name, (folder, draft, state), cfg = kind
    assert_loss_fell(state, 0.8)
    last = json.loads((folder.parent / "train_log.jsonl").read_text().splitlines()[-1])
    assert len(last["loss"]) == cfg.ttt_steps if name == "hass" else len(last["loss"]) == 1  # a loss per aligned step
    loaded = load_eagle1(folder, stories.model.config)
    for key, value in draft.state_dict().items():
        assert torch.equal(value.cpu(), loaded.state_dict()[key]), key
    drafter = load_drafter(folder, stories)
    assert isinstance(drafter, Eagle1Drafter) and drafter.tap_layers == (stories.model.config.num_layers,)
    assert_decodes_losslessly(stories, drafter, (TreeSpec(4, 3, 1), TreeSpec(12, 4, 3)), name, 1.3)


def test_rows_decoded_together_equal_each_alone_and_sampling_is_exact(stories, trained):
    drafter = load_drafter(trained[0], stories)
    assert_batched_and_sampled_exactly(stories, drafter, TreeSpec(8, 3, 2))


def test_training_resumes_exactly(stories, examples, tmp_path, kind):
    assert_resumes_exactly(stories, examples, tmp_path, kind[2])


def test_the_cli_trains_and_decodes_and_the_bench_runs_eagle2(stories, trained, tmp_path, capsys):
    from test_bench import write_suite

    data = story_conversations(tmp_path / "data.jsonl")
    assert main(["train", "--method", "eagle", "--target", "stories260k", "--data", str(data), "--steps", "3",
                 "--batch-size", "2", "--eval-conversations", "2", "--out", str(tmp_path / "run")]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["tau"]["chain"] >= 1 and summary["tau"]["tree"] >= 1
    assert is_eagle1_checkpoint(tmp_path / "run" / "draft")
    args = ["generate", "Once upon a time", "--target", str(stories.path), "--max-new-tokens", "24", "--json",
            "--threads", "1"]  # fmt: skip
    capsys.readouterr()
    assert main([*args, "--draft", "none"]) == 0
    plain = json.loads(capsys.readouterr().out.splitlines()[-1])
    for tree in ("8,3,2", "auto"):
        assert main([*args, "--draft", str(trained[0]), "--tree", tree]) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["token_ids"] == plain["token_ids"]
    suites = tmp_path / "eval"
    suites.mkdir()
    write_suite(suites, "mt_bench", [("writing", ["Once upon a time", "Then the dog said"])])
    assert main(["bench", "--target", str(stories.path), "--threads", "1", "--suites", "mt_bench", "--methods",
                 "vanilla,eagle2", "--eagle", str(trained[0]), "--tree", "8,3,2", "--max-new-tokens", "16",
                 "--data-dir", str(suites), "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["summary"]["eagle2"]["all"]["identical"] == results["summary"]["eagle2"]["all"]["n"] == 1


def test_on_the_native_runtime_the_step_runs_natively_and_stays_lossless(stories, trained):
    from eagle3.runtimes import native
    from eagle3.runtimes.target import load_target

    if native.library() is None:
        pytest.skip(f"eagle3's native kernels are unavailable here: {native.why_unavailable()}")
    target = load_target(str(stories.path), runtime="native")
    drafter = load_drafter(trained[0], target, int8=False)
    assert drafter.draft.native is not None and drafter.draft.native.precision == "fp32"
    reference = load_eagle1(trained[0], stories.model.config)
    reference.attach(stories.model.embed.weight, target_lm_head(stories.model))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, stories.model.config.vocab_size, (2, 6), generator=gen)
    features = torch.randn(2, 6, stories.model.config.hidden_size, generator=gen)
    for draft in (drafter.draft, reference):
        draft.setup_cache(32, batch_size=2)
    with torch.no_grad():
        fast, slow = drafter.draft(tokens, features, torch.arange(6)), reference(tokens, features, torch.arange(6))
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    for text in PROMPTS:
        prompt = target.encode(text)
        out = speculative_generate(target, load_drafter(trained[0], target), prompt, 40, tree=TreeSpec(8, 3, 2))
        assert out.token_ids == generate(target, prompt, 40).token_ids, text
