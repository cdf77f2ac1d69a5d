"""The target side of a speculative round: prefill a sequence into a row, verify every row's tree in one
forward pass, commit each row's accepted path.

`TargetRuntime` is the contract the decoding engine (engine.py) relies on; `TorchRuntime` implements it with
eagle3's PyTorch model (model.py). Rows are the batch: a sequence joining gets the next free row, and one
leaving frees its row by moving the last row into it, so the live rows are always 0 .. rows-1 and one forward
runs them all.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
from torch import Tensor

from eagle3.runtimes.target import Target
from eagle3.decoding.tree import DraftTree


class TargetRuntime(Protocol):
    rows: int  # live rows (sequences)
    max_len: int  # positions a row may hold

    def open(self, max_rows: int, max_len: int, spare: int = 0) -> None: ...

    def length(self, row: int) -> int: ...

    def prefill(self, prompt_ids: Sequence[int]) -> tuple[int, Tensor, Tensor | None]: ...

    def verify(self, trees: list[DraftTree]) -> tuple[Tensor, Tensor | None]: ...

    def commit(self, paths: list[list[int]]) -> None: ...

    def release(self, row: int) -> None: ...


def make_runtime(target: Target, tap_layers: Sequence[int] = ()) -> TargetRuntime:
    """The runtime the target was loaded for (Target.runtime), tapping the drafter's layers."""
    if target.runtime == "torch":
        return TorchRuntime(target, tap_layers)
    if target.runtime.startswith("native"):
        return NativeRuntime(target, tap_layers)
    from eagle3.runtimes.openvino_runtime import OpenVINORuntime

    return OpenVINORuntime(target.model, tap_layers, "int8" if target.runtime == "openvino-int8" else "fp32")


def pad_trees(trees: list[DraftTree]) -> tuple[Tensor, Tensor, Tensor]:
    """Every row's tree padded to the largest: tokens [B, n], depths [B, n] and tree masks [B, n, n]. A padding
    node is token 0 at depth 0 that sees only itself; nothing sees it, and compaction drops it. One tree comes
    back as views of its own tensors (read-only: a plain step's root shares them with every other)."""
    if len(trees) == 1:  # (a plain step of one sequence: the padding's allocations would be a visible share)
        tree = trees[0]
        return tree.tokens.view(1, -1), tree.depths.view(1, -1), tree.mask.view(1, tree.size, tree.size)
    n = max(t.size for t in trees)
    tokens = torch.zeros(len(trees), n, dtype=torch.long)
    depths = torch.zeros(len(trees), n, dtype=torch.long)
    masks = torch.eye(n, dtype=torch.bool).repeat(len(trees), 1, 1)
    for b, tree in enumerate(trees):
        tokens[b, : tree.size] = tree.tokens
        depths[b, : tree.size] = tree.depths
        masks[b, : tree.size, : tree.size] = tree.mask
    return tokens, depths, masks


class TorchRuntime:
    """TargetRuntime on eagle3's PyTorch model: its KV cache holds a row per sequence, each with its own length.
    It taps the drafter's layers (none for a drafter that reads no features)."""

    def __init__(self, target: Target, tap_layers: Sequence[int] = ()):
        self.target, self.model = target, target.model
        self.tap_layers = tuple(tap_layers)
        self.rows = 0
        self.max_len = 0  # positions a row may hold
        self._starts: list[int] = []  # each row's length before the last verify

    def open(self, max_rows: int, max_len: int, spare: int = 0) -> None:
        """Room for max_rows sequences of up to max_len positions (their trees included; capped by the context),
        plus `spare` slots per row for the padding of other rows' larger trees; no rows yet."""
        model = self.model
        cache = model.cache
        self.max_len = min(max_len, model.config.context_length)
        slots = self.max_len + spare
        if cache is None or cache.rows != max_rows or cache.max_len < slots:
            model.setup_cache(slots, batch_size=max_rows, padded=True)
        model.cache.truncate(0)
        self.rows = 0

    def length(self, row: int) -> int:
        """Tokens committed in a row's cache."""
        return self.model.cache.lengths[row]

    def prefill(self, prompt_ids: Sequence[int]) -> tuple[int, Tensor, Tensor | None]:
        """A new sequence in the next free row: (its row, the logits after its prompt [V], its prompt's taps
        [P, len(taps) * H] or None)."""
        cache = self.model.cache
        if self.rows >= cache.rows:
            raise ValueError(f"no free row: the batch holds {cache.rows} sequences")
        row = self.rows
        cache.lengths[row] = 0
        prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.model.device)
        out = self.model(prompt, logits="last", taps=self.tap_layers, rows=range(row, row + 1))
        self.rows += 1
        return row, out.logits[0, -1], None if out.taps is None else out.taps[0]

    def verify(self, trees: list[DraftTree]) -> tuple[Tensor, Tensor | None]:
        """One forward over every row's tree (row b's tree after row b's committed tokens): logits [B, n, V]
        and taps [B, n, len(taps) * H] (None without taps); n is the largest tree, smaller ones padded."""
        if len(trees) != self.rows:
            raise ValueError(f"{len(trees)} trees for {self.rows} rows")
        device = self.model.device
        self._starts = list(self.model.cache.lengths[: self.rows])
        if len(trees) == 1:  # one sequence: no padding, one mask shared by every head
            tree = trees[0]
            positions = self._starts[0] + tree.depths  # (on the host: the runtime reads their max without a sync)
            out = self.model(tree.tokens.view(1, -1).to(device), positions, tree.mask.to(device),
                             taps=self.tap_layers, rows=range(0, 1))  # fmt: skip
            return out.logits, out.taps
        tokens, depths, masks = pad_trees(trees)
        positions = torch.tensor(self._starts)[:, None] + depths
        out = self.model(tokens.to(device), positions, masks.to(device), taps=self.tap_layers, rows=range(0, self.rows))
        return out.logits, out.taps

    def commit(self, paths: list[list[int]]) -> None:
        """Each row keeps its accepted path of the tree it last verified (node indices from the root)."""
        self.model.cache.compact(self._starts, paths)

    def release(self, row: int) -> None:
        """Frees a row: the last row moves into it, so the live rows stay 0 .. rows-1."""
        self.model.cache.free_row(row, self.rows - 1)
        self.rows -= 1


class NativeRuntime(TorchRuntime):
    """TargetRuntime on eagle3's PyTorch model with its weights on the native kernels (native_weights.py): the
    prompt runs through the model, every verify through native_forward (its layers in one native call), on
    the same KV cache."""

    def __init__(self, target: Target, tap_layers: Sequence[int] = ()):
        from eagle3.runtimes.native_forward import NativeLayers

        super().__init__(target, tap_layers)
        self.layers = NativeLayers(target.model)

    def verify(self, trees: list[DraftTree]) -> tuple[Tensor, Tensor | None]:
        if len(trees) != self.rows:
            raise ValueError(f"{len(trees)} trees for {self.rows} rows")
        self._starts = list(self.model.cache.lengths[: self.rows])
        tokens, depths, masks = pad_trees(trees)
        out = self.layers.forward(tokens, torch.tensor(self._starts)[:, None] + depths, masks, self.tap_layers)
        return out.logits, out.taps
