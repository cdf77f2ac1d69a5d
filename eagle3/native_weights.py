"""Weights for eagle3's native CPU kernels, a step applied to a loaded model (as gpt-fast applies quantization
after loading, outside the model's definition): every matrix of the blocks and the lm_head in the kernels'
panels (native.pack), in fp32 or in int8 with one fp32 scale per output row (symmetric), run by the native
kernels (native.py) with fp32 activations. The [in, out] copies are freed, so the model holds its weights once.

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
    data: Tensor  # the matrix [out, in] in the kernels' panel order (native.pack), fp32 or int8, flat
    scale: Tensor | None  # int8 only: [out] fp32, row o of the matrix is its int8 row o times scale[o]
    shape: tuple[int, int]  # (out, in)

    @staticmethod
    def of(weight: Tensor, int8: bool = False) -> NativeWeight:
        """A matrix [out, in] for the kernels, as fp32 or as symmetric int8 per output row."""
        if int8:
            q, scale = int8_rows(weight)
            return NativeWeight(native.pack(q), scale, tuple(weight.shape))
        return NativeWeight(native.pack(weight.detach().float()), None, tuple(weight.shape))

    def dense(self) -> Tensor:
        """The matrix [out, in] in fp32 (int8 dequantized), row-major."""
        w = native.unpack(self.data, *self.shape)
        return w if self.scale is None else w.float() * self.scale[:, None]

    def matmul(self, x: Tensor) -> Tensor:
        """x [..., in] @ the matrix -> [..., out]. Longer inputs (prompts) run on torch's fp32 matmul over a dense
        copy: the prefill is the same for every method, so this does not touch losslessness."""
        if x.numel() // x.shape[-1] <= NATIVE_ROWS:  # (to_native made sure the kernels are here)
            return native.linear(x, self.data, self.shape[0], self.scale)
        return F.linear(x.float(), self.dense())


def int8_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """A matrix [out, in] as symmetric int8 per output row: (int8 [out, in], fp32 scales [out])."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8).contiguous()
    return q, scale.contiguous()


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
    convert = lambda w: NativeWeight.of(w.t(), int8=precision == "int8")  # noqa: E731 (the model stores [in, out])
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
