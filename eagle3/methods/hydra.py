"""Hydra (Ankner et al., 2024): Medusa's heads made sequentially dependent. Head k reads the target's top feature
at position t and the embeddings of the k + 1 tokens after it (the root, then the tree's path to the node being
expanded) and guesses the next one, so a node's children depend on the path that led to it.

    x = [feature ; embed(root) ; embed(path) ...] (k + 2 widths) -> res_connection(x) + SiLU(linear(x))
    -> num_layers - 1 residual blocks (x + SiLU(W x + b), one block's weights repeated, as Hydra builds them)
    -> its own output layer (with a bias) over the target's vocabulary

The feature is the last layer's output after the target's final norm (heads.normed_feature), the embeddings
the target's own. `eagle3 train --method hydra` trains the heads (self-distillation, teacher-forced on the
data's tokens, head k weighted 0.8^k); `--draft FOLDER` decodes with them. Checkpoints use Hydra's published
layout (its "mlp" heads with grounded heads, what its own code loads): `hydra_lm_head.pt` holding the heads'
state (`hydra_mlp.{k}.{block}...`, `hydra_lm_head.{k}.weight` / `.bias`; read weights-only) and a `config.json`
with `hydra_num_heads`, `hydra_num_layers`, `hydra_head_arch` "mlp", `grounded_heads` true,
`hidden_state_offset` 0 and `base_model_name_or_path`; other head architectures are refused. Partial (issue
18): Hydra++'s prefix attention and `--tree auto` are not offered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eagle3.methods.drafter import Proposal, top_children
from eagle3.methods.heads import (HeadsObjective, ResBlock, TopFeatureRows, load_heads, save_heads,
                                  target_lm_head)  # fmt: skip
from eagle3.runtimes.model import ModelConfig, Transformer
from eagle3.decoding.policy import TreePlan
from eagle3.runtimes.target import Target
from eagle3.decoding.tree import TreeGrowth, grow_trees

HEADS_FILE = "hydra_lm_head.pt"
LAYOUT = {"hydra_head_arch": "mlp", "grounded_heads": True, "hidden_state_offset": 0}  # what config.json must say


class GroundedBlock(nn.Module):
    """A head's first block: [feature ; k + 1 embeddings] -> res_connection(x) + SiLU(linear(x)), H wide."""

    def __init__(self, hidden_size: int, tokens: int):
        super().__init__()
        self.linear = nn.Linear((tokens + 1) * hidden_size, hidden_size)
        self.res_connection = nn.Linear((tokens + 1) * hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.res_connection(x) + F.silu(self.linear(x))


class HydraHeads(nn.Module):
    """num_heads heads; submodules named as Hydra names them, so the state is its checkpoint's."""

    def __init__(self, num_heads: int, num_layers: int, hidden_size: int, vocab_size: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"Hydra's heads have at least one block (its grounded one), got {num_layers}")
        self.num_heads, self.num_layers = num_heads, num_layers
        self.hydra_mlp = nn.ModuleList(
            nn.Sequential(GroundedBlock(hidden_size, k + 1), *([ResBlock(hidden_size)] * (num_layers - 1)))
            for k in range(num_heads)
        )  # fmt: skip
        self.hydra_lm_head = nn.ModuleList(nn.Linear(hidden_size, vocab_size) for _ in range(num_heads))

    @property
    def heads(self) -> nn.Module:
        """The module whose state the checkpoint holds (heads.load_heads): all of it."""
        return self

    def head(self, k: int, feature: Tensor, embeddings: Tensor) -> Tensor:
        """Head k's logits [..., vocab] from the normed feature [..., H] and k + 1 token embeddings [..., k + 1, H]."""
        return self.hydra_lm_head[k](self.hydra_mlp[k](torch.cat([feature, embeddings.flatten(-2)], dim=-1)))


def new_heads(model: Transformer, num_heads: int, num_layers: int, seed: int = 0) -> HydraHeads:
    """Fresh heads that start as the target's own next-token guess: each grounded block passes the feature
    through (its residual projection the identity on it, its SiLU branch zero), each output layer is the
    target's lm_head with a zero bias."""
    cfg = model.config
    torch.manual_seed(seed)
    heads = HydraHeads(num_heads, num_layers, cfg.hidden_size, cfg.vocab_size)
    with torch.no_grad():
        for block, output in zip(heads.hydra_mlp, heads.hydra_lm_head):
            grounded = block[0]
            grounded.linear.weight.zero_()
            grounded.linear.bias.zero_()
            grounded.res_connection.weight.mul_(0.1)
            grounded.res_connection.weight[:, : cfg.hidden_size] += torch.eye(cfg.hidden_size)
            grounded.res_connection.bias.zero_()
            output.weight.copy_(target_lm_head(model))
            output.bias.zero_()
    return heads.to(model.device)


def save_hydra(heads: HydraHeads, folder: str | Path, base_model: str) -> Path:
    """Hydra's layout in folder (files replaced atomically, one by one)."""
    vocab, hidden = heads.hydra_lm_head[0].weight.shape
    return save_heads(heads, folder, HEADS_FILE, "hydra", heads.num_heads, heads.num_layers, base_model, hidden, vocab,
                      LAYOUT)  # fmt: skip


def load_hydra(folder: str | Path, target_config: ModelConfig) -> HydraHeads:
    """Heads in Hydra's layout, checked against the target; other head architectures refused in one line."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder} is not a readable Hydra checkpoint ({type(err).__name__}: {err})") from None
    if isinstance(cfg, dict):
        found = {k: cfg.get(k, v) for k, v in LAYOUT.items()}
        if found != LAYOUT:
            raise ValueError(f"{folder}: Hydra heads {found} are not supported (only {LAYOUT})")
    build = lambda n, layers: HydraHeads(n, layers, target_config.hidden_size, target_config.vocab_size)  # noqa: E731
    return load_heads(folder, HEADS_FILE, "hydra", build, target_config)


class HydraDrafter(TopFeatureRows):
    """Drafter protocol (drafter.py): each row's last feature (tap N) and root; every node's children from the
    head of its depth, fed the node's own path."""

    def __init__(self, heads: HydraHeads, model: Transformer):
        super().__init__(model)
        self.heads = heads.to(model.device, model.dtype).eval()

    @torch.no_grad()
    def propose(self, plan: TreePlan) -> Proposal:
        embed, K = self.model.embed.weight, self.heads.num_heads
        feats = self.normed_features()  # [B, H]
        roots = torch.tensor(self.roots, device=embed.device)
        first = self.heads.head(0, feats, embed[roots][:, None])  # [B, V]
        logp, ids = top_children(first, max(spec.top_k for spec in plan.specs))
        paths: list[list[list[int]]] = [[[]] for _ in self.roots]  # per row, per tree node: its tokens after the root
        growths = [TreeGrowth(self.roots[b], logp[b, : spec.top_k], ids[b, : spec.top_k], spec, plan.sizer(b, 1))
                   for b, spec in enumerate(plan.specs)]  # fmt: skip

        def expand(rows: list[int], levels: list[tuple[Tensor, Tensor, Tensor]], depth: int) -> list[tuple[Tensor, Tensor]]:
            out = []
            for row, (tokens, sources, _) in zip(rows, levels):
                k, n = plan.specs[row].top_k, len(tokens)
                new = [paths[row][s] + [t] for t, s in zip(tokens.tolist(), sources.tolist())]
                paths[row] += new
                if depth >= K:
                    out.append((torch.zeros(n, 0), torch.zeros(n, 0, dtype=torch.long)))
                    continue
                ids_in = torch.tensor([[self.roots[row], *path] for path in new], device=embed.device)  # [n, depth + 1]
                out.append(top_children(self.heads.head(depth, feats[row].expand(n, -1), embed[ids_in]), k))
            return out

        return Proposal(grow_trees(growths, expand), [0] * len(growths))

    @torch.no_grad()
    def step_timers(self, sizes: Sequence[int]) -> tuple[dict, dict]:
        """For the cost model (cost.measure_drafter): the first step is head 0 on the root's feature and token; a
        tree level is the next head on each of n nodes' feature and path (timed as head 1's, a path of two)."""
        embed, feature = self.model.embed.weight, self.sample_feature()
        depth = min(1, self.heads.num_heads - 1)

        def level(n: int):
            features, paths = feature.expand(n, -1), torch.zeros(n, depth + 1, dtype=torch.long, device=embed.device)
            return lambda: top_children(self.heads.head(depth, features, embed[paths]), 10)

        root = torch.zeros(1, 1, dtype=torch.long, device=embed.device)
        return {1: lambda: top_children(self.heads.head(0, feature, embed[root]), 10)}, {n: level(n) for n in sizes}


def load_hydra_drafter(path: str | Path, target: Target) -> HydraDrafter:
    return HydraDrafter(load_hydra(path, target.model.config), target.model)


class HydraObjective(HeadsObjective):
    """Hydra's heads for train.train (`--method hydra`): head k reads the feature at t and the data's tokens
    t + 1 .. t + 1 + k (teacher forcing)."""

    method, heads_class = "hydra", HydraHeads

    def fresh(self, model: Transformer, num_heads: int, num_layers: int, seed: int) -> HydraHeads:
        return new_heads(model, num_heads, num_layers, seed)

    def load(self, folder: str | Path, target_config: ModelConfig) -> HydraHeads:
        return load_hydra(folder, target_config)

    def predict(self, k: int, feature: Tensor, ids: Tensor) -> Tensor:
        n = feature.shape[1]
        with torch.no_grad():
            embedded = self.target.model.embed(ids)
        tokens_in = torch.stack([embedded[:, 1 + j : 1 + j + n] for j in range(k + 1)], dim=2)  # [B, n, k+1, H]
        return self.model.head(k, feature, tokens_in)

    def save_heads(self, folder: Path, base_model: str) -> None:
        save_hydra(self.model, folder, base_model)
