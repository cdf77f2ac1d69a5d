"""Matmul paths for the target's weights on this CPU: how fast each streams a whole model's matrices for a
forward of 1..64 tokens (issue 16, measured first).

    python benchmarks/matmul_paths.py [--rows 1,2,4,8,16,64] [--repeats 7] [--out FILE.json]

The matrices have SmolLM2-135M's shapes (30 blocks of qkv, o, gate_up, down, and the 49152-row lm_head:
135M weights), random, each its own tensor, so nothing stays in cache between two uses: a pass multiplies
x [rows, in] through every matrix in turn, as one forward does (attention and norms left out). Every path
runs each row count in turns within a repetition, so a drifting machine slows all alike; the figure is the
median pass. Paths:

- `x @ W`: weights [in, out] fp32 (the runtime's one-row path today);
- `W @ x.T`: weights [out, in] fp32 (the runtime's few-row path today, cpu_layout.py);
- `F.linear`: weights [out, in] fp32 through torch.nn.functional.linear (what nn.Linear does);
- `int8 weight-only`: weights [out, in] int8 with a per-row fp32 scale, torch's _weight_int8pack_mm.

Reports ms per pass and the weight bytes streamed per second (GB/s).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

HIDDEN, QKV, MLP, VOCAB, LAYERS = 576, 960, 1536, 49152, 30  # SmolLM2-135M


def shapes() -> list[tuple[int, int]]:
    """(in, out) of every matrix a forward multiplies by, in order."""
    block = [(HIDDEN, QKV), (HIDDEN, HIDDEN), (HIDDEN, 2 * MLP), (MLP, HIDDEN)]
    return block * LAYERS + [(HIDDEN, VOCAB)]


def build(seed: int = 0) -> dict[str, list]:
    """Each path's copy of the model's matrices."""
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o, i, generator=generator) * i**-0.5 for i, o in shapes()]  # [out, in]
    scales = [w.abs().amax(dim=1) / 127 for w in weights]
    return {
        "x @ W": [w.t().contiguous() for w in weights],
        "W @ x.T": weights,
        "F.linear": weights,
        "int8 weight-only": [((w / s[:, None]).round().clamp(-127, 127).to(torch.int8), s) for w, s in zip(weights, scales)],
    }  # fmt: skip


def multiply(path: str) -> Callable:
    if path == "x @ W":
        return lambda x, w: x @ w
    if path == "W @ x.T":
        return lambda x, w: (w @ x.t()).t()
    if path == "F.linear":
        return F.linear
    return lambda x, w: torch.ops.aten._weight_int8pack_mm(x, w[0], w[1])


def one_pass(path: str, matrices: list, rows: int) -> float:
    """Seconds to multiply rows inputs through every matrix (each output becomes a fresh input's scale)."""
    mul = multiply(path)
    x = {i: torch.randn(rows, i) for i in {i for i, _ in shapes()}}
    start = time.perf_counter()
    for (i, _), w in zip(shapes(), matrices):
        mul(x[i], w)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,2,4,8,16,64")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paths", default=None, help="comma-separated subset of the paths (default: all)")
    parser.add_argument("--out", default=None, help="write the table as JSON here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    row_counts = [int(r) for r in args.rows.split(",")]
    paths = build()
    if args.paths:
        paths = {p: paths[p] for p in args.paths.split(",")}
    params = sum(i * o for i, o in shapes())
    nbytes = {p: params * (1 if p.startswith("int8") else 4) for p in paths}
    times: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        for path, matrices in paths.items():  # warm-up
            one_pass(path, matrices, 1)
        for _ in range(args.repeats):
            for rows in row_counts:
                for path, matrices in paths.items():
                    times.setdefault((path, rows), []).append(one_pass(path, matrices, rows))
    table = {p: {r: statistics.median(times[p, r]) * 1000 for r in row_counts} for p in paths}
    print(f"{params / 1e6:.0f}M weights, {args.threads} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print("ms per pass (GB/s of weights streamed)")
    print(f"| path | {' | '.join(f'{r} rows' for r in row_counts)} |")
    print("|---" * (len(row_counts) + 1) + "|")
    for p, by_rows in table.items():
        cells = [f"{ms:.1f} ({nbytes[p] / ms / 1e6:.1f})" for ms in by_rows.values()]
        print(f"| {p} | {' | '.join(cells)} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": args.threads, "torch": torch.__version__, "ms": table}, f, indent=1)


if __name__ == "__main__":
    main()
