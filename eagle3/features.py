"""Offline target features: the frozen target run once over the training data, its outputs kept on disk, so
that later epochs and later runs train without the target's forward pass.

Per example the cache keeps the token ids, the loss mask, the three taps and the last layer's outputs (from
which the target's logits are recomputed by its head, which is far smaller than storing logits), in fp16
safetensors shards. Shards and the index are written atomically, and a rerun continues after the last
complete shard.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from eagle3.data import Example
from eagle3.target import Target

INDEX = "index.json"


@dataclass
class CachedExample:
    input_ids: torch.Tensor  # [L]
    loss_mask: torch.Tensor  # [L]
    taps: torch.Tensor  # [L, 3H]
    hidden: torch.Tensor  # [L, H]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_index(folder: Path) -> dict:
    path = folder / INDEX
    return json.loads(path.read_text()) if path.is_file() else {"shards": [], "examples": 0}


@torch.no_grad()
def dump_features(target: Target, examples: list[Example], folder: str | Path, shard_examples: int = 64,
                  dtype: torch.dtype = torch.float16, progress: bool = True) -> Path:  # fmt: skip
    """Writes the features of `examples` (in order) under `folder`, continuing after complete shards."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = read_index(folder)
    model = target.model
    done = index["examples"]
    todo = range(done, len(examples), shard_examples)
    for first in tqdm(todo, desc="features", disable=not progress, file=sys.stderr):
        chunk = examples[first : first + shard_examples]
        tensors: dict[str, torch.Tensor] = {}
        for i, example in enumerate(chunk):
            model.empty_cache(len(example.input_ids))
            out = model(example.input_ids.view(1, -1).to(model.device), logits="hidden", taps=True)
            tensors[f"{i}.input_ids"] = example.input_ids.to(torch.int32)
            tensors[f"{i}.loss_mask"] = example.loss_mask.to(torch.int8)
            tensors[f"{i}.taps"] = out.taps[0].to(dtype).cpu()
            tensors[f"{i}.hidden"] = out.hidden[0].to(dtype).cpu()
        name = f"shard-{len(index['shards']):05d}.safetensors"
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        save_file(tensors, str(tmp))
        os.replace(tmp, folder / name)
        index["shards"].append({"file": name, "first": first, "count": len(chunk)})
        index["examples"] = first + len(chunk)
        index["target_layers"] = list(model.tap_layers)
        _atomic_write_text(folder / INDEX, json.dumps(index, indent=1))
    return folder


class FeatureCache:
    """Random access to cached examples (one shard held in memory at a time)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = read_index(self.folder)
        if not index["shards"]:
            raise FileNotFoundError(f"no feature shards in {self.folder}")
        self.shards = index["shards"]
        self._loaded: tuple[str, dict] | None = None

    def __len__(self) -> int:
        return sum(s["count"] for s in self.shards)

    def __getitem__(self, i: int) -> CachedExample:
        for shard in self.shards:
            if shard["first"] <= i < shard["first"] + shard["count"]:
                if self._loaded is None or self._loaded[0] != shard["file"]:
                    self._loaded = (shard["file"], load_file(str(self.folder / shard["file"])))
                t, j = self._loaded[1], i - shard["first"]
                return CachedExample(t[f"{j}.input_ids"].long(), t[f"{j}.loss_mask"].long(), t[f"{j}.taps"],
                                     t[f"{j}.hidden"])  # fmt: skip
        raise IndexError(i)

    def examples(self) -> list[Example]:
        """Token ids and loss masks only (for the draft vocabulary and batching)."""
        return [Example(self[i].input_ids, self[i].loss_mask) for i in range(len(self))]
