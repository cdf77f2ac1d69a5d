"""Hydra (Ankner et al., 2024): Medusa's heads made sequentially dependent. Head k reads the target's top feature
at position t and the embeddings of the k + 1 tokens after it (the root, then the tree's path to the node being
expanded) and guesses the next one, so a node's children depend on the path that led to it.

    [feature ; embed(root) ; embed(path) ...] (k + 2 widths) -> a projection to the width -> residual blocks
    (medusa.ResBlock) -> its own output layer over the target's vocabulary

The feature is the last layer's output after the target's final norm (medusa.normed_feature), the embeddings
the target's own. `eagle3 train --method hydra` trains the heads (self-distillation, teacher-forced on the
data's tokens, head k weighted 0.8^k); `--draft FOLDER` decodes with them. Checkpoints: eagle3's own layout
(`hydra_heads.safetensors` and a `config.json` with `hydra_num_heads`, `hydra_num_layers`); Hydra's published
code keeps its heads in a model-specific checkpoint that was not matched here. Partial (issue 18): Hydra++'s
prefix attention and `--tree auto` are not offered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from eagle3.drafter import Proposal, top_children
from eagle3.files import atomic_path, write_text
from eagle3.medusa import ResBlock, normed_feature
from eagle3.model import ModelConfig, Transformer, read_weights_file
from eagle3.policy import TreePlan
from eagle3.target import Target
from eagle3.tree import TreeGrowth, grow_trees

HEADS_FILE = "hydra_heads.safetensors"


class HydraHeads(nn.Module):
    def __init__(self, num_heads: int, num_layers: int, hidden_size: int, vocab_size: int):
        super().__init__()
        self.num_heads, self.num_layers = num_heads, num_layers
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear((k + 2) * hidden_size, hidden_size), *(ResBlock(hidden_size) for _ in range(num_layers)),
                          nn.Linear(hidden_size, vocab_size, bias=False))
            for k in range(num_heads)
        )  # fmt: skip

    def head(self, k: int, feature: Tensor, embeddings: Tensor) -> Tensor:
        """Head k's logits [..., vocab] from the normed feature [..., H] and k + 1 token embeddings [..., k + 1, H]."""
        return self.heads[k](torch.cat([feature, embeddings.flatten(-2)], dim=-1))


def new_heads(model: Transformer, num_heads: int, num_layers: int, seed: int = 0) -> HydraHeads:
    """Fresh heads: each projection starts by passing the feature through, each output layer as the target's
    lm_head (as Medusa's heads start)."""
    cfg = model.config
    torch.manual_seed(seed)
    heads = HydraHeads(num_heads, num_layers, cfg.hidden_size, cfg.vocab_size)
    lm_head = model.lm_head_weight.detach().float()
    if model.norm is None and model.final_norm_weight is not None:
        lm_head = lm_head / (model.final_norm_weight.float()[:, None] * cfg.hidden_size**0.5)
    with torch.no_grad():
        for head in heads.heads:
            projection = head[0]
            projection.weight.mul_(0.1)
            projection.weight[:, : cfg.hidden_size] += torch.eye(cfg.hidden_size)
            projection.bias.zero_()
            head[-1].weight.copy_(lm_head.t())
    return heads.to(model.device)


def is_hydra(path: str | Path) -> bool:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "hydra_num_heads" in cfg


def save_hydra(heads: HydraHeads, folder: str | Path, base_model: str) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in heads.heads.state_dict().items()}
    with atomic_path(folder / HEADS_FILE) as temp:
        save_file(state, str(temp))
    vocab, hidden = state[f"0.{heads.num_layers + 1}.weight"].shape
    config = {"hydra_num_heads": heads.num_heads, "hydra_num_layers": heads.num_layers,
              "base_model_name_or_path": base_model, "hidden_size": hidden, "vocab_size": vocab}  # fmt: skip
    write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    return folder


