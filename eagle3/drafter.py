"""Drafters: what proposes tree nodes to the decoding loop.

A drafter follows the committed sequence and proposes children for tree nodes:
- `reset(prompt_ids, max_len)` at the start of a generation;
- `catch_up(tokens, features, start)` with the newly committed tokens and the target's true features at the
  positions before them (position start + i pairs feature i with token i), returning the root's top children;
- `expand(...)`, the tree.grow_tree callback, for tree nodes; `end_round()` forgets the tree's draft state.

`Eagle3Drafter` runs an EAGLE-3 head. Tests add an oracle drafter that runs the target itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import torch
from torch import Tensor

from eagle3.draft import Eagle3Draft
from eagle3.target import Target


class Drafter(Protocol):
    uses_features: bool  # whether catch_up needs the target's taps (optional attribute, default True)

    def reset(self, prompt_ids: Sequence[int], max_len: int) -> None: ...

    def catch_up(self, tokens: Tensor, features: Tensor, start: int, top_k: int) -> tuple[Tensor, Tensor]: ...

    def expand(self, tokens: Tensor, source_rows: Tensor, depth: int, mask: Tensor) -> tuple[Tensor, Tensor]: ...

    def end_round(self) -> None: ...


def top_children(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k log-probabilities and their ids over the last axis, without a full log_softmax."""
    values, ids = torch.topk(logits.float(), min(k, logits.shape[-1]), dim=-1)
    return values - torch.logsumexp(logits.float(), dim=-1, keepdim=True), ids


class Eagle3Drafter:
    """Proposes with an EAGLE-3 head: fed the target's true features for committed tokens, and its own
    outputs inside the tree."""

    uses_features = True

    def __init__(self, draft: Eagle3Draft):
        self.draft = draft
        self.top_k = 10
        self.committed = 0  # draft cache slots holding committed positions
        self.rows: list[Tensor] = []  # per draft row (0: root step), the output h that proposes its children

    def reset(self, prompt_ids: Sequence[int], max_len: int) -> None:
        if self.draft.cache is None or self.draft.cache.max_len < max_len:
            self.draft.setup_cache(max_len)
        self.draft.cache.truncate(0)
        self.committed = 0

    def catch_up(self, tokens: Tensor, features: Tensor, start: int, top_k: int) -> tuple[Tensor, Tensor]:
        draft = self.draft
        draft.cache.truncate(self.committed)
        if start != self.committed:
            raise RuntimeError(f"draft out of step: it holds {self.committed} positions, asked to continue at {start}")
        n = tokens.shape[-1]
        positions = torch.arange(start, start + n, device=tokens.device)
        h = draft(tokens.view(1, n), features.view(1, n, -1).to(draft.fc.weight.dtype), positions)
        self.committed = draft.cache.length
        self.top_k = top_k
        self.rows = [h[0, -1:]]
        logp, ids = top_children(draft.logits(h[0, -1]), top_k)
        return logp, draft.to_target_ids(ids)

    def expand(self, tokens: Tensor, source_rows: Tensor, depth: int, mask: Tensor) -> tuple[Tensor, Tensor]:
        draft = self.draft
        device = draft.fc.weight.device
        hidden = torch.cat(self.rows)[source_rows.to(device)]
        # The root sits at draft position committed - 1; a node at depth d (d >= 1) at committed - 1 + d.
        positions = torch.full((len(tokens),), self.committed - 1 + depth, device=device)
        h = draft(tokens.view(1, -1).to(device), hidden.unsqueeze(0), positions, mask.to(device), self.committed)
        self.rows.append(h[0])
        logp, ids = top_children(draft.logits(h[0]), self.top_k)
        return logp, draft.to_target_ids(ids)

    def end_round(self) -> None:
        self.draft.cache.truncate(self.committed)
        self.rows = []


def load_drafter(path: str | Path, target: Target, int8: bool | None = None) -> Eagle3Drafter:
    """An EAGLE-3 drafter from a checkpoint folder, checked against and attached to the target. int8: run the
    draft's lm_head in int8 (draft.quantize_int8); default: wherever it is supported (float32 on CPU)."""
    from eagle3.checkpoint import load_draft
    from eagle3.draft import int8_supported, quantize_int8

    model = target.model
    draft = load_draft(path, model.config, device=model.device, dtype=model.dtype)
    if int8 or (int8 is None and int8_supported(model.device, model.dtype)):
        quantize_int8(draft)
    return Eagle3Drafter(draft.attach(model.embed.weight))


INT8_CHOICES = {"auto": None, "on": True, "off": False}  # the CLI's --draft-int8, as load_drafter's int8


def add_draft_int8_argument(parser) -> None:
    parser.add_argument("--draft-int8", choices=tuple(INT8_CHOICES), default="auto",
                        help="the draft's lm_head in int8: auto (default: where supported, float32 on CPU), on or off")  # fmt: skip
