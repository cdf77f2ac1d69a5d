"""Drafts and SpecForge (SGLang's draft trainer), proven by SpecForge's own code: its EAGLE-3 draft class loads our
official-layout export, reads the layers we tapped, and on the same token ids and taps computes our logits
through its training path; a draft SpecForge builds and saves the way its SGLang exporter does loads here,
computes its logits, and decodes losslessly.

Skipped with the reason when SpecForge is not installed (`bash scripts/setup.sh` installs it without its
dependencies: it pins torch 2.11 and SGLang, neither of which its draft model needs)."""

from __future__ import annotations

import pytest
import torch

auto = pytest.importorskip("specforge.modeling.auto", reason="SpecForge is not installed (bash scripts/setup.sh "
                           "installs it without its dependencies)")  # fmt: skip

from specforge.algorithms.model_providers import resolve_eagle_capture_layers  # noqa: E402
from specforge.modeling.draft.llama3_eagle import LlamaForCausalLMEagle3, prepare_decoder_attention_mask  # noqa: E402

from eagle3.formats.checkpoint import load_draft, save_draft  # noqa: E402
from eagle3.methods.draft import new_draft  # noqa: E402
from interop import T, assert_decodes_losslessly, assert_same_logits, scattered, varied  # noqa: E402


class NoRunOverride:
    """SpecForge's run config with no capture-layer override: the layers come from the draft's config."""

    class model:
        aux_hidden_state_layer_ids = None


def theirs(model, tokens, hidden, positions) -> torch.Tensor:
    """SpecForge's training step for the first position of its training-time test: embed, fuse the taps, run the
    decoder layer with its TTT cache, then its logits."""
    with torch.no_grad():
        fused = model.project_hidden_states(hidden[None])
        mask = prepare_decoder_attention_mask(torch.ones(1, T, dtype=torch.bool), (1, T), fused, 0)
        out = model.backbone(model.embed_input_ids(tokens[None]), fused, cache_hidden=[[], []], attention_mask=mask,
                             position_ids=positions[None])  # fmt: skip
        return model.compute_logits(out)[0]


def test_specforge_loads_our_export_and_computes_our_logits(stories, tmp_path):
    draft = scattered(varied(new_draft(stories.model.config, draft_vocab_size=256, seed=3)), stories.model.config.vocab_size)
    assert draft.config.tap_layers == (1, 2, 4)
    out = save_draft(draft, tmp_path / "official", format="eagle", verifier=str(stories.path))
    model = auto.AutoDraftModel.from_pretrained(out, attention_backend="sdpa").eval()
    assert isinstance(model, LlamaForCausalLMEagle3)
    # Under this transformers (SpecForge pins 5.8.1), from_pretrained builds the model on the meta device and
    # leaves its non-persistent RoPE tables unfilled; SpecForge's own _init_rope fills them again.
    model.midlayer.self_attn._init_rope()
    # SpecForge captures SGLang's layer outputs: one below our taps (layer inputs), the same layers.
    assert resolve_eagle_capture_layers(NoRunOverride, model.config, stories.model.config) == [0, 1, 3]
    model.load_embedding(str(stories.path))  # (as its trainer does: the frozen embedding comes from the target)
    assert torch.equal(model.d2t, draft.d2t) and torch.equal(model.t2d, draft.t2d)
    assert_same_logits(lambda *args: theirs(model, *args), draft, stories)


def test_a_draft_specforge_saves_loads_here_and_decodes_losslessly(stories, tmp_path):
    from transformers import LlamaConfig

    target = stories.model.config
    config = LlamaConfig.from_pretrained(stories.path)
    config.architectures = ["LlamaForCausalLMEagle3"]
    config.num_hidden_layers = 1
    config.draft_vocab_size = 256
    config.eagle_config = {"eagle_aux_hidden_state_layer_ids": [0, 1, 3]}  # (SGLang's numbering: taps 1, 2, 4)
    torch.manual_seed(5)
    model = auto.AutoDraftModel.from_config(config, attention_backend="sdpa").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape))
    scattered(model, target.vocab_size, seed=2)
    # What SpecForge's SGLang exporter writes: the state without the (frozen, target-owned) embedding.
    model.save_pretrained(tmp_path / "saved", state_dict={k: v for k, v in model.state_dict().items()
                                                          if "embed" not in k})  # fmt: skip
    draft = load_draft(tmp_path / "saved", target, device="cpu")
    assert draft.config.tap_layers == (1, 2, 4)
    assert torch.equal(draft.d2t, model.d2t) and torch.equal(draft.t2d, model.t2d)
    model.load_embedding(str(stories.path))
    assert_same_logits(lambda *args: theirs(model, *args), draft, stories, seed=1)
    assert_decodes_losslessly(draft, stories)
