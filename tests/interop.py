"""What the interop tests share: the same inputs for both engines, our draft's logits on them, norm weights
moved away from 1 so that a norm applied to the wrong tensor shows, and a target and draft that show which
layer an engine taps."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

T = 12  # tokens in the compared sequence


def inputs(stories, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, three taps of the target and positions, as the drafter pairs them: the feature of position t
    with token t + 1 (every engine takes them so paired)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, stories.model.config.vocab_size, (T,), generator=g)
    hidden = torch.randn(T, 3 * stories.model.config.hidden_size, generator=g)
    return tokens, hidden, torch.arange(T)


def ours(draft, stories, tokens, hidden, positions) -> torch.Tensor:
    draft.attach(stories.model.embed.weight)
    draft.setup_cache(T + 1)
    with torch.no_grad():
        return draft.logits(draft(tokens[None], hidden[None], positions))[0]


def assert_same_logits(theirs, draft, stories, seed: int = 0) -> None:
    """An engine's draft logits, theirs(tokens, hidden, positions), equal ours on the same inputs (fp32)."""
    tokens, hidden, positions = inputs(stories, seed)
    expected = ours(draft, stories, tokens, hidden, positions)
    got = theirs(tokens, hidden, positions)
    assert got.shape == expected.shape == (T, draft.config.draft_vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def assert_decodes_losslessly(draft, stories) -> None:
    """Our decoding with the draft equals plain greedy decoding, token for token."""
    from eagle3.methods.drafter import Eagle3Drafter
    from eagle3.decoding.generate import generate
    from eagle3.decoding.speculative import speculative_generate
    from eagle3.decoding.tree import TreeSpec

    prompt = stories.encode("Once upon a time")
    drafter = Eagle3Drafter(draft.attach(stories.model.embed.weight))
    spec = speculative_generate(stories, drafter, prompt, 40, tree=TreeSpec(8, 3, 2))
    assert spec.token_ids == generate(stories, prompt, 40).token_ids


def varied(draft):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return draft


def scattered(draft, target_vocab_size: int, seed: int = 9):
    """A draft vocabulary of random target ids, so that an engine reading d2t wrongly shows."""
    n = draft.d2t.numel()
    g = torch.Generator().manual_seed(seed)
    kept = torch.randperm(target_vocab_size, generator=g)[:n].sort().values  # target ids
    with torch.no_grad():
        draft.d2t.copy_(kept - torch.arange(n))  # (draft id i is target id i + d2t[i])
        draft.t2d.zero_()
        draft.t2d[kept] = True
    return draft


# A target in which one layer's output alone carries a marker, and a draft that guesses the target's token only
# when it sees the marker in its third tap: an engine's acceptance then says exactly which layer it feeds the
# draft (a trained draft cannot tell neighbouring layers apart). The target always predicts token A: layer 3
# writes the marker on channel M (from a constant channel of the embeddings), layer 4 takes it away again, and
# attention adds nothing. Our tap 4 (layer 4's input) is layer 3's output; taps 3 and 5 miss the marker.
MARK_CHANNEL, TOKEN_A, TOKEN_B, MARKED_TAPS = 5, 7, 9, (1, 2, 4)


def marked_target_folder(path: Path, tokenizer_from: Path) -> Path:
    """The marked target as a transformers Llama checkpoint folder (stories260K's tokenizer and vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=16, num_hidden_layers=6, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    M = MARK_CHANNEL
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.zeros_like(p))
        embed = model.model.embed_tokens.weight
        embed[:, 0] = 1.0
        embed[:, 8:] = 0.01 * torch.randn(embed.shape[0], 8)
        for layer in model.model.layers:  # (attention reads, but its output projection stays zero)
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight.normal_(0, 0.1)
        put, take = model.model.layers[3].mlp, model.model.layers[4].mlp
        put.gate_proj.weight[0, 0], put.up_proj.weight[0, 0], put.down_proj.weight[M, 0] = 4.0, 1.0, 5.0 / 64
        take.gate_proj.weight[0, 0], take.up_proj.weight[0, M], take.down_proj.weight[M, 0] = 10.0, 1.0, -0.1624
        model.lm_head.weight[TOKEN_A, 0] = 10.0
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_from / name, path / name)
    return path


def marker_draft(target_config, taps: tuple[int, int, int] = MARKED_TAPS):
    """Predicts A when its third tap holds the marker, B otherwise; full vocabulary."""
    from eagle3.methods.draft import new_draft

    draft = new_draft(target_config, tap_layers=taps)
    D = target_config.hidden_size
    with torch.no_grad():
        for name, p in draft.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.zeros_like(p))
        draft.fc.weight[0, 2 * D + MARK_CHANNEL] = 1.0  # the third tap's marker ...
        draft.fc.weight[1, 2 * D] = 1.0  # ... and its constant channel
        draft.lm_head.weight[TOKEN_A, 0], draft.lm_head.weight[TOKEN_B, 1] = 1.0, 2.0
    return draft
