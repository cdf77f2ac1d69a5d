"""A one-layer draft's step as one native call (kernels/forward.cpp), a step applied to a loaded draft for the
native runtimes: EAGLE-3's head (its layer and lm_head) or EAGLE's draft (its layer; eagle1.py), reading
weights laid out for the native kernels, norms folded into the matmuls after them, q and k rows interleaved
for RoPE.

A draft step is one small layer, so on a CPU PyTorch's per-op toll is most of its cost, and a round runs
several. Only the proposals depend on the draft; verification keeps exactly the target's tokens whatever it
proposes, so this path is free to round differently from the PyTorch draft.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from eagle3.runtimes import native
from eagle3.runtimes.model import interleave_rope_rows
from eagle3.runtimes.native_weights import PRECISIONS, NativeWeight

EAGLE3_DRAFT, EAGLE_DRAFT = 0, 1  # forward.cpp's DraftKind


def draft_precision(runtime: str, int8: bool) -> str:
    """The precision of a draft's matrices on a native target runtime: fp32, or with int8 (--draft-int8) int8,
    and on native-w8a8 int8 activations too (a catch-up after a pause reads up to a window of tokens at once,
    where integer dot products pay most)."""
    return ("w8a8" if runtime == "native-w8a8" else "int8") if int8 else "fp32"


class NativeDraft:
    """A one-layer draft's forward (and, for an Eagle3Draft, its logits) on the native kernels, on the draft's
    own KV cache: EAGLE-3's head or EAGLE's draft (eagle1.py). Its matrices, the layer's as well as the
    lm_head's, in one of native_weights.PRECISIONS: int8 reads a quarter of fp32's bytes, and the draft's
    numerics reach only its proposals, never the output."""

    def __init__(self, draft, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r} for the native draft; choose from {', '.join(PRECISIONS)}")
        if native.library() is None:
            raise ValueError(f"the native draft needs eagle3's native kernels, unavailable here: "
                             f"{native.why_unavailable()}")  # fmt: skip
        cfg = draft.config
        self.kind = EAGLE3_DRAFT if hasattr(draft, "midlayer") else EAGLE_DRAFT
        with torch.no_grad():
            matrices, biases = (_eagle3_matrices if self.kind == EAGLE3_DRAFT else _eagle1_matrices)(draft)
            stored = [None if w is None else NativeWeight.of(w, precision) for w in matrices]
        entries = [t for w, b in zip(stored, biases) for t in ((None, None, b, 0) if w is None else (w.data, w.scale, b, w.kind))]
        # (forward.cpp's DraftField order)
        (table,), self._keep = native.pointer_table([entries + [draft._inv_freq.float()]])
        self.table, self.draft, self.precision = table, draft, precision
        self.vocab = matrices[-1].shape[0] if matrices[-1] is not None else None
        self.shape = [cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size]

    def forward(self, tokens: Tensor, hidden: Tensor, positions: Tensor, mask: Tensor | None = None,
                mask_start: Sequence[int] | int | None = None) -> Tensor:  # fmt: skip
        """Eagle3Draft.forward's contract: h [B, n, H] of n inputs per row on top of the draft's cache."""
        draft, cache, cfg = self.draft, self.draft.cache, self.draft.config
        if cache is None:
            raise RuntimeError("call setup_cache() before forward()")
        B, n = tokens.shape
        cache.check_room(n, range(B))
        starts = cache.lengths[:B]
        region = starts if mask_start is None else [mask_start] * B if isinstance(mask_start, int) else list(mask_start)
        if mask is None:
            mask = torch.ones(n, n, dtype=torch.bool).tril_()
        R = mask.shape[-1]
        if any(s - r + n != R for s, r in zip(starts, region)):
            raise ValueError(f"a mask of {R} columns does not end at the new tokens of rows at {starts} from {region}")
        mask = mask.to(torch.bool).expand(B, n, R).contiguous()
        positions = positions.to(torch.int64).expand(B, n).contiguous()
        embedding = torch.nn.functional.embedding(tokens, draft.embed_weight).float().contiguous()
        features = hidden.float().contiguous()
        h = torch.empty(B, n, cfg.hidden_size)
        region = torch.tensor(region, dtype=torch.int32)  # (every tensor the call reads is held until it returns)
        dims = torch.tensor(self.shape + [features.shape[-1], B, n, cache.rows, cache.max_len, R, self.kind],
                            dtype=torch.int64)  # fmt: skip
        native.library().eagle3_draft_forward(
            self.table.data_ptr(), dims.data_ptr(), cfg.rms_norm_eps, embedding.data_ptr(), features.data_ptr(),
            cache.kv.data_ptr(), region.data_ptr(), mask.data_ptr(),
            positions.data_ptr(), h.data_ptr(),
        )  # fmt: skip
        for r in range(B):
            cache.lengths[r] += n
        return h

    def logits(self, h: Tensor) -> Tensor:
        """Logits over the draft vocabulary [..., draft vocab] from outputs h [..., H]."""
        rows = h.reshape(-1, h.shape[-1]).float().contiguous()
        out = torch.empty(rows.shape[0], self.vocab)
        native.library().eagle3_draft_logits(self.table.data_ptr(), rows.shape[0], rows.shape[1], self.vocab,
                                             self.draft.config.rms_norm_eps, rows.data_ptr(), out.data_ptr())  # fmt: skip
        return out.view(*h.shape[:-1], self.vocab)


def _eagle3_matrices(draft) -> tuple[list[Tensor], list[Tensor | None]]:
    """An EAGLE-3 head's fc, qkv, o, gate_up, down and lm_head [out, in], norms folded into the matmuls after
    them (unit norms leave out sqrt(d): it rides in the matrices), q and k rows interleaved for RoPE."""
    cfg, layer = draft.config, draft.midlayer
    attn, mlp = layer.self_attn, layer.mlp
    root_h = math.sqrt(cfg.hidden_size)
    qkv = torch.cat([interleave_rope_rows(attn.q_proj.weight.float(), cfg.num_heads),
                     interleave_rope_rows(attn.k_proj.weight.float(), cfg.num_kv_heads), attn.v_proj.weight.float()])
    qkv = qkv * torch.cat([layer.input_layernorm.weight, layer.hidden_norm.weight]).float() * root_h
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).float()
    gate_up = gate_up * layer.post_attention_layernorm.weight.float() * root_h
    head = draft.lm_head.weight.float() * draft.norm.weight.float() * root_h
    matrices = [draft.fc.weight.float(), qkv, attn.o_proj.weight.float(), gate_up, mlp.down_proj.weight.float(), head]
    return matrices, [draft.fc.bias, None, None, None, None, None]


def _eagle1_matrices(draft) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """EAGLE's draft (eagle1.py): fc (with its bias), qkv (no input norm), o, gate_up (its norm folded), down;
    its lm_head is the target's, which the draft runs itself."""
    cfg, layer = draft.config, draft.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    qkv = torch.cat([interleave_rope_rows(attn.q_proj.weight.float(), cfg.num_heads),
                     interleave_rope_rows(attn.k_proj.weight.float(), cfg.num_kv_heads), attn.v_proj.weight.float()])
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).float()
    gate_up = gate_up * layer.post_attention_layernorm.weight.float() * math.sqrt(cfg.hidden_size)
    matrices = [draft.fc.weight.float(), qkv, attn.o_proj.weight.float(), gate_up, mlp.down_proj.weight.float(), None]
    return matrices, [draft.fc.bias, None, None, None, None, None]
