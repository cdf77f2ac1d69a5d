"""What a speculative round costs on the running hardware: measured, cached, refreshed with `eagle3 calibrate`.

The cost model holds
- the target's forward latency as a function of the number of new (tree) tokens, at two context lengths
  (attention grows with the context; between and beyond them it is interpolated linearly);
- the draft's step latency as a function of the number of tokens in the step (one tree level), including
  its logits and top-k, as the decoding loop runs them; and, for drafters whose first step of a round differs
  from the others (Medusa's and Hydra's heads, a draft model's catch-up), that step's latency per tokens read.
  Each drafter times its own steps (`step_timers`).
Both are measured in one row: a batch of B rows of n tokens is priced as B * n tokens (autotree.py).

Measurements are the median of a few timed calls after a warm-up, the sizes taking turns so that a machine
whose speed drifts (a shared machine's does) slows them all alike; they are made monotone: n tokens never cost
more than the cheapest larger count measured (a smaller tree could be padded to it). The decoding loop
corrects them online for the machine as it runs (see autotree.py). They are cached per target, draft shape
and precision, device, dtype, thread count and torch version under $EAGLE3_HOME/calibration.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
from bisect import bisect_left
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from eagle3.runtimes import native

from eagle3 import options
from eagle3.files import write_text
from eagle3.paths import eagle3_home

# Tokens per forward: one sequence's trees, and a batch's (rows x tree tokens) up to 256.
TREE_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256)
DRAFT_SIZES = (1, 2, 4, 8, 16, 32, 64)
CONTEXTS = (128, 1024)


def interpolate(points: dict[int, float], x: float) -> float:
    """Piecewise-linear through (n, ms) points; linear extrapolation past the ends."""
    xs = sorted(points)
    if len(xs) == 1:
        return points[xs[0]]
    i = min(max(bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1 = xs[i - 1], xs[i]
    y0, y1 = points[x0], points[x1]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass
class CostModel:
    target_ms: dict[int, dict[int, float]]  # context -> {new tokens -> ms}
    draft_ms: dict[int, float]  # nodes in one tree level (the draft step that expands them) -> ms
    key: str = ""
    # The drafter's first step of a round, per committed tokens it reads (its catch-up; for heads, their pass
    # over the root's feature) -> ms; None where that step is a draft step like the others (EAGLE's).
    first_ms: dict[int, float] | None = None

    def verify(self, n: int, context: int = 256) -> float:
        """ms for a target forward of n new tokens after `context` cached ones."""
        (c0, p0), (c1, p1) = sorted(self.target_ms.items())[:2]
        y0, y1 = interpolate(p0, n), interpolate(p1, n)
        return max(0.0, y0 + (y1 - y0) * (context - c0) / (c1 - c0))

    def draft(self, n: int) -> float:
        """ms for one draft step over n tokens (logits and top-k included)."""
        return interpolate(self.draft_ms, n)

    def first(self, n: int) -> float:
        """ms for the drafter's first step of a round, reading n committed tokens (the root's children included)."""
        return interpolate(self.first_ms or self.draft_ms, n)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "CostModel":
        first = d.get("first_ms")
        return cls({int(c): _points(p) for c, p in d["target_ms"].items()}, _points(d["draft_ms"]), d.get("key", ""),
                   None if first is None else _points(first))  # fmt: skip


def _points(p: dict) -> dict[int, float]:
    """JSON's (size -> ms) points, keys back to ints."""
    return {int(n): float(ms) for n, ms in p.items()}


def monotone(points: dict[int, float]) -> dict[int, float]:
    """Each point lowered to the cheapest point at or above its size."""
    out, cheapest = {}, float("inf")
    for n in sorted(points, reverse=True):
        cheapest = min(cheapest, points[n])
        out[n] = cheapest
    return dict(sorted(out.items()))


def _median_ms(steps: dict[int, Callable[[], object]], repeats: int) -> dict[int, float]:
    """Median wall time of each step, the steps taking turns (a drifting machine slows them all alike)."""
    for step in steps.values():
        step()  # warm-up (allocations, kernel choice)
    times: dict[int, list[float]] = {n: [] for n in steps}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(repeats):
        for n, step in steps.items():
            start = time.perf_counter()
            step()
            sync()
            times[n].append((time.perf_counter() - start) * 1000)
    return {n: statistics.median(t) for n, t in times.items()}


@torch.inference_mode()
def measure_target(target, taps: Sequence[int] = (), contexts=CONTEXTS, sizes=TREE_SIZES, repeats: int = 5
                   ) -> dict[int, dict[int, float]]:  # fmt: skip
    """Target forward latency (ms) for n new tokens (a chain), after `context` cached tokens, through the
    target's runtime as the decoding loop runs it (verify, then commit), tapping the draft's layers."""
    from eagle3.runtimes.runtime import make_runtime
    from eagle3.decoding.tree import chain

    runtime = make_runtime(target, taps)
    cfg = target.model.config
    contexts = [min(c, cfg.context_length - max(sizes) - 1) for c in contexts]
    generator = torch.Generator().manual_seed(0)
    out: dict[int, dict[int, float]] = {}
    for context in contexts:
        runtime.open(1, context + max(sizes) + 1, spare=max(sizes))
        runtime.prefill(torch.randint(0, cfg.vocab_size, (context,), generator=generator).tolist())
        steps = {}
        for n in sizes:
            tree = chain(torch.randint(0, cfg.vocab_size, (n,), generator=generator))

            def step(tree=tree):
                runtime.verify([tree])
                runtime.commit([[]])  # (keeps nothing: the next step runs after the same context)

            steps[n] = step
        out[context] = monotone(_median_ms(steps, repeats))
        runtime.release(0)
    return out


