"""The CPU weight layout, a step applied to a loaded model (as gpt-fast applies quantization after loading,
outside the model's definition): an [out, in] copy of every matrix of the target for forwards of 2..64 tokens
(draft trees, batches), which MKL runs several times faster in that layout than x @ W for so few rows.

CPU only: it doubles the weights' memory, and GPU BLAS has no such cliff. The model's `linear` uses a copy
where a matrix has one. Measurements: docs/design/cpu-weight-layout.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

FEW_ROWS = range(2, 65)  # the row counts that take the [out, in] copy


def few_rows_matmul(x: Tensor, weight_t: Tensor) -> Tensor:
    """x @ weight_t.T for a few rows, computed as weight_t @ x.T: the layout MKL runs fast for 2..64 rows."""
    rows = x.reshape(-1, x.shape[-1])
    return (weight_t @ rows.t()).t().contiguous().view(*x.shape[:-1], -1)


def add_few_row_copies(model: torch.nn.Module) -> torch.nn.Module:
    """Gives every matrix of a model.Transformer its [out, in] copy; returns the model. Fold the norms first
    (norm_folding.py): a copy does not follow later changes to its matrix."""
    for block in model.layers:
        block.few_row_weights = {name: getattr(block, f"{name}_weight").t().contiguous()
                                 for name in ("qkv", "o", "gate_up", "down")}  # fmt: skip
    model.lm_head_weight_t = model.lm_head_weight.t().contiguous()
    return model


def for_device(model: torch.nn.Module) -> torch.nn.Module:
    """The layout steps that pay on the model's device (on a CPU, the few-row copies); returns the model."""
    return add_few_row_copies(model) if model.device.type == "cpu" else model
