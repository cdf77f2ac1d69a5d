"""A target forward of n tokens under two matmul rules, side by side: the runtime's current rule (x @ W for
one row, the [out, in] copy as W @ x.T for 2..64) and a rule picked per row count from
benchmarks/matmul_paths.py's table (F.linear for 2-3 rows, x @ W for 4-8, W @ x.T above). A probe for issue
16: does the matmul table carry over to whole forwards? The picked rule is this machine's, written in here
by hand; a runtime would measure its own.

    python benchmarks/forward_rules.py [--target smollm2-135m] [--context 128] [--repeats 7]

Reports the median ms of a forward of 1, 2, 3, 4, 8 and 16 new tokens (all logits) after `--context` tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import eagle3.model as model_module
from eagle3.cpu_layout import few_rows_matmul
from eagle3.target import load_target

COUNTS = (1, 2, 3, 4, 8, 16)


def picked_rule(x, weight, bias, weight_t=None):
    rows = x.numel() // x.shape[-1]
    if weight_t is None or rows == 1 or 4 <= rows <= 8:
        y = x @ weight
    elif rows <= 3:
        y = F.linear(x, weight_t)
    else:
        y = few_rows_matmul(x, weight_t)
    return y if bias is None else y + bias


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
    rules = {"current": model_module.linear, "picked": picked_rule}
    times: dict[tuple[str, int], list[float]] = {}
    context = torch.randint(0, vocab, (1, args.context), generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            model.setup_cache(args.context + max(COUNTS))
            for repeat in range(args.repeats + 1):  # the first round warms up
                for n in COUNTS:
                    for name, rule in rules.items():
                        model_module.linear = rule
                        model.cache.truncate(0)
                        model(context, logits="none")
                        ids = torch.randint(0, vocab, (1, n))
                        start = time.perf_counter()
                        model(ids, logits="all")
                        if repeat:
                            times.setdefault((name, n), []).append((time.perf_counter() - start) * 1000)
    finally:
        model_module.linear = rules["current"]
    print(f"{args.target}, forward of n tokens after {args.context}, median ms of {args.repeats}, {args.threads} threads")
    print(f"| rule | {' | '.join(f'{n}' for n in COUNTS)} |")
    print("|---" * (len(COUNTS) + 1) + "|")
    for name in rules:
        print(f"| {name} | {' | '.join(f'{statistics.median(times[name, n]):.1f}' for n in COUNTS)} |")


if __name__ == "__main__":
    main()
