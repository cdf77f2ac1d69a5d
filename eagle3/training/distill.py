"""Distilling a draft language model for classic speculative sampling (SpS, sps.py): `eagle3 train --method sps`.

A target with no smaller sibling (SmolLM2-135M has none) gets one: a few Llama layers of a small width with the
target's vocabulary, RoPE and norms, trained on the same conversations as an EAGLE-3 head against the frozen
target's distribution: at every position whose next token is trained on, cross-entropy of the draft's
prediction against the target's softmax (the KL divergence up to the target's entropy). The shared loop in
train.py runs it (batches, resume, signals, data parallel); this module holds what differs from EAGLE-3's:
the model, its loss and its output folder, a transformers Llama checkpoint with the target's tokenizer that
`--draft FOLDER` decodes with (sps.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eagle3.runtimes.target import Target


def draft_lm_config(target: Target, layers: int, hidden: int) -> dict:
    """A transformers LlamaConfig (as a dict) for a draft of `layers` layers of width `hidden`: heads of 64,
    half as many key/value heads, an MLP 3x as wide, the target's vocabulary, RoPE base, norm epsilon and
    special tokens; input and output embeddings tied (they are most of a small model's weights)."""
    cfg = target.model.config
    if hidden % 64:
        raise ValueError(f"the draft model's width must be a multiple of 64 (its head size), got {hidden}")
    heads = hidden // 64
    eos = list(cfg.eos_token_ids)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": hidden, "intermediate_size": 3 * hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2), "head_dim": 64,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope.theta, "tie_word_embeddings": True, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
    }  # fmt: skip


def build_draft_lm(config: dict, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.config._attn_implementation = "sdpa"
    return model


class SpsObjective:
    """The draft language model and its distillation loss, for train.train."""

    method = "sps"

    def __init__(self, target: Target, layers: int, hidden: int, seed: int, saved: dict | None = None,
                 init: str | Path | None = None):  # fmt: skip
        device = target.model.device
        if saved is not None:
            self.config = dict(saved["draft_config"])
            self.model = build_draft_lm(self.config, seed)
            self.model.load_state_dict(saved["draft"])
        elif init is not None:
            from transformers import LlamaForCausalLM

            from eagle3.methods.sps import load_draft_model_drafter

            load_draft_model_drafter(init, target)  # (checks the vocabulary against the target's)
            self.model = LlamaForCausalLM.from_pretrained(init, dtype=torch.float32)
            self.config = {k: v for k, v in self.model.config.to_dict().items() if not k.startswith("_")}
        else:
            self.config = draft_lm_config(target, layers, hidden)
            self.model = build_draft_lm(self.config, seed)
        self.model.to(device)
        self.target = target

    def config_dict(self) -> dict:
        return self.config

    def loss(self, ids: Tensor, loss_mask: Tensor, items: list | None, reduce, autocast
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        """(loss to backpropagate, [loss] detached, [hits], [counted positions]) for a micro-batch: position t
        counts when token t + 1 is trained on; `reduce` sums a tensor over the data-parallel ranks (the loss is
        normalized by the whole batch's count); the draft runs under `autocast` (bf16 training), the target not."""
        if items is not None:
            raise ValueError("--features caches an EAGLE-3 draft's taps; --method sps trains from the target online")
        device = self.target.model.device
        ids = ids.to(device)
        with torch.no_grad():
            model = self.target.model
            model.empty_cache(ids.shape[1], batch_size=ids.shape[0])
            teacher_logits = model(ids, logits="all").logits[:, :-1]
        mask = loss_mask.to(device)[:, 1:].bool()
        count = reduce(mask.sum().float().reshape(1))
        with autocast:
            logits = self.model(input_ids=ids).logits[:, :-1]
        pred, teacher = logits[mask].float(), torch.softmax(teacher_logits[mask].float(), dim=-1)
        ce = -(teacher * F.log_softmax(pred, dim=-1)).sum()
        loss = ce / count.clamp(min=1)[0]
        hits = (pred.argmax(-1) == teacher.argmax(-1)).float().sum().reshape(1)
        return loss, loss.detach().reshape(1), hits, count

    def save(self, folder: Path, target: Target) -> None:
        """The draft as a transformers Llama checkpoint with the target's tokenizer (replacing folder whole)."""
        staging = folder.with_name(folder.name + ".part")
        shutil.rmtree(staging, ignore_errors=True)
        self.model.save_pretrained(staging)
        target.tokenizer.save_pretrained(staging)
        if folder.exists():
            shutil.rmtree(folder)
        staging.replace(folder)
