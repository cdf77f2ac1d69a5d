"""The CPU weight layout, a step applied to a loaded model (as gpt-fast applies quantization after loading,
outside the model's definition): an [out, in] copy of every matrix of the target beside its [in, out] one,
and, per row count, the matmul that runs fastest on this machine.

A forward of 1..64 tokens (decoding, draft trees, small batches) is bound by streaming the weights, and
which layout and call MKL streams fastest for a few rows changes with the row count and with the machine:
measured on this project's CPU, F.linear ran 2-3 rows at one row's cost where W @ x.T cost twice that, and
on another day W @ x.T was the fast one. So the choice is measured on the model's own matrices, once per
machine, model shape, thread count and torch version, and cached (docs/design/fast-cpu-path.md).

CPU only: the copies double the weights' memory, and GPU BLAS has no such cliff. The model's `linear` uses a
copy where a matrix has one.
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from eagle3.files import read_json_object, write_text
from eagle3.paths import eagle3_home

FEW_ROWS = range(2, 65)  # the row counts that may take the [out, in] copy
PATHS = ("x @ W", "W @ x.T", "F.linear")  # [in, out] weight; [out, in] copy; [out, in] copy through F.linear
BUCKETS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # row counts measured; a count takes the next bucket's path
DEFAULT_PATHS: tuple[str, ...] = ("x @ W", "x @ W") + ("W @ x.T",) * 63  # by row count 0..64, before measuring


def few_rows_matmul(x: Tensor, weight_t: Tensor) -> Tensor:
    """x @ weight_t.T for a few rows, computed as weight_t @ x.T."""
    rows = x.reshape(-1, x.shape[-1])
    return (weight_t @ rows.t()).t().contiguous().view(*x.shape[:-1], -1)


def matmul(path: str, x: Tensor, weight: Tensor, weight_t: Tensor) -> Tensor:
    """x @ weight by one of PATHS (weight [in, out], weight_t the same weight [out, in])."""
    if path == "W @ x.T":
        return few_rows_matmul(x, weight_t)
    if path == "F.linear":
        return F.linear(x, weight_t)
    return x @ weight


def add_few_row_copies(model: torch.nn.Module) -> torch.nn.Module:
    """Gives every matrix of a model.Transformer its [out, in] copy, used by DEFAULT_PATHS until set_paths;
    returns the model. Fold the norms first (norm_folding.py): a copy does not follow later changes to its
    matrix."""
    for block in model.layers:
        block.few_row_weights = {name: getattr(block, f"{name}_weight").t().contiguous()
                                 for name in ("qkv", "o", "gate_up", "down")}  # fmt: skip
    model.lm_head_weight_t = model.lm_head_weight.t().contiguous()
    return set_paths(model, DEFAULT_PATHS)


def set_paths(model: torch.nn.Module, paths: tuple[str, ...]) -> torch.nn.Module:
    """The path each row count 0..64 takes (see PATHS), for every matrix of a model with copies."""
    for block in model.layers:
        block.matmul_paths = paths
    model.matmul_paths = paths
    return model


def _pairs(model: torch.nn.Module) -> list[tuple[Tensor, Tensor]]:
    """Every ([in, out], [out, in]) weight pair of a forward, in order."""
    pairs = [(getattr(b, f"{n}_weight"), b.few_row_weights[n]) for b in model.layers for n in ("qkv", "o", "gate_up", "down")]
    return pairs + [(model.lm_head_weight, model.lm_head_weight_t)]


def measure_paths(model: torch.nn.Module, repeats: int = 3) -> dict[int, str]:
    """The fastest of PATHS per row bucket: x streams through all of the model's matrices, as a forward
    does (so nothing stays in cache), every path and bucket taking turns; the median of `repeats`."""
    pairs = _pairs(model)
    inputs = {rows: {w.shape[0]: torch.randn(rows, w.shape[0], dtype=w.dtype) for w, _ in pairs} for rows in BUCKETS}
    times: dict[tuple[int, str], list[float]] = {}
    with torch.inference_mode():
        for repeat in range(repeats + 1):  # the first round warms up
            for rows in BUCKETS:
                for path in PATHS:
                    start = time.perf_counter()
                    for w, w_t in pairs:
                        matmul(path, inputs[rows][w.shape[0]], w, w_t)
                    if repeat:
                        times.setdefault((rows, path), []).append(time.perf_counter() - start)
    return {rows: min(PATHS, key=lambda p: statistics.median(times[rows, p])) for rows in BUCKETS}


def paths_by_row_count(best: dict[int, str]) -> tuple[str, ...]:
    """Per row count 0..64: one row takes x @ W; a count between buckets takes the next bucket's path."""
    return ("x @ W", "x @ W") + tuple(best[min(b for b in best if b >= rows)] for rows in FEW_ROWS)


def paths_key(model: torch.nn.Module) -> str:
    """What the choice depends on: the machine, the matrices' shapes and dtype, threads, torch."""
    parts = {"cpu": _cpu_name(), "shapes": [tuple(w.shape) for w, _ in _pairs(model)], "dtype": str(model.dtype),
             "threads": torch.get_num_threads(), "torch": torch.__version__, "buckets": BUCKETS}  # fmt: skip
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_MEASURED: dict[str, dict[int, str]] = {}  # this process's measurements, for when the cache cannot be written


def measured_paths(model: torch.nn.Module) -> tuple[str, ...]:
    """The path per row count for this model on this machine: cached in $EAGLE3_HOME/layout, measured first
    when missing (a few seconds). An unreadable cache is measured again; an unwritable one stays in memory."""
    key = paths_key(model)
    path = eagle3_home() / "layout" / f"{key}.json"
    best = _MEASURED.get(key)
    if best is None and path.is_file():
        try:
            stored = read_json_object(path)
            best = {int(rows): stored[str(rows)] for rows in BUCKETS}
            if any(p not in PATHS for p in best.values()):
                raise ValueError("an unknown path")
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"eagle3: warning: the cached matmul choice {path} is unreadable ({err}); measuring again",
                  file=sys.stderr)  # fmt: skip
            best = None
    if best is None:
        print(f"eagle3: measuring this CPU's fastest matmul per row count (cached in {path.parent})", file=sys.stderr)
        best = measure_paths(model)
        try:
            write_text(path, json.dumps({str(k): v for k, v in best.items()}, indent=1))
        except OSError as err:
            _MEASURED[key] = best
            print(f"eagle3: warning: could not cache the matmul choice in {path.parent} ({err}); it stays in "
                  "memory for this run", file=sys.stderr)  # fmt: skip
    return paths_by_row_count(best)


def for_device(model: torch.nn.Module) -> torch.nn.Module:
    """The layout steps that pay on the model's device (on a CPU, the few-row copies and the measured path
    per row count); returns the model."""
    if model.device.type != "cpu":
        return model
    return set_paths(add_few_row_copies(model), measured_paths(model))
