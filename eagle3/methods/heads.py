"""What the methods with heads on the target's top feature (Medusa, Hydra) share: the feature itself, the
residual block, the output layers' starting point, checkpoint reading and writing, the drafter's per-row
bookkeeping, and the self-distillation targets their training reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from eagle3.files import atomic_path, write_text
from eagle3.runtimes.model import ForwardOutput, ModelConfig, Transformer, read_weights_file, rms_norm
from eagle3.runtimes.native_weights import NativeWeight


class ResBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)  # (each block starts as the identity; Medusa leaves the bias random)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + F.silu(self.linear(x))


def normed_feature(model: Transformer, last_hidden: Tensor) -> Tensor:
    """The target's final norm applied to its last layer's output (tap N): the feature the heads read."""
    weight = model.norm if model.norm is not None else model.final_norm_weight
    if weight is None:
        raise ValueError("the target's final norm weight is gone (folded without a copy); load it with load_target")
    return rms_norm(last_hidden, model.config.rms_norm_eps, weight)


def target_lm_head(model: Transformer) -> Tensor:
    """The target's lm_head [vocab, hidden] as it acts on the normed feature (the final norm taken back out of
    it where norm_folding moved it in): the heads' output layers start as copies of it."""
    stored = model.lm_head_weight_t
    if isinstance(stored, NativeWeight):  # (the native runtimes: the matrix lives there alone, [out, in])
        lm_head = stored.dense().t()
    else:
        lm_head = model.lm_head_weight.detach().float()  # [in, out]
    if model.norm is None and model.final_norm_weight is not None:
        lm_head = lm_head / (model.final_norm_weight.float()[:, None] * model.config.hidden_size**0.5)
    return lm_head.t()


def checkpoint_kind(path: str | Path) -> str | None:
    """"medusa" or "hydra" for a folder of heads (by its config's keys), else None."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    return next((kind for kind in ("medusa", "hydra") if f"{kind}_num_heads" in cfg), None)


def save_heads(heads: nn.Module, folder: str | Path, file: str, kind: str, num_heads: int, num_layers: int,
               base_model: str, hidden_size: int, vocab_size: int, extra: dict | None = None) -> Path:
    """The heads' state in folder/file (safetensors, or a weights-only torch file for a .pt name) and a
    config.json naming `{kind}_num_heads` and `{kind}_num_layers`, plus `extra` (files replaced atomically, one
    by one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in heads.state_dict().items()}
    with atomic_path(folder / file) as temp:
        if file.endswith(".pt"):
            torch.save(state, temp)
        else:
            save_file(state, str(temp))
    config = {f"{kind}_num_heads": num_heads, f"{kind}_num_layers": num_layers,
              "base_model_name_or_path": base_model, "hidden_size": hidden_size, "vocab_size": vocab_size,
              **(extra or {})}  # fmt: skip
    write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    return folder


