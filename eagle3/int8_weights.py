"""int8 weight-only target, a step applied to a loaded model (as gpt-fast applies quantization after loading,
outside the model's definition): every matrix of the blocks and the lm_head stored [out, in] in int8 with one
fp32 scale per output row (symmetric), run by eagle3's native kernels (native.py) with fp32 activations.

Decoding on a CPU is bound by streaming the weights, and int8 streams a quarter of fp32's bytes. The kernel
computes each input row on its own, in the same order whatever the row count, so a tree's logits are bitwise
those of its tokens decoded one by one: speculative output equals plain output of this int8 target.
Losslessness is relative to the int8 target, not to the fp32 one. The embeddings stay fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from eagle3 import native

NATIVE_ROWS = 256  # forwards of up to this many rows (decoding, trees, batches) run on the native kernel


@dataclass
class Int8Weight:
    q: Tensor  # [out, in] int8
    scale: Tensor  # [out] fp32: row o of the matrix is q[o] * scale[o]

    def matmul(self, x: Tensor) -> Tensor:
        """x [..., in] @ the matrix -> [..., out]. Longer inputs (prompts) run fp32 on a dequantized copy: the
        prefill is the same for every method, so this does not touch losslessness."""
        if x.numel() // x.shape[-1] <= NATIVE_ROWS:  # (to_int8 made sure the kernels are here)
            return native.linear(x, self.q, self.scale)
        return F.linear(x.float(), self.q.float() * self.scale[:, None])


def quantize(weight_in_out: Tensor) -> Int8Weight:
    """A matrix stored [in, out] (the model's layout) as symmetric int8 per output row."""
    w = weight_in_out.detach().float().t()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8).contiguous()
    return Int8Weight(q, scale.contiguous())


MATRICES = ("qkv", "o", "gate_up", "down")


@torch.no_grad()
def to_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Quantizes every matrix of a model.Transformer (norms folded first) and frees its fp32 copy; returns the
    model. Refused, with the reason, where the native kernels are not available."""
    if native.library() is None:
        raise ValueError(f"int8 weights need eagle3's native kernels, which are unavailable here: {native.why_unavailable()}")
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise ValueError(f"int8 weights run on the CPU from an fp32 model, not {model.dtype} on {model.device}")
    empty = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    for block in model.layers:
        block.few_row_weights = {name: quantize(getattr(block, f"{name}_weight")) for name in MATRICES}
        block.matmul_paths = ()
        for name in MATRICES:
            setattr(block, f"{name}_weight", empty)
    model.lm_head_weight_t = quantize(model.lm_head_weight)
    model.lm_head_weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)  # (keeps dtype and device)
    model.matmul_paths = ()
    return model
