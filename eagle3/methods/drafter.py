"""Drafters: what proposes each row's draft tree to the decoding engine.

A drafter follows every row's committed sequence (rows are the batch, as in runtime.py) and proposes trees:
- `tap_layers`: the target layers whose inputs it reads as features (an EAGLE-3 head's, from its config;
  empty for a drafter that reads none, so the target skips the taps);
- `open(max_rows, max_len)` before a batch; `join(row, prompt_ids)` gives a new sequence the next row;
  `release(row)` frees one (the last row moves into it, as the runtime does);
- `commit(row, tokens, features)` with a row's newly committed tokens and the target's features at the
  positions before each (feature i pairs with token i); a drafter may read them only when it next proposes;
- `propose(plan) -> Proposal`: a tree for every row, grown from its root (its last committed token) as the
  plan sizes it, and how many tokens each row's catch-up read (the cost model's business).

`Eagle3Drafter` runs an EAGLE-3 head, `NoDrafter` proposes nothing (plain decoding); eagle1.py holds EAGLE's
draft (EAGLE-1/2, HASS), pld.py prompt lookup, sps.py a draft language model (classic speculative sampling),
medusa.py and hydra.py heads on the top feature, and the tests add oracles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from eagle3 import options
from eagle3.methods.draft import Eagle3Draft
from eagle3.decoding.policy import TreePlan
from eagle3.runtimes.target import Target
from eagle3.decoding.tree import DraftTree, TreeGrowth, grow_trees, root_only


@dataclass
class Proposal:
    trees: list[DraftTree]  # one per row
    read: list[int]  # tokens each row's catch-up ran the draft on (fewer than committed with a window)


class Drafter(Protocol):
    tap_layers: tuple[int, ...]  # target layers whose inputs it reads as features (empty: none)

    def open(self, max_rows: int, max_len: int) -> None: ...

    def join(self, row: int, prompt_ids: Sequence[int]) -> None: ...

    def release(self, row: int) -> None: ...

    def commit(self, row: int, tokens: Tensor, features: Tensor | None) -> None: ...

    def propose(self, plan: TreePlan) -> Proposal: ...


class TimedDrafter(Drafter, Protocol):
    """A drafter the cost-aware policy (autotree.py) can price: it times its own steps for the cost model."""

    def cost_identity(self) -> dict: ...  # what its latencies depend on (the cost model's cache key)

    # (first step per tokens read, or None where that is a tree level's step; a tree level's step per nodes)
    def step_timers(self, sizes: Sequence[int]) -> tuple[dict[int, Callable[[], object]] | None,
                                                         dict[int, Callable[[], object]]]: ...  # fmt: skip


def top_children(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k log-probabilities and their ids over the last axis, without a full log_softmax."""
    values, ids = torch.topk(logits.float(), min(k, logits.shape[-1]), dim=-1)
    return values - torch.logsumexp(logits.float(), dim=-1, keepdim=True), ids


class NoDrafter:
    """Proposes nothing: every tree is its root alone, so a round is one plain decoding step."""

    tap_layers = ()

    def __init__(self) -> None:
        self.roots: list[Tensor | None] = []  # each row's last committed token (read only when proposing)

    def open(self, max_rows: int, max_len: int) -> None:
        self.roots = []

    def join(self, row: int, prompt_ids: Sequence[int]) -> None:
        self.roots.append(None)

    def release(self, row: int) -> None:
        self.roots[row] = self.roots[-1]
        self.roots.pop()

    def commit(self, row: int, tokens: Tensor, features: Tensor | None) -> None:
        self.roots[row] = tokens[-1]

    def propose(self, plan: TreePlan) -> Proposal:
        return Proposal([root_only(int(root)) for root in self.roots], [0] * len(self.roots))


@dataclass
class _Row:
    """One row's place in the EAGLE-3 draft: its cache slots hold the positions it read, in order (the
    positions a window skipped leave no slot)."""

    offset: int = 0  # positions the draft skipped (see Eagle3Drafter's window)
    committed: int = 0  # positions the draft is level with
    tokens: list[Tensor] = field(default_factory=list)  # committed, not yet read (chunks)
    features: list[Tensor] = field(default_factory=list)
    tokens_read: Tensor | None = None  # what the last catch-up read (its last token is the tree's root)
    outputs: list[Tensor] = field(default_factory=list)  # the round's draft rows (0: the root step): h [k, H]
    tree_slots: list[int] = field(default_factory=list)  # each tree row's slot after the committed ones

    @property
    def slots(self) -> int:
        """Draft cache slots holding committed positions."""
        return self.committed - self.offset