def load_heads(folder: str | Path, file: str, kind: str, build, target_config: ModelConfig) -> nn.Module:
    """Heads saved by save_heads (or by Medusa's or Hydra's own code): build(num_heads, num_layers) makes the
    module, whose `heads` must take the file's state exactly; one-line errors for anything else."""
    folder, name = Path(folder), kind.capitalize()
    try:
        cfg = json.loads((folder / "config.json").read_text())
        num_heads, num_layers = int(cfg[f"{kind}_num_heads"]), int(cfg.get(f"{kind}_num_layers", 1))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{folder} is not a readable {name} checkpoint ({type(err).__name__}: {err})") from None
    try:
        state = read_weights_file(folder / file)
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder} is not a readable {name} checkpoint: {err}") from None
    if not (1 <= num_heads <= 64 and 0 <= num_layers <= 16):
        raise ValueError(f"{folder}: {kind}_num_heads {num_heads} / {kind}_num_layers {num_layers} out of range")
    module = build(num_heads, num_layers)
    expected = {k: tuple(v.shape) for k, v in module.heads.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        wrong = sorted(set(found) ^ set(expected)) or [k for k in expected if found[k] != expected[k]]
        raise ValueError(f"{folder}: the {name} heads do not fit this target (hidden {target_config.hidden_size}, "
                         f"vocabulary {target_config.vocab_size}): {', '.join(wrong[:4])}")  # fmt: skip
    module.heads.load_state_dict({k: v.float() for k, v in state.items()})
    return module


class TopFeatureRows:
    """The drafter protocol's bookkeeping (drafter.py) for drafters that read only each row's last committed
    token (the tree's root) and the target's last layer output paired with it (tap N)."""

    def __init__(self, model: Transformer):
        self.model = model
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
            raise ValueError("this drafter needs the target's features with every commit")
        self.roots[row], self.features[row] = int(tokens[-1]), features[-1]

    def normed_features(self) -> Tensor:
        """Every row's last feature, normed [B, H]."""
        return normed_feature(self.model, torch.stack(self.features))

    def cost_identity(self) -> dict:
        """What its step latencies depend on, for the cost model's cache key (cost.cost_key): its heads' shapes."""
        heads = self.heads
        return {"draft": repr([tuple(p.shape) for p in heads.parameters()]), "draft_kind": type(heads).__name__}

    def sample_feature(self) -> Tensor:
        """A feature [1, H] for timing the heads (step_timers)."""
        param = next(self.heads.parameters())
        return torch.randn(1, self.model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(param)


def distillation_targets(target, ids: Tensor, loss_mask: Tensor, num_heads: int, reduce
                         ) -> tuple[ForwardOutput, Tensor, list[Tensor], Tensor]:  # fmt: skip
    """For training heads: the frozen target's forward on ids (logits and tap N), the normed feature, and per
    head k the mask of positions t whose token t + 2 + k is trained on, with the counts summed over the
    data-parallel ranks (`reduce`)."""
    model = target.model
    with torch.no_grad():
        model.empty_cache(ids.shape[1], batch_size=ids.shape[0])
        out = model(ids, taps=(model.config.num_layers,))
        feature = normed_feature(model, out.taps)
    masks = [loss_mask[:, 2 + k :].bool() for k in range(min(num_heads, ids.shape[1] - 2))]
    return out, feature, masks, reduce(torch.stack([m.sum() for m in masks]).float())


def head_loss(pred: Tensor, teacher_logits: Tensor, mask: Tensor, norm: Tensor) -> tuple[Tensor, Tensor]:
    """One head's cross-entropy against the target's softmax over the masked positions (normalized by norm),
    and how many of them its top guess matches the target's."""
    teacher = torch.softmax(teacher_logits.float(), dim=-1)
    ce = -(teacher * F.log_softmax(pred.float(), dim=-1)).sum(-1)
    hits = ((pred.argmax(-1) == teacher.argmax(-1)) & mask).float().sum()
    return (ce * mask).sum() / norm.clamp(min=1), hits


class HeadsObjective:
    """Heads and their self-distillation loss, for train.train: head k at position t against the frozen target's
    distribution at position t + 1 + k (the token t + 2 + k), where that token is trained on, weighted 0.8^k as
    Medusa weights its heads. A method says how its heads are made (heads_class, fresh, load, save) and what
    head k reads (predict)."""

    method = ""
    DECAY = 0.8
    heads_class: type = nn.Module

    def __init__(self, target, num_heads: int, num_layers: int, seed: int, saved: dict | None = None,
                 init: str | Path | None = None):  # fmt: skip
        cfg = target.model.config
        if saved is not None:
            shape = saved["draft_config"]
            heads = self.heads_class(shape["num_heads"], shape["num_layers"], cfg.hidden_size, cfg.vocab_size)
            heads.load_state_dict(saved["draft"])
        elif init is not None:
            heads = self.load(init, cfg)
        else:
            heads = self.fresh(target.model, num_heads, num_layers, seed)
        self.config = {"num_heads": heads.num_heads, "num_layers": heads.num_layers}
        self.model, self.target = heads.to(target.model.device), target

    def config_dict(self) -> dict:
        return self.config

    def fresh(self, model: Transformer, num_heads: int, num_layers: int, seed: int) -> nn.Module:
        raise NotImplementedError

    def load(self, folder: str | Path, target_config: ModelConfig) -> nn.Module:
        raise NotImplementedError

    def predict(self, k: int, feature: Tensor, ids: Tensor) -> Tensor:
        """Head k's logits at the n positions of feature [B, n, H] (ids: the micro-batch's tokens [B, L])."""
        raise NotImplementedError

    def save_heads(self, folder: Path, base_model: str) -> None:
        raise NotImplementedError

    def loss(self, ids: Tensor, loss_mask: Tensor, items: list | None, reduce, autocast):
        if items is not None:
            raise ValueError(f"--features caches an EAGLE-3 draft's taps; --method {self.method} trains from the "
                             "target online")  # fmt: skip
        device = self.target.model.device
        ids, loss_mask = ids.to(device), loss_mask.to(device)
        out, feature, masks, norms = distillation_targets(self.target, ids, loss_mask, self.model.num_heads, reduce)
        total = feature.new_zeros((), dtype=torch.float32)
        per_head, hits = [], []
        for k, mask in enumerate(masks):
            n = mask.shape[1]
            with autocast:
                pred = self.predict(k, feature[:, :n], ids)
            loss_k, hits_k = head_loss(pred, out.logits[:, 1 + k : 1 + k + n], mask, norms[k])
            total = total + self.DECAY**k * loss_k
            per_head.append(loss_k.detach())
            hits.append(hits_k)
        return total, torch.stack(per_head), torch.stack(hits), norms

    def save(self, folder: Path, target) -> None:
        self.save_heads(folder, str(target.name))
