"""Weights for eagle3's native CPU kernels, a step applied to a loaded model (as gpt-fast applies quantization
after loading, outside the model's definition): every matrix of the blocks and the lm_head in the kernels'
panels, in one of three precisions (PRECISIONS):

- fp32: fp32 weights and activations (native.pack);
- int8: int8 weights with one fp32 scale per output row (symmetric), fp32 activations (native.pack);
- w8a8: the same int8 weights, and activations quantized to int8 per block of 32 on the fly, as llama.cpp's
  Q8_0 does, for integer dot products (native.pack_w8a8, kernels/w8a8.hpp): verifying many tokens gets cheap
  where the CPU has VNNI, at some cost in accuracy (docs/design/fast-cpu-path.md).

The [in, out] copies are freed, so the model holds its weights once. Decoding on a CPU is bound by streaming
the weights, and int8 streams a quarter of fp32's bytes. The kernels compute each input row on their own, in the
same order whatever the row count, so a tree's logits are bitwise those of its tokens decoded one by one:
speculative output equals plain output of this target. With int8 weights (or activations), losslessness is
relative to that target, not to the fp32 one. The embeddings stay fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from eagle3.runtimes import native

NATIVE_ROWS = 256  # forwards of up to this many rows (decoding, trees, batches) run on the native kernels
PRECISIONS = ("fp32", "int8", "w8a8")
KINDS = {torch.float32: 0, torch.int8: 1, torch.uint8: 2}  # what a matrix's data holds (forward.cpp's MatrixKind)


@dataclass
class NativeWeight:
    data: Tensor  # the matrix [out, in] in the kernels' panel order, flat: fp32, int8, or W8A8's uint8 (int8 + 128)
    scale: Tensor | None  # int8 and w8a8: [out] fp32, row o of the matrix is its int8 row o times scale[o]
    shape: tuple[int, int]  # (out, in)

    @staticmethod
    def of(weight: Tensor, precision: str = "fp32") -> NativeWeight:
        """A matrix [out, in] for the kernels, in one of PRECISIONS (int8 and w8a8: symmetric per output row)."""
        if precision == "fp32":
            return NativeWeight(native.pack(weight.detach().float()), None, tuple(weight.shape))
        q, scale = int8_rows(weight)
        return NativeWeight(native.pack_w8a8(q) if precision == "w8a8" else native.pack(q), scale, tuple(weight.shape))

    @property
    def kind(self) -> int:
        return KINDS[self.data.dtype]

    def dense(self) -> Tensor:
        """The matrix [out, in] in fp32 (int8 dequantized), row-major."""
        if self.data.dtype == torch.uint8:
            w = native.unpack_w8a8(self.data, *self.shape)
        else:
            w = native.unpack(self.data, *self.shape)
        return w if self.scale is None else w.float() * self.scale[:, None]

    def matmul(self, x: Tensor) -> Tensor:
        """x [..., in] @ the matrix -> [..., out]. Longer inputs (prompts) run on torch's fp32 matmul over a dense
        copy, except W8A8's (its kernel is fast for many rows, and its activations' rounding is the precision):
        the prefill is the same for every method, so this does not touch losslessness."""
        if x.numel() // x.shape[-1] <= NATIVE_ROWS or self.data.dtype == torch.uint8:  # (to_native checked the kernels)
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
    """Stores every matrix of a model.Transformer (norms folded first) for the native kernels, in fp32, int8 or
    w8a8 (PRECISIONS), and frees its [in, out] copy; returns the model. Refused, with the reason, where the native
    kernels are not available."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} for the native kernels; choose from {', '.join(PRECISIONS)}")
    if native.library() is None:
        raise ValueError(f"this runtime needs eagle3's native kernels, which are unavailable here: {native.why_unavailable()}")
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise ValueError(f"the native kernels run on the CPU from an fp32 model, not {model.dtype} on {model.device}")
    convert = lambda w: NativeWeight.of(w.t(), precision)  # noqa: E731 (the model stores [in, out])
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
