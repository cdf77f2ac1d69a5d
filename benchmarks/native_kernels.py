"""eagle3's native kernels (native.py) against torch's matmul paths, streaming SmolLM2-135M-shaped matrices
(random weights, each its own tensor, so nothing stays in cache) for a few row counts.

    python benchmarks/native_kernels.py [--rows 1,2,3,4,8] [--repeats 5]

Reports the median ms of one pass through the 121 matrices per path and row count, with the weight bytes
streamed per second (fp32: 4 bytes a weight; int8 and w8a8: 1). `--paths` picks some of them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from eagle3.runtimes import native
from eagle3.runtimes.native_weights import NativeWeight

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)] * 30 + [(576, 49152)]  # SmolLM2-135M, [in, out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,2,3,4,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paths", default=None, help="comma-separated, e.g. 'native int8,native w8a8' (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if native.library() is None:
        raise SystemExit(f"the native kernels are unavailable: {native.why_unavailable()}")
    weights = [torch.randn(i, o) * 0.02 for i, o in SHAPES]  # [in, out]
    weights_t = [w.t().contiguous() for w in weights]
    fp32 = [NativeWeight.of(w) for w in weights_t]
    int8 = [NativeWeight.of(w, "int8") for w in weights_t]
    w8a8 = [NativeWeight.of(w, "w8a8") for w in weights_t]
    total = sum(i * o for i, o in SHAPES)
    paths = {
        "x @ W": (lambda x, k: x @ weights[k], 4),
        "F.linear": (lambda x, k: F.linear(x, weights_t[k]), 4),
        "native fp32": (lambda x, k: fp32[k].matmul(x), 4),
        "native int8": (lambda x, k: int8[k].matmul(x), 1),
        "native w8a8": (lambda x, k: w8a8[k].matmul(x), 1),
    }
    if args.paths:
        unknown = set(args.paths.split(",")) - set(paths)
        if unknown:
            raise SystemExit(f"error: unknown paths {', '.join(sorted(unknown))}; choose from {', '.join(paths)}")
        paths = {name: paths[name] for name in args.paths.split(",")}
    print(f"w8a8 dot products: {'native (VNNI)' if native.w8a8_native_dot() else 'emulated (no VNNI)'}")
    counts = [int(r) for r in args.rows.split(",")]
    times: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        for repeat in range(args.repeats + 1):  # the first round warms up
            for rows in counts:
                inputs = {i: torch.randn(rows, i) for i in {i for i, _ in SHAPES}}
                for name, (run, _) in paths.items():
                    start = time.perf_counter()
                    for k, (i, _) in enumerate(SHAPES):
                        run(inputs[i], k)
                    if repeat:
                        times.setdefault((name, rows), []).append(time.perf_counter() - start)
    print("| path | " + " | ".join(f"{r} row{'s' if r > 1 else ''}" for r in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for name, (_, width) in paths.items():
        cells = []
        for rows in counts:
            ms = 1000 * statistics.median(times[name, rows])
            cells.append(f"{ms:.1f} ({total * width / ms / 1e6:.1f} GB/s)")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
