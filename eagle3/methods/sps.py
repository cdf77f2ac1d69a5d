"""Classic speculative sampling (SpS, Leviathan et al. / Chen et al.): a small causal language model with the
target's vocabulary proposes the tree (a chain by default), and the target verifies it on the same lossless
path as every drafter. Any Llama-family checkpoint eagle3 loads can be the draft model; `--draft FOLDER` picks
this drafter when the folder holds a language model rather than an EAGLE-3 head.

The draft proposes deterministically (its most likely tokens), as every eagle3 drafter does; verification's
recursive rejection keeps sampled output distributed exactly as the target's (verify.py). Classic SpS instead
samples its proposals from the draft's distribution; both are exact, they differ in how often a proposal is
accepted under sampling.

Partial (issue 18): the draft model runs on the PyTorch runtime, one row at a time, and scores each tree node
by a forward over its path from the row's committed tokens (the cache is cut back after each). Fine for the
short chains a CPU affords; trees and batches would want the draft's levels batched as Eagle3Drafter does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from eagle3.methods.drafter import Proposal, top_children
from eagle3.runtimes.model import Transformer
from eagle3.decoding.policy import TreePlan
from eagle3.runtimes.target import Target
from eagle3.decoding.tree import TreeGrowth, grow_trees


class DraftModelDrafter:
    """Drafter protocol (drafter.py) over a causal LM with its own KV cache, a row per sequence."""

    tap_layers = ()  # it reads no target features

    def __init__(self, model: Transformer):
        self.model = model
        self.pending: list[list[Tensor]] = []  # per row: committed tokens the draft has not read yet
        self.paths: list[list[list[int]]] = []  # per row, per tree node: its tokens after the root

    def open(self, max_rows: int, max_len: int) -> None:
        self.model.setup_cache(max_len + 1, batch_size=max_rows)
        self.pending, self.paths = [], []

    def join(self, row: int, prompt_ids: Sequence[int]) -> None:
        if row != len(self.pending):
            raise ValueError(f"a new sequence takes row {len(self.pending)}, not {row}")
        self.model.cache.lengths[row] = 0
        # (the first commit brings the rest of the prompt and the first new token)
        self.pending.append([torch.tensor(list(prompt_ids[:1]), dtype=torch.long)])
        self.paths.append([])

    def release(self, row: int) -> None:
        last = len(self.pending) - 1
        self.model.cache.free_row(row, last)
        self.pending[row], self.paths[row] = self.pending[last], self.paths[last]
        self.pending.pop()
        self.paths.pop()

    def commit(self, row: int, tokens: Tensor, features: Tensor | None) -> None:
        self.pending[row].append(tokens.cpu())

    def _last_logits(self, row: int, tokens: list[int]) -> Tensor:
        ids = torch.tensor([tokens], device=self.model.device)
        return self.model(ids, logits="last", rows=range(row, row + 1)).logits[0, -1]

    def propose(self, plan: TreePlan) -> Proposal:
        """Reads every row's new committed tokens (the last is the root), then grows each row's tree."""
        growths, read = [], []
        for row, spec in enumerate(plan.specs):
            tokens = torch.cat(self.pending[row]).tolist()
            self.pending[row], self.paths[row] = [], [[]]
            logp, ids = top_children(self._last_logits(row, tokens), spec.top_k)
            growths.append(TreeGrowth(tokens[-1], logp, ids, spec, plan.sizer(row, len(tokens))))
            read.append(len(tokens))

        def expand(rows: list[int], levels: list[tuple[Tensor, Tensor, Tensor]], depth: int) -> list[tuple[Tensor, Tensor]]:
            return [self._expand_row(row, level[0], level[1], plan.specs[row].top_k) for row, level in zip(rows, levels)]

        return Proposal(grow_trees(growths, expand), read)

    def cost_identity(self) -> dict:
        """What its step latencies depend on, for the cost model's cache key (cost.cost_key)."""
        return {"draft": repr(self.model.config), "draft_kind": "draft model"}

    @torch.no_grad()
    def step_timers(self, sizes: Sequence[int], context: int = 256) -> tuple[dict, dict]:
        """For the cost model (cost.measure_drafter), after `context` cached tokens: the first step reads n new
        tokens (the catch-up) and takes the last one's top-k; a tree level runs n nodes one by one (_expand_row:
        each its own path; timed as paths of one token)."""
        model = self.model
        context = min(context, model.config.context_length - max(sizes) - 1)
        model.setup_cache(context + max(sizes) + 1, batch_size=1)  # (open() sets the cache up again for decoding)
        model(torch.zeros(1, context, dtype=torch.long, device=model.device), logits="none")

        def forward(n: int) -> None:
            model.cache.lengths[0] = context
            top_children(self._last_logits(0, [0] * n), 10)

        def level(n: int):
            return lambda: [forward(1) for _ in range(n)]

        return {n: (lambda n=n: forward(n)) for n in sizes}, {n: level(n) for n in sizes}

    def _expand_row(self, row: int, tokens: Tensor, sources: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
        """Children of one row's frontier nodes: the draft runs each node's path after the committed tokens,
        then forgets it (the cache is cut back to the committed length)."""
        cache, cfg = self.model.cache, self.model.config
        committed = cache.lengths[row]
        logps, ids = [], []
        for token, source in zip(tokens.tolist(), sources.tolist()):
            path = self.paths[row][source] + [token]
            self.paths[row].append(path)
            if committed + len(path) <= min(cache.max_len, cfg.context_length):
                logits = self._last_logits(row, path)
                cache.lengths[row] = committed
            else:  # past the end of the context: nothing to foresee
                logits = torch.zeros(cfg.vocab_size, device=self.model.device)
            lp, i = top_children(logits, top_k)
            logps.append(lp)
            ids.append(i)
        return torch.stack(logps), torch.stack(ids)


def is_language_model(path: str | Path) -> bool:
    """Whether a draft folder holds a causal language model (SpS) rather than an EAGLE-3 head."""
    config_file = Path(path) / "config.json"
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return False  # (the EAGLE-3 loader reports what is wrong with the folder)
    if not isinstance(cfg, dict) or "speculators_model_type" in cfg:
        return False
    architectures = cfg.get("architectures") or []
    return bool(architectures) and all(isinstance(a, str) and a.endswith("ForCausalLM") for a in architectures)


def load_draft_model_drafter(path: str | Path, target: Target) -> DraftModelDrafter:
    """The SpS drafter for a draft language model folder, checked against the target: the same vocabulary
    (size and, where the folder has a tokenizer, the same token strings)."""
    from eagle3.runtimes.target import load_target

    draft = load_target(str(path), dtype=target.model.dtype, device=str(target.model.device))
    theirs, ours = draft.model.config.vocab_size, target.model.config.vocab_size
    if theirs != ours:
        raise ValueError(f"the draft model's vocabulary ({theirs} tokens) is not the target's ({ours}): SpS needs "
                         "a draft with the target's tokenizer")  # fmt: skip
    if draft.tokenizer is not None and target.tokenizer is not None:
        if draft.tokenizer.get_vocab() != target.tokenizer.get_vocab():
            raise ValueError("the draft model's tokenizer maps tokens differently from the target's: SpS needs a "
                             "draft with the target's tokenizer")  # fmt: skip
    return DraftModelDrafter(draft.model)
