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
feature), sized by the tree spec as every drafter's is. Partial (issue 18): Medusa's own fixed trees
("medusa choices") and `--tree auto` (which knows an EAGLE-3 head's costs only) are not offered yet.
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
from eagle3.model import ModelConfig, Transformer, read_weights_file, rms_norm
from eagle3.policy import TreePlan
from eagle3.target import Target
from eagle3.tree import TreeGrowth, grow_trees

HEADS_FILE = "medusa_lm_head.safetensors"


class ResBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)  # (each block starts as the identity; Medusa leaves the bias random)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + F.silu(self.linear(x))


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


def normed_feature(model: Transformer, last_hidden: Tensor) -> Tensor:
    """The target's final norm applied to its last layer's output (tap N): the feature Medusa's heads read."""
    weight = model.norm if model.norm is not None else model.final_norm_weight
    if weight is None:
        raise ValueError("the target's final norm weight is gone (folded without a copy); load it with load_target")
    return rms_norm(last_hidden, model.config.rms_norm_eps, weight)


def new_heads(model: Transformer, num_heads: int, num_layers: int, seed: int = 0) -> MedusaHeads:
    """Fresh heads for a target, each output layer a copy of the target's lm_head (Medusa's initialization)."""
    cfg = model.config
    torch.manual_seed(seed)
    heads = MedusaHeads(num_heads, num_layers, cfg.hidden_size, cfg.vocab_size)
    lm_head = model.lm_head_weight.detach().float()  # [in, out], the final norm folded into it when it is gone
    if model.norm is None and model.final_norm_weight is not None:
        lm_head = lm_head / (model.final_norm_weight.float()[:, None] * cfg.hidden_size**0.5)
    with torch.no_grad():
        for head in heads.heads:
            head[-1].weight.copy_(lm_head.t())
    return heads.to(model.device)


def is_medusa(path: str | Path) -> bool:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "medusa_num_heads" in cfg


