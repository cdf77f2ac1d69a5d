"""Offline target features: the frozen target run once over the training data, its outputs kept on disk, so
that later epochs and later runs train without the target's forward pass.

Per example the cache keeps the token ids, the loss mask, the draft's three taps and the last layer's outputs
(from which the target's logits are recomputed by its head, which is far smaller than storing logits), in fp16
safetensors shards. Shards and the index are written atomically, and a rerun continues after the last
complete shard. The index holds a fingerprint of what the features were made from (the target's weights, the
tapped layers, the examples): a cache made from other data, another target or other layers is refused, never
silently trained on.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from eagle3.training.data import Example, examples_fingerprint
from eagle3.files import atomic_path, write_text
from eagle3.runtimes.model import weights_fingerprint
from eagle3.runtimes.target import Target

INDEX = "index.json"
FORMAT = 2  # the index layout (1: no fingerprint)


@dataclass
class CachedExample:
    input_ids: torch.Tensor  # [L]
    loss_mask: torch.Tensor  # [L]
    taps: torch.Tensor  # [L, 3H]
    hidden: torch.Tensor  # [L, H]


def fingerprint(target: Target, examples: list[Example], taps: Sequence[int]) -> dict:
    """What a cache's features depend on: the target's weights, the tapped layers and the examples."""
    return {"target": weights_fingerprint(target.model), "tap_layers": list(taps),
            "examples": examples_fingerprint(examples), "count": len(examples)}  # fmt: skip


def read_index(folder: Path) -> dict:
    path = folder / INDEX
    if not path.is_file():
        return {"format": FORMAT, "shards": [], "examples": 0}
    try:
        index = json.loads(path.read_text())
        shards = index["shards"]
        for shard in shards:
            _shard_path(folder, shard["file"])
            int(shard["first"]), int(shard["count"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a feature cache index ({type(err).__name__}: {err})") from None
    return index


def _shard_path(folder: Path, name: str) -> Path:
    """A shard's path, refusing names that would read outside the cache folder."""
    if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts or "/" in name:
        raise ValueError(f"shard name {name!r} points outside the cache folder")
    return folder / name


def _check_fingerprint(folder: Path, index: dict, expected: dict) -> None:
    found = index.get("fingerprint")
    if found is None:
        raise ValueError(f"the feature cache {folder} has no fingerprint (made by an older eagle3): it cannot be "
                         "checked against this data and target; use a new --features folder")  # fmt: skip
    differ = [what for key, what in (("target", "another target"), ("tap_layers", "other tapped layers"),
                                     ("examples", "other data"), ("count", "another number of examples"))
              if found.get(key) != expected[key]]  # fmt: skip
    if differ:
        raise ValueError(f"the feature cache {folder} was made from {', '.join(differ)}; use another --features "
                         "folder for this run")  # fmt: skip


@torch.no_grad()
def dump_features(target: Target, examples: list[Example], folder: str | Path, taps: Sequence[int],
                  shard_examples: int = 64, dtype: torch.dtype = torch.float16, progress: bool = True) -> Path:  # fmt: skip
    """Writes the features (the target's layers `taps`) of `examples`, in order, under `folder`, continuing
    after complete shards when the folder holds a cache of the same target, taps and examples."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = read_index(folder)
    expected = fingerprint(target, examples, taps)
    if index["shards"]:
        _check_fingerprint(folder, index, expected)
    index.update(format=FORMAT, fingerprint=expected, target_layers=list(taps))
    model = target.model
    todo = range(index["examples"], len(examples), shard_examples)
    for first in tqdm(todo, desc="features", disable=not progress, file=sys.stderr):
        chunk = examples[first : first + shard_examples]
        tensors: dict[str, torch.Tensor] = {}
        for i, example in enumerate(chunk):
            model.empty_cache(len(example.input_ids))
            out = model(example.input_ids.view(1, -1).to(model.device), logits="hidden", taps=taps)
            tensors[f"{i}.input_ids"] = example.input_ids.to(torch.int32)
            tensors[f"{i}.loss_mask"] = example.loss_mask.to(torch.int8)
            tensors[f"{i}.taps"] = out.taps[0].to(dtype).cpu()
            tensors[f"{i}.hidden"] = out.hidden[0].to(dtype).cpu()
        name = f"shard-{len(index['shards']):05d}.safetensors"
        with atomic_path(folder / name) as temp:
            save_file(tensors, str(temp))
        index["shards"].append({"file": name, "first": first, "count": len(chunk)})
        index["examples"] = first + len(chunk)
        write_text(folder / INDEX, json.dumps(index, indent=1))
    return folder


class FeatureCache:
    """Random access to cached examples (one shard held in memory at a time). Given the target, examples and
    taps it is meant for, it checks the cache's fingerprint first."""

    def __init__(self, folder: str | Path, target: Target | None = None, examples: list[Example] | None = None,
                 taps: Sequence[int] | None = None):  # fmt: skip
        self.folder = Path(folder)
        index = read_index(self.folder)
        if not index["shards"]:
            raise FileNotFoundError(f"no feature shards in {self.folder}")
        if target is not None and examples is not None and taps is not None:
            _check_fingerprint(self.folder, index, fingerprint(target, examples, taps))
        self.shards = index["shards"]
        self.tap_layers = tuple(index.get("target_layers") or ())
        self._loaded: tuple[str, dict] | None = None

    def __len__(self) -> int:
        return sum(s["count"] for s in self.shards)

    def __getitem__(self, i: int) -> CachedExample:
        for shard in self.shards:
            if shard["first"] <= i < shard["first"] + shard["count"]:
                if self._loaded is None or self._loaded[0] != shard["file"]:
                    self._loaded = (shard["file"], self._read(shard["file"]))
                t, j = self._loaded[1], i - shard["first"]
                try:
                    return CachedExample(t[f"{j}.input_ids"].long(), t[f"{j}.loss_mask"].long(), t[f"{j}.taps"],
                                         t[f"{j}.hidden"])  # fmt: skip
                except KeyError as err:
                    raise ValueError(f"feature shard {self.folder / shard['file']} lacks {err.args[0]!r}") from None
        raise IndexError(i)

    def _read(self, name: str) -> dict[str, torch.Tensor]:
        path = _shard_path(self.folder, name)
        try:
            return load_file(str(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"feature shard {path} is missing (the cache is incomplete)") from None
        except Exception as err:  # safetensors' own error type for truncated or foreign files
            raise ValueError(f"feature shard {path} is unreadable ({type(err).__name__}: {err})") from None

    def examples(self) -> list[Example]:
        """Token ids and loss masks only (for the draft vocabulary and batching)."""
        return [Example(self[i].input_ids, self[i].loss_mask) for i in range(len(self))]
