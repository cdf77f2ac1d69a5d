"""Training-time test against a naive reference, and the draft vocabulary mapping."""

import math

import pytest
import torch

from eagle3.methods.draft import new_draft
from eagle3.training.ttt import shift_left, teacher_from_logits, ttt_forward, ttt_loss
from eagle3.methods.vocab import build_vocab_map, count_tokens


def naive_ttt_forward(draft, input_ids, taps, steps):
    """Each unrolled step attends over every step's keys at every position through an explicit mask."""
    B, L = input_ids.shape
    cfg = draft.config
    hidden, keys, values, logits = taps, [], [], []
    for k in range(steps):
        residual, q, key, value = draft.project(shift_left(input_ids, 1 + k), hidden, torch.arange(L) + k)
        keys.append(key)
        values.append(value)
        all_k = torch.cat(keys, dim=1).repeat_interleave(cfg.num_heads // cfg.num_kv_heads, 2).transpose(1, 2)
        all_v = torch.cat(values, dim=1).repeat_interleave(cfg.num_heads // cfg.num_kv_heads, 2).transpose(1, 2)
        mask = torch.zeros(L, L * (k + 1), dtype=torch.bool)
        for t in range(L):
            mask[t, : t + 1] = True  # step 0: the context up to t
            for j in range(1, k + 1):
                mask[t, j * L + t] = True  # step j: the same index (its ancestor at depth j)
        scores = q.transpose(1, 2) @ all_k.transpose(-1, -2) / math.sqrt(cfg.head_dim)
        attn = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ all_v
        hidden = draft.finish(residual, attn.transpose(1, 2).reshape(B, L, -1))
        logits.append(draft.logits(hidden))
    return logits


def naive_loss(step_logits, target_logits, loss_mask, t2d, decay=0.8):
    total = 0.0
    B, L = loss_mask.shape
    for k, logits in enumerate(step_logits):
        num, den = 0.0, 0
        for b in range(B):
            for t in range(L - 2 - k):
                teacher = target_logits[b, t + 1 + k]
                if not loss_mask[b, t + 2 + k] or not t2d[teacher.argmax()]:
                    continue
                p = torch.softmax(teacher[t2d], -1)
                num = num - (p * torch.log_softmax(logits[b, t], -1)).sum()
                den += 1
        total = total + decay**k * num / max(den, 1)
    return total


@pytest.fixture
def setup(stories):
    torch.manual_seed(0)
    cfg = stories.model.config
    draft = new_draft(cfg, draft_vocab_size=300, seed=1).attach(stories.model.embed.weight)
    for p in draft.parameters():  # not-quite-untrained: larger weights make attention patterns matter
        p.data.mul_(5.0 if p.dim() == 2 else 1.0)
    ids = torch.randint(3, 512, (2, 17))
    taps = torch.randn(2, 17, 3 * cfg.hidden_size)
    return draft, ids, taps


def test_ttt_attention_equals_the_naive_masked_reference(setup):
    draft, ids, taps = setup
    fast = ttt_forward(draft, ids, taps, steps=4)
    slow = naive_ttt_forward(draft, ids, taps, steps=4)
    for k, (a, b) in enumerate(zip(fast, slow)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), k


def test_ttt_loss_equals_the_naive_reference(setup):
    draft, ids, taps = setup
    logits = ttt_forward(draft, ids, taps, steps=3)
    target_logits = torch.randn(2, 17, 512) * 3
    target_logits[0, 5, :] = -10
    target_logits[0, 5, 0] = 10  # argmax outside the draft vocabulary: masked
    loss_mask = (torch.rand(2, 17) > 0.3).long()
    out = ttt_loss(logits, teacher_from_logits(target_logits, draft.t2d), loss_mask)
    ref = naive_loss(logits, target_logits, loss_mask, draft.t2d)
    assert torch.allclose(out.total, ref, rtol=1e-5, atol=1e-6)
    assert len(out.per_step) == 3 and bool(((out.hits >= 0) & (out.hits <= out.counts)).all())
    halves = [ttt_loss([x[i : i + 1] for x in logits], teacher_from_logits(target_logits[i : i + 1], draft.t2d),
                       loss_mask[i : i + 1], normalizers=out.counts) for i in range(2)]
    assert torch.allclose(halves[0].total + halves[1].total, out.total)  # what data-parallel ranks rely on
    out.total.backward()  # differentiable end to end
    assert draft.fc.weight.grad is not None and draft.fc.weight.grad.abs().sum() > 0


def test_vocab_map_round_trips_every_draft_id():
    counts = torch.zeros(50, dtype=torch.long)
    counts[[3, 7, 7, 9, 40]] = torch.tensor([5, 9, 9, 1, 9])
    d2t, t2d = build_vocab_map(counts, 4)
    used = torch.arange(4) + d2t
    assert used.tolist() == [3, 7, 9, 40]  # the four most frequent, ascending
    assert t2d.nonzero().flatten().tolist() == used.tolist()
    # Fewer distinct tokens than the vocabulary: unused ids (lowest first) pad it.
    d2t, t2d = build_vocab_map(counts, 7)
    assert (torch.arange(7) + d2t).tolist() == [0, 1, 2, 3, 7, 9, 40]
    assert t2d.sum() == 7
    # Every draft id maps to the target id whose logit it reads in teacher_from_logits.
    logits = torch.randn(1, 1, 50)
    assert torch.equal(logits[..., t2d][0, 0], logits[0, 0, torch.arange(7) + d2t])
    ids = torch.tensor([[1, 2, 2, 5]])
    assert count_tokens(ids, torch.tensor([[0, 1, 1, 1]]), 8).tolist() == [0, 0, 2, 0, 0, 1, 0, 0]
    with pytest.raises(ValueError):
        build_vocab_map(counts, 51)
