"""Medusa-1 (Cai et al., 2024): heads on the frozen target's top feature, head k guessing the token k + 2
places after the feature's position, all from the same feature; the target verifies their tree.

    feature (the last layer's output, after the target's final norm) -> per head: num_layers residual blocks
    (x + SiLU(W x + b)) -> its own output layer over the target's vocabulary

Checkpoints use Medusa's published layout, which its own code and text-generation-inference load:
`medusa_lm_head.safetensors` holding the heads' state (`{head}.{block}.linear.weight` / `.bias`,
`{head}.{num_layers}.weight`) and a `config.json` with `medusa_num_heads`, `medusa_num_layers` and
`base_model_name_or_path`. `--draft FOLDER` picks this drafter for such a folder; `eagle3 train --method
medusa` trains the heads (self-distillation: against the target's distribution at each head's position).

The tree: a node at depth d gets head d's top children whatever its parent (the heads see only the root's
feature), sized by the tree spec as every drafter's is: a static tree (`--tree static:N`, Medusa's kind, built
from an acceptance prior) or a dynamic one. Partial (issue 18): Medusa's calibrated trees ("medusa choices",
built from each head's measured accuracies) and `--tree auto` (which knows one-layer drafts' costs only) are
not offered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from eagle3.methods.drafter import Proposal, top_children
from eagle3.methods.heads import (HeadsObjective, ResBlock, TopFeatureRows, load_heads, save_heads,
                                  target_lm_head)  # fmt: skip
from eagle3.runtimes.model import ModelConfig, Transformer
from eagle3.decoding.policy import TreePlan
from eagle3.runtimes.target import Target
from eagle3.decoding.tree import TreeGrowth, grow_trees

HEADS_FILE = "medusa_lm_head.safetensors"


class MedusaHeads(nn.Module):
    """num_heads heads of num_layers residual blocks and an output layer; state keys as Medusa names them."""

    def __init__(self, num_heads: int, num_layers: int, hidden_size: int, vocab_size: int):
        super().__init__()
        self.num_heads, self.num_layers = num_heads, num_layers
        self.heads = nn.ModuleList(
            nn.Sequential(*(ResBlock(hidden_size) for _ in range(num_layers)), nn.Linear(hidden_size, vocab_size, bias=False))
            for _ in range(num_heads)
        )  # fmt: skip

    def forward(self, feature: Tensor) -> Tensor:
        """Logits [num_heads, ..., vocab] from normed features [..., hidden]."""
        return torch.stack([head(feature) for head in self.heads])


def new_heads(model: Transformer, num_heads: int, num_layers: int, seed: int = 0) -> MedusaHeads:
    """Fresh heads for a target, each output layer a copy of the target's lm_head (Medusa's initialization)."""
    cfg = model.config
    torch.manual_seed(seed)
    heads = MedusaHeads(num_heads, num_layers, cfg.hidden_size, cfg.vocab_size)
    with torch.no_grad():
        for head in heads.heads:
            head[-1].weight.copy_(target_lm_head(model))
    return heads.to(model.device)



def save_medusa(heads: MedusaHeads, folder: str | Path, base_model: str) -> Path:
    """Medusa's layout in folder (files replaced atomically, one by one)."""
    vocab, hidden = heads.heads[0][-1].weight.shape
    return save_heads(heads.heads, folder, HEADS_FILE, "medusa", heads.num_heads, heads.num_layers, base_model, hidden,
                      vocab)  # fmt: skip


def load_medusa(folder: str | Path, target_config: ModelConfig) -> MedusaHeads:
    """Heads in Medusa's layout, checked against the target (width, vocabulary, every tensor's shape)."""
    build = lambda n, layers: MedusaHeads(n, layers, target_config.hidden_size, target_config.vocab_size)  # noqa: E731
    return load_heads(folder, HEADS_FILE, "medusa", build, target_config)


class MedusaDrafter(TopFeatureRows):
    """Drafter protocol (drafter.py): reads the target's last layer output (tap N) of each row's last committed
    position, and proposes from its heads."""

    def __init__(self, heads: MedusaHeads, model: Transformer):
        super().__init__(model)
        self.heads = heads.to(model.device, model.dtype).eval()

    @torch.no_grad()
    def propose(self, plan: TreePlan) -> Proposal:
        logits = self.heads(self.normed_features())  # [K, B, V]
        K = self.heads.num_heads
        logp, ids = top_children(logits, max(spec.top_k for spec in plan.specs))  # [K, B, top_k]
        growths = [TreeGrowth(self.roots[b], logp[0, b, : spec.top_k], ids[0, b, : spec.top_k], spec, plan.sizer(b, 1))
                   for b, spec in enumerate(plan.specs)]  # fmt: skip

        def expand(rows: list[int], levels: list[tuple[Tensor, Tensor, Tensor]], depth: int) -> list[tuple[Tensor, Tensor]]:
            out = []
            for row, (tokens, _, _) in zip(rows, levels):
                k, n = plan.specs[row].top_k, len(tokens)
                if depth < K:  # every node at this depth gets head `depth`'s guesses
                    out.append((logp[depth, row, :k].expand(n, k), ids[depth, row, :k].expand(n, k)))
                else:
                    out.append((torch.zeros(n, 0), torch.zeros(n, 0, dtype=torch.long)))
            return out

        return Proposal(grow_trees(growths, expand), [0] * len(growths))

    @torch.no_grad()
    def step_timers(self, sizes: Sequence[int]) -> tuple[dict, dict]:
        """For the cost model (cost.measure_drafter): the first step is the heads' pass over the root's feature
        with every head's top-k; a tree level only hands each node its depth's head's guesses."""
        feature = self.sample_feature()
        logp, ids = top_children(self.heads(feature), 10)

        def level(n: int):
            return lambda: (logp[1 % len(logp), 0].expand(n, -1), ids[1 % len(ids), 0].expand(n, -1))

        return {1: lambda: top_children(self.heads(feature), 10)}, {n: level(n) for n in sizes}


def load_medusa_drafter(path: str | Path, target: Target) -> MedusaDrafter:
    return MedusaDrafter(load_medusa(path, target.model.config), target.model)


class MedusaObjective(HeadsObjective):
    """Medusa's heads for train.train (`--method medusa`): each head reads the feature alone."""

    method, heads_class = "medusa", MedusaHeads

    def fresh(self, model: Transformer, num_heads: int, num_layers: int, seed: int) -> MedusaHeads:
        return new_heads(model, num_heads, num_layers, seed)

    def load(self, folder: str | Path, target_config: ModelConfig) -> MedusaHeads:
        return load_medusa(folder, target_config)

    def predict(self, k: int, feature: Tensor, ids: Tensor) -> Tensor:
        return self.model.heads[k](feature)

    def save_heads(self, folder: Path, base_model: str) -> None:
        save_medusa(self.model, folder, base_model)