def load_hydra(folder: str | Path, target_config: ModelConfig) -> HydraHeads:
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text())
        num_heads, num_layers = int(cfg["hydra_num_heads"]), int(cfg.get("hydra_num_layers", 1))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{folder} is not a readable Hydra checkpoint ({type(err).__name__}: {err})") from None
    try:
        state = read_weights_file(folder / HEADS_FILE)
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder} is not a readable Hydra checkpoint: {err}") from None
    if not (1 <= num_heads <= 16 and 0 <= num_layers <= 16):
        raise ValueError(f"{folder}: hydra_num_heads {num_heads} / hydra_num_layers {num_layers} out of range")
    heads = HydraHeads(num_heads, num_layers, target_config.hidden_size, target_config.vocab_size)
    expected = {k: tuple(v.shape) for k, v in heads.heads.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        wrong = sorted(set(found) ^ set(expected)) or [k for k in expected if found[k] != expected[k]]
        raise ValueError(f"{folder}: the Hydra heads do not fit this target (hidden {target_config.hidden_size}, "
                         f"vocabulary {target_config.vocab_size}): {', '.join(wrong[:4])}")  # fmt: skip
    heads.heads.load_state_dict({k: v.float() for k, v in state.items()})
    return heads


class HydraDrafter:
    """Drafter protocol (drafter.py): each row's last feature (tap N) and root; every node's children from the
    head of its depth, fed the node's own path."""

    def __init__(self, heads: HydraHeads, model: Transformer):
        self.heads, self.model = heads.to(model.device, model.dtype).eval(), model
        self.tap_layers = (model.config.num_layers,)
        self.roots: list[int] = []
        self.features: list[Tensor | None] = []

    def open(self, max_rows: int, max_len: int) -> None:
        self.roots, self.features = [], []

    def join(self, row: int, prompt_ids: Sequence[int]) -> None:
        if row != len(self.roots):
            raise ValueError(f"a new sequence takes row {len(self.roots)}, not {row}")
        self.roots.append(int(prompt_ids[-1]))
        self.features.append(None)

    def release(self, row: int) -> None:
        self.roots[row], self.features[row] = self.roots[-1], self.features[-1]
        self.roots.pop()
        self.features.pop()

    def commit(self, row: int, tokens: Tensor, features: Tensor | None) -> None:
        if features is None:
            raise ValueError("the Hydra drafter needs the target's features with every commit")
        self.roots[row], self.features[row] = int(tokens[-1]), features[-1]

    @torch.no_grad()
    def propose(self, plan: TreePlan) -> Proposal:
        embed, K = self.model.embed.weight, self.heads.num_heads
        feats = normed_feature(self.model, torch.stack(self.features))  # [B, H]
        roots = torch.tensor(self.roots, device=embed.device)
        first = self.heads.head(0, feats, embed[roots][:, None])  # [B, V]
        logp, ids = top_children(first, max(spec.top_k for spec in plan.specs))
        paths: list[list[list[int]]] = [[[]] for _ in self.roots]  # per row, per tree node: its tokens after the root
        growths = [TreeGrowth(self.roots[b], logp[b, : spec.top_k], ids[b, : spec.top_k], spec, plan.sizer(b, 0))
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
                logits = self.heads.head(depth, feats[row].expand(n, -1), embed[ids_in])
                out.append(top_children(logits, k))
            return out

        return Proposal(grow_trees(growths, expand), [0] * len(growths))


def load_hydra_drafter(path: str | Path, target: Target) -> HydraDrafter:
    return HydraDrafter(load_hydra(path, target.model.config), target.model)


class HydraObjective:
    """The heads and their loss, for train.train (`--method hydra`): head k at position t reads the feature at t
    and the data's tokens t + 1 .. t + 1 + k, against the target's distribution at t + 1 + k (the token
    t + 2 + k), where that token is trained on; weighted 0.8^k."""

    method = "hydra"
    DECAY = 0.8

    def __init__(self, target: Target, num_heads: int, num_layers: int, seed: int, saved: dict | None = None,
                 init: str | Path | None = None):  # fmt: skip
        cfg = target.model.config
        if saved is not None:
            shape = saved["draft_config"]
            heads = HydraHeads(shape["num_heads"], shape["num_layers"], cfg.hidden_size, cfg.vocab_size)
            heads.load_state_dict(saved["draft"])
        elif init is not None:
            heads = load_hydra(init, cfg)
        else:
            heads = new_heads(target.model, num_heads, num_layers, seed)
        self.config = {"num_heads": heads.num_heads, "num_layers": heads.num_layers}
        self.model, self.target = heads.to(target.model.device), target

    def config_dict(self) -> dict:
        return self.config

    def loss(self, ids: Tensor, loss_mask: Tensor, items: list | None, reduce, autocast):
        if items is not None:
            raise ValueError("--features caches an EAGLE-3 draft's taps; --method hydra trains from the target online")
        model, device = self.target.model, self.target.model.device
        ids, loss_mask = ids.to(device), loss_mask.to(device)
        L, K = ids.shape[1], self.model.num_heads
        with torch.no_grad():
            model.empty_cache(L, batch_size=ids.shape[0])
            out = model(ids, taps=(model.config.num_layers,))
            feature = normed_feature(model, out.taps)
            embedded = model.embed(ids)
        masks = [loss_mask[:, 2 + k :].bool() for k in range(min(K, L - 2))]
        norms = reduce(torch.stack([m.sum() for m in masks]).float())
        total = feature.new_zeros((), dtype=torch.float32)
        per_head, hits = [], []
        for k, mask in enumerate(masks):
            n = mask.shape[1]
            tokens_in = torch.stack([embedded[:, 1 + j : 1 + j + n] for j in range(k + 1)], dim=2)  # [B, n, k+1, H]
            with autocast:
                pred = self.model.head(k, feature[:, :n], tokens_in).float()
            teacher = torch.softmax(out.logits[:, 1 + k : 1 + k + n].float(), dim=-1)
            ce = -(teacher * F.log_softmax(pred, dim=-1)).sum(-1)
            loss_k = (ce * mask).sum() / norms[k].clamp(min=1)
            total = total + self.DECAY**k * loss_k
            per_head.append(loss_k.detach())
            hits.append(((pred.argmax(-1) == teacher.argmax(-1)) & mask).float().sum())
        return total, torch.stack(per_head), torch.stack(hits), norms

    def save(self, folder: Path, target: Target) -> None:
        save_hydra(self.model, folder, str(target.name))
