"""Training-time test (TTT): the draft unrolled K steps on its own outputs during training, as it runs at
inference, and its loss against the frozen target's distribution.

Index t of step k stands for a tree node at depth k grown from a context that ends at position t:
- step 0 reads fc(target taps at t) and token t+1 (the pairing used at inference);
- step k > 0 reads the draft's own output h_{k-1}[t] and the ground-truth token t+1+k, at RoPE position t+k;
- it attends to step 0's keys at positions <= t (the committed context) and to its own keys from steps
  1..k at index t (the "diagonal": its tree ancestors and itself);
- it predicts token t+2+k, whose teacher is the target's distribution at position t+1+k, restricted and
  renormalized to the draft vocabulary.
Loss at step k: cross-entropy against that teacher, masked where the predicted token is not trained on
(loss_mask 0) or the target's argmax lies outside the draft vocabulary; total = sum_k decay^k * loss_k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from eagle3.methods.draft import Eagle3Draft, OneLayerDraft


def ttt_attention(q: Tensor, keys0: Tensor, values0: Tensor, diag_keys: list[Tensor], diag_values: list[Tensor]) -> Tensor:
    """Attention of q [B, L, H, hd] over causal step-0 keys/values [B, L, KV, hd] plus, per index, its own
    diagonal keys/values (each [B, L, KV, hd]); returns [B, L, H * hd].

    The diagonal contributes one score per step and index, so nothing of size [L, L * (k + 1)] or
    [L, L + k] is built: the causal block and the diagonal scores share one softmax by a common max and sum.
    """
    B, L, H, hd = q.shape
    groups = H // keys0.shape[2]

    def heads(x: Tensor) -> Tensor:  # [B, L, KV, hd] -> [B, H, L, hd]
        return x.repeat_interleave(groups, dim=2).transpose(1, 2)

    qh = q.transpose(1, 2)
    if not diag_keys:
        out = F.scaled_dot_product_attention(qh, heads(keys0), heads(values0), is_causal=True)
        return out.transpose(1, 2).reshape(B, L, H * hd)
    scale = 1.0 / math.sqrt(hd)
    causal = (qh @ heads(keys0).transpose(-1, -2)) * scale  # [B, H, L, L]
    future = torch.ones(L, L, dtype=torch.bool, device=q.device).triu_(1)
    causal = causal.masked_fill(future, float("-inf"))
    diag = torch.stack([(qh * heads(k)).sum(-1) for k in diag_keys], dim=-1) * scale  # [B, H, L, k]
    top = torch.maximum(causal.amax(-1, keepdim=True), diag.amax(-1, keepdim=True)).detach()
    p_causal, p_diag = torch.exp(causal - top), torch.exp(diag - top)
    total = p_causal.sum(-1, keepdim=True) + p_diag.sum(-1, keepdim=True)
    out = p_causal @ heads(values0)
    for j, v in enumerate(diag_values):
        out = out + p_diag[..., j : j + 1] * heads(v)
    return (out / total).transpose(1, 2).reshape(B, L, H * hd)


def shift_left(x: Tensor, n: int, fill: int = 0) -> Tensor:
    """x[:, t + n] at t, padded with `fill` past the end."""
    if n == 0:
        return x
    return torch.cat([x[:, n:], x.new_full((x.shape[0], min(n, x.shape[1])), fill)], dim=1)


def ttt_hidden(draft: OneLayerDraft, input_ids: Tensor, features: Tensor, steps: int) -> list[Tensor]:
    """The draft's outputs h [B, L, H] for each of `steps` unrolled steps (see the module docstring); step 0
    reads `features`, the target's (EAGLE-3: its taps; EAGLE: its normed top feature)."""
    B, L = input_ids.shape
    hidden = features
    keys0 = values0 = None
    diag_keys: list[Tensor] = []
    diag_values: list[Tensor] = []
    base = torch.arange(L, device=input_ids.device)
    outputs = []
    for k in range(steps):
        residual, q, key, value = draft.project(shift_left(input_ids, 1 + k), hidden, base + k)
        if k == 0:
            keys0, values0 = key, value
        else:
            diag_keys.append(key)
            diag_values.append(value)
        hidden = draft.finish(residual, ttt_attention(q, keys0, values0, diag_keys, diag_values))
        outputs.append(hidden)
    return outputs


def ttt_forward(draft: Eagle3Draft, input_ids: Tensor, taps: Tensor, steps: int) -> list[Tensor]:
    """Draft logits [B, L, draft_vocab] for each of `steps` unrolled steps (see the module docstring)."""
    return [draft.logits(h) for h in ttt_hidden(draft, input_ids, taps, steps)]


@dataclass
class Teacher:
    probs: Tensor  # [B, L, draft_vocab]: the target's next-token distribution restricted to the draft vocabulary
    in_vocab: Tensor  # [B, L] bool: the target's argmax is in the draft vocabulary


def teacher_from_logits(target_logits: Tensor, t2d: Tensor) -> Teacher:
    """Restricts and renormalizes the target's distribution to the draft vocabulary (t2d order = draft ids)."""
    in_vocab = t2d[target_logits.argmax(-1)]
    probs = torch.softmax(target_logits[..., t2d].float(), dim=-1)
    return Teacher(probs, in_vocab)


@dataclass
class TTTLoss:
    total: Tensor  # sum_k decay^k * loss_k (differentiable)
    per_step: Tensor  # [steps] loss_k (detached)
    hits: Tensor  # [steps] positions where the draft's argmax equals the teacher's
    counts: Tensor  # [steps] positions counted (the default normalizers)


def ttt_masks(teacher: Teacher, loss_mask: Tensor, steps: int) -> list[Tensor]:
    """Per unrolled step k, [B, L-2-k] bool: index t counts if token t+2+k is trained on and the target's
    argmax at t+1+k lies in the draft vocabulary."""
    L = loss_mask.shape[1]
    return [loss_mask[:, 2 + k :].bool() & teacher.in_vocab[:, 1 + k : L - 1] for k in range(min(steps, L - 2))]


def ttt_loss(
    step_logits: list[Tensor], teacher: Teacher, loss_mask: Tensor, decay: float = 0.8, normalizers: Tensor | None = None
) -> TTTLoss:
    """The TTT loss (see the module docstring); loss_mask [B, L] marks tokens to be predicted.

    loss_k = (summed cross-entropy over counted positions) / normalizers[k], by default this batch's counts;
    data-parallel training passes the counts summed over all ranks, so that the ranks' losses add up to the
    loss of the whole batch.
    """
    masks = ttt_masks(teacher, loss_mask, len(step_logits))
    counts = torch.stack([m.sum() for m in masks]).float()
    norms = (counts if normalizers is None else normalizers.float()).clamp(min=1)
    total = step_logits[0].new_zeros((), dtype=torch.float32)
    per_step, hits = [], []
    for k, mask in enumerate(masks):
        n = mask.shape[1]
        pred = step_logits[k][:, :n].float()
        target = teacher.probs[:, 1 + k : 1 + k + n]
        weight = mask.float()
        ce = -(target * torch.log_softmax(pred, dim=-1)).sum(-1)
        loss_k = (ce * weight).sum() / norms[k]
        total = total + decay**k * loss_k
        per_step.append(loss_k.detach())
        hits.append(((pred.argmax(-1) == target.argmax(-1)).float() * weight).sum())
    return TTTLoss(total, torch.stack(per_step), torch.stack(hits), counts)
