"""Weights for eagle3's native CPU kernels, a step applied to a loaded model (as gpt-fast applies quantization
after loading, outside the model's definition): every matrix of the blocks and the lm_head stored [out, in],
in fp32 or in int8 with one fp32 scale per output row (symmetric), run by the native kernels (native.py) with
fp32 activations. The [in, out] copies are freed, so the model holds its weights once.

Decoding on a CPU is bound by streaming the weights, and int8 streams a quarter of fp32's bytes. The kernels
compute each input row on their own, in the same order whatever the row count, so a tree's logits are bitwise
those of its tokens decoded one by one: speculative output equals plain output of this target. With int8
weights, losslessness is relative to the int8 target, not to the fp32 one. The embeddings stay fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from eagle3 import native

NATIVE_ROWS = 256  # forwards of up to this many rows (decoding, trees, batches) run on the native kernels
PRECISIONS = ("fp32", "int8")


@dataclass
class NativeWeight:
    data: Tensor  # [out, in], fp32 or int8
    scale: Tensor | None  # int8 only: [out] fp32, row o of the matrix is data[o] * scale[o]

    def matmul(self, x: Tensor) -> Tensor:
        """x [..., in] @ the matrix -> [..., out]. Longer inputs (prompts) run on torch's fp32 matmul (a
        dequantized copy for int8): the prefill is the same for every method, so this does not touch
        losslessness."""
        if x.numel() // x.shape[-1] <= NATIVE_ROWS:  # (to_native made sure the kernels are here)
            return native.linear(x, self.data, self.scale)
        return F.linear(x.float(), self.data if self.scale is None else self.data.float() * self.scale[:, None])


def quantize(weight_in_out: Tensor) -> NativeWeight:
    """A matrix stored [in, out] (the model's layout) as symmetric int8 per output row."""
    w = weight_in_out.detach().float().t()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8).contiguous()
    return NativeWeight(q, scale.contiguous())


def transpose(weight_in_out: Tensor) -> NativeWeight:
    """A matrix stored [in, out] (the model's layout) as fp32 [out, in]."""
    return NativeWeight(weight_in_out.detach().float().t().contiguous(), None)


MATRICES = ("qkv", "o", "gate_up", "down")


@torch.no_grad()
def to_native(model: torch.nn.Module, precision: str = "fp32") -> torch.nn.Module:
    """Stores every matrix of a model.Transformer (norms folded first) for the native kernels, in fp32 or int8
    (PRECISIONS), and frees its [in, out] copy; returns the model. Refused, with the reason, where the native
    kernels are not available."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} for the native kernels; choose from {', '.join(PRECISIONS)}")
    if native.library() is None:
        raise ValueError(f"this runtime needs eagle3's native kernels, which are unavailable here: {native.why_unavailable()}")
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise ValueError(f"the native kernels run on the CPU from an fp32 model, not {model.dtype} on {model.device}")
    convert = quantize if precision == "int8" else transpose
    empty = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    for block in model.layers:
        block.few_row_weights = {name: convert(getattr(block, f"{name}_weight")) for name in MATRICES}
        block.matmul_paths = ()
        for name in MATRICES:
            setattr(block, f"{name}_weight", empty)
    model.lm_head_weight_t = convert(model.lm_head_weight)
    model.lm_head_weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)  # (keeps dtype and device)
    model.matmul_paths = ()
    return model