class Eagle3Drafter:
    """Proposes with an EAGLE-3 head: fed the target's true features (of the layers its config names) for
    committed tokens, and its own outputs inside the tree. Every row's catch-up runs in one draft forward, and
    every tree level of every row in one more. With a window, a catch-up reads at most that many of a row's
    unread tokens, the last ones: of a prompt, or of the stretch a pause in drafting left unread."""

    def __init__(self, draft: Eagle3Draft, window: int | None = None):
        if draft.config.tap_layers is None:
            raise ValueError("the draft's config names no tap layers: load it with its target's config "
                             "(checkpoint.load_draft(path, target_config)), which fills in the target's defaults")  # fmt: skip
        self.draft = draft
        self.tap_layers = tuple(draft.config.tap_layers)
        self.window = window
        self.rows: list[_Row] = []
        self._level_slots = 0  # tree slots every row holds after its committed ones (levels are padded alike)
        self._top_ks: list[int] = []  # each row's children per node this round

    def open(self, max_rows: int, max_len: int) -> None:
        """Room for max_rows sequences of max_len draft positions each (their tree rows included)."""
        cache = self.draft.cache
        if cache is None or cache.rows != max_rows or cache.max_len < max_len:
            self.draft.setup_cache(max_len, max_rows)
        self.draft.cache.truncate(0)
        self.rows = []

    def join(self, row: int, prompt_ids: Sequence[int]) -> None:
        if row != len(self.rows):
            raise ValueError(f"a new sequence takes row {len(self.rows)}, not {row}")
        self.rows.append(_Row())
        self.draft.cache.lengths[row] = 0

    def release(self, row: int) -> None:
        self.draft.cache.free_row(row, len(self.rows) - 1)
        self.rows[row] = self.rows[-1]
        self.rows.pop()

    def commit(self, row: int, tokens: Tensor, features: Tensor | None) -> None:
        state = self.rows[row]
        state.tokens.append(tokens)
        state.features.append(features)

    def propose(self, plan: TreePlan) -> Proposal:
        """Catches every row up on its committed tokens, then grows every row's tree."""
        self._top_ks = [spec.top_k for spec in plan.specs]
        roots, read = self._catch_up(max(self._top_ks))
        growths = [TreeGrowth(int(self.rows[b].tokens_read[-1]), logp, ids, spec, plan.sizer(b, read[b]))
                   for b, ((logp, ids), spec) in enumerate(zip(roots, plan.specs))]  # fmt: skip
        self._level_slots = 0
        trees = grow_trees(growths, self._expand)
        for b, state in enumerate(self.rows):  # forget the trees' draft rows
            self.draft.cache.lengths[b] = state.slots
            state.outputs, state.tree_slots = [], []
        return Proposal(trees, read)

    def cost_identity(self) -> dict:
        """What its step latencies depend on, for the cost model's cache key (cost.cost_key)."""
        draft = self.draft
        return {"draft": repr(draft.config), "draft_kind": type(draft).__name__, "draft_int8": draft.head_in_int8,
                # (native_draft.py: the step on native kernels, every matrix in one precision)
                "draft_native": None if draft.native is None else draft.native.precision}  # fmt: skip

    def step_timers(self, sizes: Sequence[int], context: int = 256) -> tuple[None, dict[int, Callable[[], object]]]:
        """For the cost model (cost.measure_drafter): a draft step over n tokens after `context` cached ones, its
        logits and top-k included, per n in sizes. Its first step (the catch-up) is such a step too: None."""
        draft, device = self.draft, self.draft.fc.weight.device
        cfg, dtype = draft.config, draft.fc.weight.dtype
        draft.setup_cache(context + max(sizes) + 1)  # (Engine.open sets the cache up again for decoding)
        generator = torch.Generator().manual_seed(0)
        taps = torch.randn(1, context, draft.feature_width, generator=generator).to(device, dtype)
        draft(torch.zeros(1, context, dtype=torch.long, device=device), taps, torch.arange(context, device=device))
        steps = {}
        for n in sizes:
            tokens = torch.zeros(1, n, dtype=torch.long, device=device)
            hidden = torch.randn(1, n, cfg.hidden_size, generator=generator).to(device, dtype)
            positions = torch.full((n,), context, device=device)
            mask = torch.eye(n, dtype=torch.bool, device=device)

            def step(tokens=tokens, hidden=hidden, positions=positions, mask=mask):
                draft.cache.truncate(context)
                h = draft(tokens, hidden, positions, mask, context)
                top_children(draft.logits(h[0]), 10)

            steps[n] = step
        return None, steps

    def _catch_up(self, top_k: int) -> tuple[list[tuple[Tensor, Tensor]], list[int]]:
        """One draft forward over every row's unread committed tokens: each row's root children (log-probs and
        target ids [top_k]) and how many tokens it read."""
        draft, device = self.draft, self.draft.fc.weight.device
        chunks = []
        for state in self.rows:
            tokens, features = torch.cat(state.tokens).to(device), torch.cat(state.features).to(device)
            start, n = state.committed, len(tokens)
            if self.window is not None and n > self.window:
                # A long prompt or pause: read only its end (positions stay absolute; attention sees relative
                # distances).
                skip = n - self.window
                tokens, features, n = tokens[skip:], features[skip:], self.window
                state.offset += skip
                start += skip
            state.tokens_read = tokens
            state.tokens, state.features = [], []
            chunks.append((tokens, features, start, n))
        width = max(n for *_, n in chunks)
        B = len(chunks)
        tokens = torch.zeros(B, width, dtype=torch.long, device=device)
        features = torch.zeros(B, width, chunks[0][1].shape[-1], dtype=draft.fc.weight.dtype, device=device)
        starts = torch.tensor([start for *_, start, _ in chunks])
        for b, (t, f, _, n) in enumerate(chunks):
            tokens[b, :n], features[b, :n] = t, f
        positions = starts[:, None] + torch.arange(width)  # (padding runs on past a row's end, then is dropped)
        h = draft(tokens, features, positions.to(device))
        last = torch.tensor([n - 1 for *_, n in chunks], device=device)
        root_h = h[torch.arange(B, device=device), last]  # [B, H]: each row's last real token
        for b, (state, (*_, start, n)) in enumerate(zip(self.rows, chunks)):
            state.committed = start + n
            draft.cache.lengths[b] = state.slots  # the padding's slots dropped
            state.outputs = [root_h[b : b + 1]]
        logp, ids = top_children(draft.logits(root_h), top_k)
        ids = draft.to_target_ids(ids)
        return [(logp[b], ids[b]) for b in range(B)], [n for *_, n in chunks]

    def _expand(self, rows: list[int], levels: list[tuple[Tensor, Tensor, Tensor]], depth: int
                ) -> list[tuple[Tensor, Tensor]]:  # fmt: skip
        """One draft forward over a tree level of every row (tree.ExpandRows): rows not growing any more, and
        the rows with fewer nodes, are padded with nodes that see only themselves."""
        draft, device = self.draft, self.draft.fc.weight.device
        if len(self.rows) == 1:
            return [self._expand_one(*levels[0], depth)]
        B, width = len(self.rows), max(len(tokens) for tokens, _, _ in levels)
        before = self._level_slots
        tokens = torch.zeros(B, width, dtype=torch.long, device=device)
        hidden = torch.zeros(B, width, draft.config.hidden_size, dtype=draft.fc.weight.dtype, device=device)
        mask = torch.eye(before + width, dtype=torch.bool, device=device)[before:].repeat(B, 1, 1)
        for row, (node_tokens, sources, node_mask) in zip(rows, levels):
            state, k = self.rows[row], len(node_tokens)
            tokens[row, :k] = node_tokens.to(device)
            hidden[row, :k] = torch.cat(state.outputs)[sources.to(device)]
            # (the root step, row 0, is the row's last committed slot: always visible)
            columns = torch.tensor(state.tree_slots + list(range(before, before + k)), device=device)
            mask[row, :k, columns] = node_mask[:, 1:].to(device)
        # The root sits at draft position committed - 1; a node at depth d (d >= 1) at committed - 1 + d.
        positions = torch.tensor([state.committed - 1 + depth for state in self.rows])[:, None].expand(B, width)
        h = draft(tokens, hidden, positions.to(device), mask, [state.slots for state in self.rows])
        self._level_slots += width
        logp, ids = top_children(draft.logits(h), max(self._top_ks))
        ids = draft.to_target_ids(ids)
        out = []
        for row, (node_tokens, _, _) in zip(rows, levels):
            state, k, top_k = self.rows[row], len(node_tokens), self._top_ks[row]
            state.outputs.append(h[row, :k])
            state.tree_slots += list(range(before, before + k))
            out.append((logp[row, :k, :top_k], ids[row, :k, :top_k]))
        return out

    def _expand_one(self, tokens: Tensor, sources: Tensor, mask: Tensor, depth: int) -> tuple[Tensor, Tensor]:
        """_expand for a batch of one sequence: no padding, its tree rows are the slots after its committed
        ones in order."""
        draft, device, state = self.draft, self.draft.fc.weight.device, self.rows[0]
        hidden = torch.cat(state.outputs)[sources.to(device)]
        positions = torch.full((len(tokens),), state.committed - 1 + depth, device=device)
        h = draft(tokens.view(1, -1).to(device), hidden.unsqueeze(0), positions, mask[:, 1:].to(device), state.slots)
        self._level_slots += len(tokens)
        state.outputs.append(h[0])
        logp, ids = top_children(draft.logits(h[0]), self._top_ks[0])
        return logp, draft.to_target_ids(ids)


