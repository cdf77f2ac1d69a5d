"""Folding the RMSNorm weights into the matmuls that follow them: a step applied to a loaded model (as gpt-fast
applies quantization after loading, outside the model's definition).

An RMSNorm is x / rms(x) * w, and what follows it is a matmul, so w (and the sqrt(d) that unit_rms_norm leaves
out) can scale that matrix's input rows once, at load time: each norm becomes three ops instead of five. That
matters on a CPU, where decoding pays a fixed toll per op, and costs nothing elsewhere. The products are taken
in fp32 and rounded once to the model's dtype.
"""

from __future__ import annotations

import math

import torch

from eagle3.runtimes.model import Transformer


@torch.no_grad()
def fold_norms(model: Transformer) -> Transformer:
    """Moves every norm weight of a model.Transformer into the matrix after it (qkv, gate_up, lm_head) and sets
    the norm to None; returns the model. Folding twice is a no-op. Call it before cpu_layout's copies."""
    scale = math.sqrt(model.config.hidden_size)

    def fold(matrix: torch.nn.Parameter, weight: torch.nn.Parameter | None) -> None:
        if weight is not None:  # matrix is [in, out]: row i meets input feature i
            matrix.copy_((matrix.float() * (weight.float()[:, None] * scale)).to(matrix.dtype))

    for block in model.layers:
        fold(block.qkv_weight, block.attn_norm)
        fold(block.gate_up_weight, block.mlp_norm)
        block.attn_norm = block.mlp_norm = None
    if model.norm is not None:  # (drafters of the normed top feature, as Medusa's heads, still need it)
        model.final_norm_weight = model.norm.detach().clone()
    fold(model.lm_head_weight, model.norm)
    model.norm = None
    return model
