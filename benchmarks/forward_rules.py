"""A target forward of n tokens under two matmul choices, side by side: the fixed rule the runtime had
before issue 16 (cpu_layout.DEFAULT_PATHS: x @ W for one row, the [out, in] copy as W @ x.T for 2..64) and
the path per row count that cpu_layout measures on this machine (what load_target now applies).

    python benchmarks/forward_rules.py [--target smollm2-135m] [--context 128] [--repeats 7]

Reports the median ms of a forward of 1, 2, 3, 4, 8 and 16 new tokens (all logits) after `--context` tokens,
and the measured choice.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from eagle3.runtimes.cpu_layout import DEFAULT_PATHS, set_paths
from eagle3.runtimes.target import load_target

COUNTS = (1, 2, 3, 4, 8, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_target(args.target).model
    vocab = model.config.vocab_size
    rules = {"fixed (before)": DEFAULT_PATHS, "measured": model.matmul_paths}
    times: dict[tuple[str, int], list[float]] = {}
    context = torch.randint(0, vocab, (1, args.context), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model.setup_cache(args.context + max(COUNTS))
        for repeat in range(args.repeats + 1):  # the first round warms up
            for n in COUNTS:
                for name, paths in rules.items():
                    set_paths(model, paths)
                    model.cache.truncate(0)
                    model(context, logits="none")
                    ids = torch.randint(0, vocab, (1, n))
                    start = time.perf_counter()
                    model(ids, logits="all")
                    if repeat:
                        times.setdefault((name, n), []).append((time.perf_counter() - start) * 1000)
    print(f"{args.target}, forward of n tokens after {args.context}, median ms of {args.repeats}, {args.threads} threads")
    print("measured choice:", ", ".join(f"{n} rows: {rules['measured'][n]}" for n in (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)))
    print(f"| rule | {' | '.join(f'{n}' for n in COUNTS)} |")
    print("|---" * (len(COUNTS) + 1) + "|")
    for name in rules:
        print(f"| {name} | {' | '.join(f'{statistics.median(times[name, n]):.1f}' for n in COUNTS)} |")


if __name__ == "__main__":
    main()