@torch.inference_mode()
def measure_drafter(drafter, sizes=DRAFT_SIZES, repeats: int = 7) -> tuple[dict[int, float] | None, dict[int, float]]:
    """The drafter's step latencies (ms), as its `step_timers` runs them: (its first step per tokens read, or
    None where that is a draft step like the others; one tree level's draft step per nodes)."""
    first, level = drafter.step_timers(sizes)
    return None if first is None else monotone(_median_ms(first, repeats)), monotone(_median_ms(level, repeats))


def cost_key(target, drafter) -> str:
    """What the timings depend on: the target's and draft's shapes, device, dtype, threads, torch version."""
    model = target.model
    draft = drafter.cost_identity()  # (its shapes, kind and precision: "draft", "draft_kind", ...)
    parts = {
        "target": target.name, "target_config": repr(model.config),
        "device": str(model.device), "device_name": torch.cuda.get_device_name(model.device)
        if model.device.type == "cuda" else os.uname().machine, "dtype": str(model.dtype),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "method": "interleaved median, monotone, to 256 tokens", **draft,
        "matmul_paths": list(getattr(model, "matmul_paths", ())),  # (cpu_layout's measured choice)
        "runtime": target.runtime,
        "kernels": native.source_digest() if target.runtime.startswith("native") or draft.get("draft_native") else None,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def cost_path(key: str) -> Path:
    return eagle3_home() / "calibration" / f"{key}.json"


_MEASURED: dict[str, CostModel] = {}  # this process's measurements, for when the cache cannot be written


def calibrate(target, drafter, refresh: bool = False, quiet: bool = False) -> CostModel:
    """The cached cost model for this target, drafter and machine, measured first when missing (or refresh).

    A cache file that cannot be read is measured again; a cache that cannot be written (an unwritable
    $EAGLE3_HOME) keeps the measurement in memory for this process, with a warning."""
    key = cost_key(target, drafter)
    path = cost_path(key)
    if not refresh:
        if key in _MEASURED:
            return _MEASURED[key]
        cached = _read_cached(path)
        if cached is not None:
            return cached
    if not quiet:
        print(f"eagle3: measuring forward latencies for the cost model (cached in {path.parent})", file=sys.stderr)
    first, level = measure_drafter(drafter)
    model = CostModel(measure_target(target, drafter.tap_layers), level, key, first)
    try:
        write_text(path, json.dumps(model.to_json(), indent=1))
    except OSError as err:
        _MEASURED[key] = model
        print(f"eagle3: warning: could not cache the cost model in {path.parent} ({err}); it stays in memory "
              "for this run (set EAGLE3_HOME to a writable folder to keep it)", file=sys.stderr)  # fmt: skip
    return model


def _read_cached(path: Path) -> CostModel | None:
    """The cost model cached at path; None when there is none or it cannot be read (it is measured again)."""
    if not path.is_file():
        return None
    try:
        return CostModel.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        print(f"eagle3: warning: the cached cost model {path} is unreadable ({type(err).__name__}); measuring "
              "again", file=sys.stderr)  # fmt: skip
        return None


def format_costs(model: CostModel) -> str:
    """A readable table: target ms (and ratio to one token) per tree size and context; draft ms per step size."""
    lines = []
    for context, points in sorted(model.target_ms.items()):
        one = points[min(points)]
        lines.append(f"target forward after {context} tokens:")
        lines += [f"  {n:3d} new tokens  {ms:8.2f} ms  {ms / one:5.2f}x" for n, ms in sorted(points.items())]
    if model.first_ms:
        lines.append("drafter's first step:")
        lines += [f"  {n:3d} tokens read {ms:8.2f} ms" for n, ms in sorted(model.first_ms.items())]
    lines.append("draft step (one tree level):")
    lines += [f"  {n:3d} tokens      {ms:8.2f} ms" for n, ms in sorted(model.draft_ms.items())]
    return "\n".join(lines)


def add_calibrate_parser(sub) -> None:
    from eagle3.methods.drafter import add_drafter_arguments
    from eagle3.fetch import DEFAULT_TARGET

    p = sub.add_parser("calibrate", help="measure this machine's target and draft latencies for --tree auto")
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--draft", default="default", help="draft folder or 'default' (the shipped draft)")
    options.add_runtime_arguments(p)
    p.add_argument("--cached", action="store_true", help="show the cached model instead of measuring again")
    add_drafter_arguments(p, window=False)  # (the window changes no latency measured here)


def calibrate_command(args) -> int:
    from eagle3.methods.drafter import drafter_options, load_drafter
    from eagle3.fetch import resolve_draft
    from eagle3.runtimes.target import load_target

    options.apply_threads(args)
    target = load_target(args.target, dtype=args.dtype, device=args.device, runtime=args.runtime)
    draft_path = resolve_draft(args.draft, args.target)
    if draft_path is None:
        raise ValueError(f"no draft for {args.target}: pass --draft PATH")
    drafter = load_drafter(draft_path, target, **drafter_options(args))
    model = calibrate(target, drafter, refresh=not args.cached)
    print(format_costs(model))
    print(f"cached: {cost_path(model.key)}")
    return 0
