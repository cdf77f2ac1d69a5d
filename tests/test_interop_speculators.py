"""Drafts and speculators (vLLM's draft library), proven by speculators' own code: its Eagle3 model class loads
our speculators-layout export and, on the same token ids and taps, computes our logits; a draft speculators
creates and saves loads here, computes its logits, and decodes losslessly.

Skipped with the reason when speculators is not installed (`bash scripts/interop.sh` installs it; setup.sh
does too, without its CUDA dependencies)."""

from __future__ import annotations

import pytest
import torch

eagle3_models = pytest.importorskip("speculators.models.eagle3", reason="speculators is not installed "
                                    "(bash scripts/interop.sh installs it)")  # fmt: skip

from eagle3.formats.checkpoint import load_draft, save_draft  # noqa: E402
from eagle3.methods.draft import new_draft  # noqa: E402
from interop import T, assert_decodes_losslessly, assert_same_logits, varied  # noqa: E402


def theirs(model, tokens, hidden, positions) -> torch.Tensor:
    """speculators' forward (one step of its training-time test), its lm_head output captured."""
    captured = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        with torch.no_grad():
            model(hidden_states=hidden[None], input_ids=tokens[None], document_ids=torch.zeros(1, T, dtype=torch.long),
                  position_ids=positions[None], ttt_steps=1)  # fmt: skip
    finally:
        hook.remove()
    return captured[0][0]


def eager(config):
    """speculators' dense-mask attention (its default, flex attention, wants a compiler on the CPU)."""
    config.transformer_layer_config._attn_implementation = "eager"
    return config


def test_speculators_loads_our_export_and_computes_our_logits(stories, tmp_path):
    draft = varied(new_draft(stories.model.config, draft_vocab_size=256, seed=3))
    assert draft.config.tap_layers == (1, 2, 4)
    out = save_draft(draft, tmp_path / "spec", format="speculators", verifier=str(stories.path))
    config = eager(eagle3_models.Eagle3SpeculatorConfig.from_pretrained(out))
    model = eagle3_models.Eagle3DraftModel.from_pretrained(out, config=config).eval()
    assert model.target_layer_ids == [1, 2, 4]  # vLLM's convention (layer inputs) is ours: the same layers
    with torch.no_grad():
        model.embed_tokens.weight.copy_(stories.model.embed.weight)
    assert torch.equal(model.d2t, draft.d2t) and torch.equal(model.t2d, draft.t2d)
    assert_same_logits(lambda *args: theirs(model, *args), draft, stories)


def test_a_draft_speculators_saves_loads_here_and_decodes_losslessly(stories, tmp_path):
    from transformers import AutoConfig

    verifier = AutoConfig.from_pretrained(stories.path)
    verifier.num_hidden_layers = 1  # the draft's one decoder layer
    torch.manual_seed(5)
    model = eagle3_models.Eagle3DraftModel.from_training_args(
        verifier, verifier_name_or_path=str(stories.path), draft_vocab_size=stories.model.config.vocab_size,
        norm_before_residual=False, ttt_steps=3, target_layer_ids=[1, 2, 4], draft_attn_impl="eager").eval()  # fmt: skip
    model.save_pretrained(tmp_path / "saved")
    draft = varied(load_draft(tmp_path / "saved", stories.model.config, device="cpu"))
    assert draft.config.tap_layers == (1, 2, 4)
    with torch.no_grad():  # the same norms on their side
        theirs_by_name = dict(model.named_parameters())
        for name, p in draft.named_parameters():
            if "norm" in name:
                theirs_by_name[name.replace("midlayer.", "layers.0.")].copy_(p)
    assert_same_logits(lambda *args: theirs(model, *args), draft, stories, seed=1)
    assert_decodes_losslessly(draft, stories)
