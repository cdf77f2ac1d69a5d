"""Drafters for tests that know the target's answers, so that long accepted paths, cache compaction and
EOS inside an accepted run are exercised."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from eagle3.drafter import top_children
from eagle3.model import Transformer


class TargetOracle:
    """Proposes with the target model itself (its own KV cache): its top child is the target's argmax, so
    greedy decoding accepts every level; under sampling it proposes the target's most likely tokens."""

    tap_layers = ()  # it reads no features

    def __init__(self, model: Transformer):
        self.model = model
        self.paths: list[list[int]] = []

    def reset(self, prompt_ids: Sequence[int], max_len: int) -> None:
        self.model.setup_cache(max_len + 1)
        self.model(torch.tensor([[prompt_ids[0]]]), logits="none")

    def catch_up(self, tokens: Tensor, features: Tensor, start: int, top_k: int) -> tuple[Tensor, Tensor]:
        self.top_k = top_k
        self.paths = [[]]
        logits = self.model(tokens.view(1, -1).cpu(), logits="last").logits[0, -1]
        return top_children(logits, top_k)

    def expand(self, tokens: Tensor, source_rows: Tensor, depth: int, mask: Tensor) -> tuple[Tensor, Tensor]:
        cache = self.model.cache
        committed = cache.length
        logps, ids = [], []
        for token, source in zip(tokens.tolist(), source_rows.tolist()):
            path = self.paths[source] + [token]
            self.paths.append(path)
            if committed + len(path) <= min(cache.max_len, self.model.config.context_length):
                logits = self.model(torch.tensor([path]), logits="last").logits[0, -1]
                cache.truncate(committed)
            else:  # past the end of the context: nothing to foresee
                logits = torch.zeros(self.model.config.vocab_size)
            lp, i = top_children(logits, self.top_k)
            logps.append(lp)
            ids.append(i)
        return torch.stack(logps), torch.stack(ids)

    def end_round(self) -> None:
        pass


class ReferenceOracle:
    """Knows the reference continuation (prompt + plain greedy output): on the reference path it proposes
    the reference's next token first; elsewhere, and as the other children, arbitrary tokens."""

    tap_layers = ()  # it reads no features

    def __init__(self, reference: Sequence[int], vocab_size: int):
        self.reference, self.vocab_size = list(reference), vocab_size

    def reset(self, prompt_ids: Sequence[int], max_len: int) -> None:
        self.length = len(prompt_ids)  # committed tokens; catch_up adds the newly committed ones

    def _children(self, next_index: int, on_path: bool) -> tuple[Tensor, Tensor]:
        ids = [(next_index * 7 + j * 13 + 3) % self.vocab_size for j in range(self.top_k)]
        if on_path and next_index < len(self.reference):
            right = self.reference[next_index]
            ids = [right] + [i for i in ids if i != right][: self.top_k - 1]
        logp = torch.log(torch.linspace(0.9, 0.1, len(ids)))
        return logp, torch.tensor(ids)

    def catch_up(self, tokens: Tensor, features: Tensor, start: int, top_k: int) -> tuple[Tensor, Tensor]:
        self.top_k = top_k
        tokens = tokens.tolist()
        self.on_path = self.reference[start + 1 : start + 1 + len(tokens)] == tokens
        self.root_index = start + 1 + len(tokens)  # reference index of the root's children
        self.rows = [(self.root_index, self.on_path)]
        return self._children(self.root_index, self.on_path)

    def expand(self, tokens: Tensor, source_rows: Tensor, depth: int, mask: Tensor) -> tuple[Tensor, Tensor]:
        logps, ids = [], []
        for token, source in zip(tokens.tolist(), source_rows.tolist()):
            index, on_path = self.rows[source]
            on_path = on_path and index < len(self.reference) and self.reference[index] == token
            self.rows.append((index + 1, on_path))
            lp, i = self._children(index + 1, on_path)
            logps.append(lp)
            ids.append(i)
        return torch.stack(logps), torch.stack(ids)

    def end_round(self) -> None:
        pass