# Unread tokens the EAGLE-3 draft reads at most in a catch-up (the rest it never sees): a catch-up's cost grows
# with what it reads (a prompt, or what a pause in drafting left), while a draft proposes no worse from their
# end (measurements: docs/design/draft-prompt-window.md).
DEFAULT_DRAFT_WINDOW = 64


def load_drafter(path: str | Path, target: Target, int8: bool | None = None,
                 window: int | None = DEFAULT_DRAFT_WINDOW) -> Drafter:  # fmt: skip
    """An EAGLE-3 drafter from a checkpoint folder, checked against and attached to the target; it taps the
    target layers its config names (the target's defaults when it names none). int8: the draft in int8, its
    lm_head on the PyTorch runtimes (draft.quantize_int8) and every matrix on the native ones, where the draft's
    step runs on the native kernels too (native_draft.py); default: wherever supported (a float32 draft on a
    CPU). window: how many unread tokens a catch-up reads at most, the last ones (None: all).

    A folder in EAGLE's layout gives the EAGLE / EAGLE-2 drafter (eagle1.py; int8: its copy of the target's
    lm_head). A folder holding a causal language model with the target's vocabulary gives the SpS drafter
    (sps.py), one holding Medusa or Hydra heads those drafters (medusa.py, hydra.py); int8 and window
    do not apply to them."""
    from eagle3.formats.checkpoint import load_draft
    from eagle3.methods.draft import int8_supported, quantize_int8
    from eagle3.methods.eagle1 import is_eagle1_checkpoint, load_eagle1_drafter
    from eagle3.methods.heads import checkpoint_kind
    from eagle3.methods.hydra import load_hydra_drafter
    from eagle3.methods.medusa import load_medusa_drafter
    from eagle3.methods.sps import is_language_model, load_draft_model_drafter

    heads = checkpoint_kind(path)
    if heads is not None:
        return (load_medusa_drafter if heads == "medusa" else load_hydra_drafter)(path, target)
    if window is not None and window < 1:
        raise ValueError(f"the draft's window must be at least 1 token (None: every token), got {window}")
    if is_eagle1_checkpoint(path):
        return load_eagle1_drafter(path, target, int8, window)
    if is_language_model(path):
        return load_draft_model_drafter(path, target)

    model = target.model
    draft = load_draft(path, model.config, device=model.device, dtype=model.dtype)
    int8 = int8 or (int8 is None and int8_supported(model.device, model.dtype))
    if target.runtime.startswith("native"):
        from eagle3.runtimes.native_draft import NativeDraft, draft_precision

        draft.native = NativeDraft(draft, draft_precision(target.runtime, bool(int8)))
    elif int8:
        quantize_int8(draft)
    return Eagle3Drafter(draft.attach(model.embed.weight), window)


INT8_CHOICES = {"auto": None, "on": True, "off": False}  # the CLI's --draft-int8, as load_drafter's int8


def add_drafter_arguments(parser, window: bool = True) -> None:
    """--draft-int8 and (with window) --draft-window, read back by drafter_options."""
    parser.add_argument("--draft-int8", choices=tuple(INT8_CHOICES), default="auto",
                        help="the draft in int8 (its lm_head; on the native runtimes all its matrices): auto (default: on "
                             "for a float32 draft on a CPU), on or off")
    if window:
        parser.add_argument("--draft-window", type=options.nonnegative, default=DEFAULT_DRAFT_WINDOW,
                            help=f"tokens the draft reads at most when it catches up on a prompt or after a pause, "
                                 f"from the end (default {DEFAULT_DRAFT_WINDOW}; 0: all). Only the draft's proposals "
                                 "depend on it, never the output")  # fmt: skip


def drafter_options(args) -> dict:
    """load_drafter's keyword arguments from add_drafter_arguments' options."""
    window = getattr(args, "draft_window", DEFAULT_DRAFT_WINDOW)
    return {"int8": INT8_CHOICES[args.draft_int8], "window": window or None}
