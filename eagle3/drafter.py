"""Drafters: what proposes tree nodes to the decoding loop.

A drafter follows the committed sequence and proposes children for tree nodes:
- `tap_layers`: the target layers whose inputs it reads as features (an EAGLE-3 head's, from its config;
  empty for a drafter that reads none, so the target skips the taps);
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

from eagle3 import options
from eagle3.draft import Eagle3Draft
from eagle3.target import Target


class Drafter(Protocol):
    tap_layers: tuple[int, ...]  # target layers whose inputs catch_up reads as features (empty: none)
    caught_up: int  # tokens the last catch_up read, if fewer than given (optional attribute)

    def reset(self, prompt_ids: Sequence[int], max_len: int) -> None: ...

    def catch_up(self, tokens: Tensor, features: Tensor, start: int, top_k: int) -> tuple[Tensor, Tensor]: ...

    def expand(self, tokens: Tensor, source_rows: Tensor, depth: int, mask: Tensor) -> tuple[Tensor, Tensor]: ...

    def end_round(self) -> None: ...


def top_children(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k log-probabilities and their ids over the last axis, without a full log_softmax."""
    values, ids = torch.topk(logits.float(), min(k, logits.shape[-1]), dim=-1)
    return values - torch.logsumexp(logits.float(), dim=-1, keepdim=True), ids


class Eagle3Drafter:
    """Proposes with an EAGLE-3 head: fed the target's true features (of the layers its config names) for
    committed tokens, and its own outputs inside the tree. With a prompt_window, it reads only that many of a
    prompt's last tokens."""

    def __init__(self, draft: Eagle3Draft, prompt_window: int | None = None):
        if draft.config.tap_layers is None:
            raise ValueError("the draft's config names no tap layers: load it with its target's config "
                             "(checkpoint.load_draft(path, target_config)), which fills in the target's defaults")  # fmt: skip
        self.draft = draft
        self.tap_layers = tuple(draft.config.tap_layers)
        self.prompt_window = prompt_window
        self.top_k = 10
        self.offset = 0  # prompt positions the draft skipped (see prompt_window): cache slot s holds offset + s
        self.committed = 0  # positions the draft is level with
        self.caught_up = 0  # tokens the last catch_up ran the draft on
        self.rows: list[Tensor] = []  # per draft row (0: root step), the output h that proposes its children

    def reset(self, prompt_ids: Sequence[int], max_len: int) -> None:
        if self.draft.cache is None or self.draft.cache.max_len < max_len:
            self.draft.setup_cache(max_len)
        self.draft.cache.truncate(0)
        self.offset = self.committed = 0

    @property
    def slots(self) -> int:
        """Draft cache slots holding committed positions."""
        return self.committed - self.offset

    def catch_up(self, tokens: Tensor, features: Tensor, start: int, top_k: int) -> tuple[Tensor, Tensor]:
        draft = self.draft
        draft.cache.truncate(self.slots)
        if start != self.committed:
            raise RuntimeError(f"draft out of step: it holds {self.committed} positions, asked to continue at {start}")
        n = tokens.shape[-1]
        if self.committed == 0 and self.prompt_window is not None and n > self.prompt_window:
            # A long prompt: read only its end (positions stay absolute; attention sees relative distances).
            skip = n - self.prompt_window
            tokens, features, n = tokens[skip:], features[skip:], self.prompt_window
            self.offset = start = skip
        positions = torch.arange(start, start + n, device=tokens.device)
        h = draft(tokens.view(1, n), features.view(1, n, -1).to(draft.fc.weight.dtype), positions)
        self.committed, self.caught_up = start + n, n
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
        h = draft(tokens.view(1, -1).to(device), hidden.unsqueeze(0), positions, mask.to(device), self.slots)
        self.rows.append(h[0])
        logp, ids = top_children(draft.logits(h[0]), self.top_k)
        return logp, draft.to_target_ids(ids)

    def end_round(self) -> None:
        self.draft.cache.truncate(self.slots)
        self.rows = []


# Prompt tokens the EAGLE-3 draft reads at the first catch-up (the rest of the prompt it never sees): the
# catch-up's cost grows with the prompt, while a draft proposes no worse from a prompt's end (measurements:
# docs/design/draft-prompt-window.md).
DEFAULT_PROMPT_WINDOW = 256


def load_drafter(path: str | Path, target: Target, int8: bool | None = None,
                 prompt_window: int | None = DEFAULT_PROMPT_WINDOW) -> Eagle3Drafter:  # fmt: skip
    """An EAGLE-3 drafter from a checkpoint folder, checked against and attached to the target; it taps the
    target layers its config names (the target's defaults when it names none). int8: run the draft's lm_head
    in int8 (draft.quantize_int8); default: wherever it is supported (float32 on CPU). prompt_window: how many
    of a prompt's last tokens the draft reads (None: all)."""
    from eagle3.checkpoint import load_draft
    from eagle3.draft import int8_supported, quantize_int8

    if prompt_window is not None and prompt_window < 1:
        raise ValueError(f"the draft's prompt window must be at least 1 token (None: the whole prompt), got {prompt_window}")
    model = target.model
    draft = load_draft(path, model.config, device=model.device, dtype=model.dtype)
    if int8 or (int8 is None and int8_supported(model.device, model.dtype)):
        quantize_int8(draft)
    return Eagle3Drafter(draft.attach(model.embed.weight), prompt_window)


INT8_CHOICES = {"auto": None, "on": True, "off": False}  # the CLI's --draft-int8, as load_drafter's int8


def add_drafter_arguments(parser, window: bool = True) -> None:
    """--draft-int8 and (with window) --draft-window, read back by drafter_options."""
    parser.add_argument("--draft-int8", choices=tuple(INT8_CHOICES), default="auto",
                        help="the draft's lm_head in int8: auto (default: where supported, float32 on CPU), on or off")
    if window:
        parser.add_argument("--draft-window", type=options.nonnegative, default=DEFAULT_PROMPT_WINDOW,
                            help=f"prompt tokens the draft reads, from the end (default {DEFAULT_PROMPT_WINDOW}; 0: "
                                 "the whole prompt). Only the draft's proposals depend on it, never the output")  # fmt: skip


def drafter_options(args) -> dict:
    """load_drafter's keyword arguments from add_drafter_arguments' options."""
    window = getattr(args, "draft_window", DEFAULT_PROMPT_WINDOW)
    return {"int8": INT8_CHOICES[args.draft_int8], "prompt_window": window or None}