def save_medusa(heads: MedusaHeads, folder: str | Path, base_model: str) -> Path:
    """Medusa's layout in folder (files replaced atomically, one by one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in heads.heads.state_dict().items()}
    with atomic_path(folder / HEADS_FILE) as temp:
        save_file(state, str(temp))
    vocab, hidden = state[f"0.{heads.num_layers}.weight"].shape  # (each head's output layer)
    config = {"medusa_num_heads": heads.num_heads, "medusa_num_layers": heads.num_layers,
              "base_model_name_or_path": base_model, "hidden_size": hidden, "vocab_size": vocab}  # fmt: skip
    write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    return folder


def load_medusa(folder: str | Path, target_config: ModelConfig) -> MedusaHeads:
    """Heads in Medusa's layout, checked against the target (width, vocabulary, every tensor's shape)."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text())
        num_heads, num_layers = int(cfg["medusa_num_heads"]), int(cfg.get("medusa_num_layers", 1))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{folder} is not a readable Medusa checkpoint ({type(err).__name__}: {err})") from None
    try:
        state = read_weights_file(folder / HEADS_FILE)
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder} is not a readable Medusa checkpoint: {err}") from None
    if not (1 <= num_heads <= 64 and 0 <= num_layers <= 16):
        raise ValueError(f"{folder}: medusa_num_heads {num_heads} / medusa_num_layers {num_layers} out of range")
    heads = MedusaHeads(num_heads, num_layers, target_config.hidden_size, target_config.vocab_size)
    expected = {k: tuple(v.shape) for k, v in heads.heads.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        wrong = sorted(set(found) ^ set(expected)) or [k for k in expected if found[k] != expected[k]]
        raise ValueError(f"{folder}: the Medusa heads do not fit this target (hidden {target_config.hidden_size}, "
                         f"vocabulary {target_config.vocab_size}): {', '.join(wrong[:4])}")  # fmt: skip
    heads.heads.load_state_dict({k: v.float() for k, v in state.items()})
    return heads


class MedusaDrafter:
    """Drafter protocol (drafter.py): reads the target's last layer output (tap N) of each row's last committed
    position, and proposes from its heads."""

    def __init__(self, heads: MedusaHeads, model: Transformer):
        self.heads, self.model = heads.to(model.device, model.dtype).eval(), model
        self.tap_layers = (model.config.num_layers,)
        self.roots: list[int] = []
        self.features: list[Tensor | None] = []  # each row's last feature (the one paired with its root)

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
        if features is None:  # (a plain round's commit: the next drafted round reads fresh features)
            raise ValueError("the Medusa drafter needs the target's features with every commit")
        self.roots[row], self.features[row] = int(tokens[-1]), features[-1]

    @torch.no_grad()
    def propose(self, plan: TreePlan) -> Proposal:
        feats = torch.stack([f for f in self.features])  # [B, H]
        logits = self.heads(normed_feature(self.model, feats))  # [K, B, V]
        K = self.heads.num_heads
        top_k = max(spec.top_k for spec in plan.specs)
        logp, ids = top_children(logits, top_k)  # [K, B, top_k]
        growths = [TreeGrowth(self.roots[b], logp[0, b, : spec.top_k], ids[0, b, : spec.top_k], spec, plan.sizer(b, 0))
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


def load_medusa_drafter(path: str | Path, target: Target) -> MedusaDrafter:
    return MedusaDrafter(load_medusa(path, target.model.config), target.model)


class MedusaObjective:
    """The heads and their loss, for train.train (`--method medusa`): head k at position t against the frozen
    target's distribution at position t + 1 + k (the token t + 2 + k), where that token is trained on; head k's
    loss weighted 0.8^k, as Medusa weights its heads."""

    method = "medusa"
    DECAY = 0.8

    def __init__(self, target: Target, num_heads: int, num_layers: int, seed: int, saved: dict | None = None,
                 init: str | Path | None = None):  # fmt: skip
        cfg = target.model.config
        if saved is not None:
            shape = saved["draft_config"]
            heads = MedusaHeads(shape["num_heads"], shape["num_layers"], cfg.hidden_size, cfg.vocab_size)
            heads.load_state_dict(saved["draft"])
        elif init is not None:
            heads = load_medusa(init, cfg)
        else:
            heads = new_heads(target.model, num_heads, num_layers, seed)
        self.config = {"num_heads": heads.num_heads, "num_layers": heads.num_layers}
        self.model, self.target = heads.to(target.model.device), target

    def config_dict(self) -> dict:
        return self.config

    def loss(self, ids: Tensor, loss_mask: Tensor, items: list | None, reduce, autocast):
        if items is not None:
            raise ValueError("--features caches an EAGLE-3 draft's taps; --method medusa trains from the target online")
        model, device = self.target.model, self.target.model.device
        ids, loss_mask = ids.to(device), loss_mask.to(device)
        L, K = ids.shape[1], self.model.num_heads
        with torch.no_grad():
            model.empty_cache(L, batch_size=ids.shape[0])
            out = model(ids, taps=(model.config.num_layers,))
            feature = normed_feature(model, out.taps)
        masks = [loss_mask[:, 2 + k :].bool() for k in range(min(K, L - 2))]
        norms = reduce(torch.stack([m.sum() for m in masks]).float())
        total = feature.new_zeros((), dtype=torch.float32)
        per_head, hits = [], []
        for k, mask in enumerate(masks):
            n = mask.shape[1]
            with autocast:
                pred = self.model.heads[k](feature[:, :n]).float()
            teacher = torch.softmax(out.logits[:, 1 + k : 1 + k + n].float(), dim=-1)
            ce = -(teacher * F.log_softmax(pred, dim=-1)).sum(-1)
            loss_k = (ce * mask).sum() / norms[k].clamp(min=1)
            total = total + self.DECAY**k * loss_k
            per_head.append(loss_k.detach())
            hits.append(((pred.argmax(-1) == teacher.argmax(-1)) & mask).float().sum())
        return total, torch.stack(per_head), torch.stack(hits), norms

    def save(self, folder: Path, target: Target) -> None:
        save_medusa(self.model, folder, str(target.name))
