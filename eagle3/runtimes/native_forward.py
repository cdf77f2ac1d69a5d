"""A target's forward of a few new tokens per row with its decoder layers in one native call
(kernels/forward.cpp), for a model whose weights live on the native kernels (native_weights.to_native).

Decoding a token through PyTorch runs ~450 small ops, each paying a fixed toll that is a large share of a
small model's step on a CPU. Here the embedding lookup and the lm_head's matmul stay in PyTorch and the
layers, the final norm included, are one call. It computes every token on its own, in the same order whatever
the batch and the tree, so speculative output equals plain output of this runtime bitwise.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from eagle3.runtimes import native
from eagle3.runtimes.model import ForwardOutput, Transformer
from eagle3.runtimes.native_weights import MATRICES, NativeWeight

class NativeLayers:
    """The decoder layers of a model on the native kernels, as forward.cpp reads them."""

    def __init__(self, model: Transformer):
        weights = [[block.few_row_weights.get(name) for name in MATRICES] for block in model.layers]
        if not all(isinstance(w, NativeWeight) for w in [model.lm_head_weight_t, *sum(weights, [])]):
            raise ValueError("the native forward runs a model whose matrices are on the native kernels (to_native)")
        if model.norm is not None or any(b.attn_norm is not None or b.mlp_norm is not None for b in model.layers):
            raise ValueError("the native forward runs a model whose norms are folded into its matrices (fold_norms)")
        self.model = model
        cfg = model.config
        rows = []
        for l, (block, layer) in enumerate(zip(model.layers, weights)):
            biases = [block.qkv_bias, block.o_bias, block.gate_up_bias, block.down_bias]
            rows.append([t for w, b in zip(layer, biases) for t in (w.data, w.scale, b, w.kind)]
                        + [block.qk_norm, model._windows[l] or 0])  # fmt: skip
        self.table, self._keep = native.pointer_table(rows)  # (forward.cpp's TargetField order)
        self.shape = [cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size, cfg.num_layers]
        self._tap_indexes: dict[tuple[int, ...], Tensor] = {}

    def _tap_index(self, order: tuple[int, ...]) -> Tensor:
        """Per layer (index num_layers: the last layer's output, before the final norm) its place among the
        taps, -1 if untapped; made once per set of taps (a share of a plain step's host work otherwise)."""
        if order not in self._tap_indexes:
            places = [order.index(l) if l in order else -1 for l in range(self.model.config.num_layers + 1)]
            self._tap_indexes[order] = torch.tensor(places, dtype=torch.int32)
        return self._tap_indexes[order]

    def forward(self, tokens: Tensor, positions: Tensor, tree_mask: Tensor, taps: Sequence[int] = ()) -> ForwardOutput:
        """n new tokens [B, n] on top of cache rows 0 .. B-1, at positions [B, n] (host), each row's token i
        seeing its committed slots and the new tokens tree_mask [B, n, n] allows: all logits [B, n, V] and the
        taps [B, n, len(taps) * H] (None without taps); appends the keys and values to each row."""
        model, cache, cfg = self.model, self.model.cache, self.model.config
        B, n = tokens.shape
        rows = range(B)
        cache.check_room(n, rows)
        max_position = int(positions.max())
        if max_position >= cfg.context_length:
            raise ValueError(f"position {max_position} is beyond the model's context of {cfg.context_length}")
        starts = torch.tensor(cache.lengths[:B], dtype=torch.int32)
        positions = positions.to(torch.int64).expand(B, n).contiguous()
        inv_freq = model.rope_frequencies(max_position).float().contiguous()
        mask = tree_mask.to(torch.bool).expand(B, n, n).contiguous()
        order = sorted(set(taps))
        tap_index = self._tap_index(tuple(order))
        tapped = torch.empty(B, n, len(order), cfg.hidden_size)
        x = model.embed(tokens).float().contiguous()
        dims = torch.tensor(self.shape + [B, n, cache.rows, cache.max_len], dtype=torch.int64)
        native.library().eagle3_forward(
            self.table.data_ptr(), dims.data_ptr(), cfg.rms_norm_eps, x.data_ptr(), cache.kv.data_ptr(),
            starts.data_ptr(), mask.data_ptr(), inv_freq.data_ptr(), positions.data_ptr(), tap_index.data_ptr(),
            len(order), tapped.data_ptr(),
        )  # fmt: skip
        for r in rows:
            cache.lengths[r] += n
        # x left the call through the final norm: the lm_head's matmul is what the head has left to do (on the
        # native kernel for any row count, so a token's logits never depend on how many rows ran).
        head = model.lm_head_weight_t
        return ForwardOutput(native.linear(x, head.data, head.shape[0], head.scale), tapped.view(B, n, -1) if order else None)
