"""Two builds of eagle3's native kernels in one process, taking turns: does a kernel change make a verify faster?

    python benchmarks/kernel_ab.py --before ../eagle3-before/eagle3/runtimes/kernels [--runtime native-w8a8] [--tokens 1,4,8,16]

Loads the target once on a native runtime, builds the kernels of --before (a kernels folder) beside this
checkout's, and times a verify of n chained tokens after a 128-token prompt, the two builds alternating
(the order flips every repeat), so the host's drift hits both alike. Both builds read the same packed weights:
a change that alters the panel layout cannot be compared this way (use benchmarks/ab_engine.py). Prints the
median ms per build and token count, and their ratio.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, type=Path, help="the kernels folder of the code before the change")
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--runtime", default="native-w8a8", choices=("native", "native-int8", "native-w8a8"))
    parser.add_argument("--tokens", default="1,4,8,16")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from eagle3.runtimes import native
    from eagle3.runtimes.runtime import make_runtime
    from eagle3.runtimes.target import load_target
    from eagle3.decoding.tree import chain

    if not (args.before / "forward.cpp").is_file():
        raise ValueError(f"{args.before} holds no kernels (forward.cpp)")
    after = native.library()
    if after is None:
        raise ValueError(f"the native kernels are unavailable: {native.why_unavailable()}")
    here = native.KERNELS
    native.KERNELS = args.before
    try:
        before = native.load(native._build(shutil.which("g++") or shutil.which("c++")))
    finally:
        native.KERNELS = here
    target = load_target(args.target, runtime=args.runtime)
    runtime = make_runtime(target)
    counts = [int(n) for n in args.tokens.split(",")]
    times: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        for repeat in range(args.repeats):
            builds = [("after", after), ("before", before)]
            for name, lib in builds[::-1] if repeat % 2 else builds:
                native._library = lib
                for n in counts:
                    runtime.open(1, 512, spare=max(counts) + 1)
                    runtime.prefill(list(range(100, 228)))
                    tree = chain(torch.arange(1, n + 1))
                    start = time.perf_counter()
                    for _ in range(3):
                        runtime.verify([tree])
                        runtime.model.cache.lengths[0] -= n  # (the same slots again)
                    times.setdefault((name, n), []).append((time.perf_counter() - start) / 3 * 1000)
    native._library = after
    print(f"| {args.runtime}, verify of n tokens after 128 | before (ms) | after (ms) | after / before |")
    print("|---|---|---|---|")
    for n in counts:
        b, a = statistics.median(times["before", n]), statistics.median(times["after", n])
        print(f"| n = {n} | {b:.2f} | {a:.2f} | {a / b:.3f} |")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:  # (no kernels there, a build that fails, a bad target)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
