"""tau of the shipped SmolLM2 draft on the native runtime, its matrices in float32 and in int8
(`--draft-int8`), with a chain and the 60,5,10 tree, on MT-bench first turns (chat template, greedy).

    python benchmarks/draft_int8_tau.py [--prompts 10] [--max-new-tokens 64]

Also counts the outputs equal to plain decoding's (they must all be).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from eagle3.methods.drafter import load_drafter
from eagle3.fetch import resolve_draft
from eagle3.decoding.generate import generate
from eagle3.decoding.speculative import speculative_generate
from eagle3.evaluation.suites import data_dir, read_suite
from eagle3.runtimes.target import load_target
from eagle3.decoding.tree import TreeSpec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--runtime", default="native")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target(runtime=args.runtime)
    questions = read_suite("mt_bench", data_dir(), args.prompts).questions[: args.prompts]
    prompts = [target.encode(q.turns[0], chat=True) for q in questions]
    plain = [generate(target, ids, args.max_new_tokens).token_ids for ids in prompts]
    for int8 in (False, True):
        drafter = load_drafter(resolve_draft("default", "smollm2-135m"), target, int8=int8)
        for tree in (TreeSpec(6, 5, 1), TreeSpec(60, 5, 10)):
            results = [speculative_generate(target, drafter, ids, args.max_new_tokens, tree=tree) for ids in prompts]
            equal = sum(r.token_ids == ref for r, ref in zip(results, plain))
            print(f"draft int8 {int8!s:5} tree {tree.label:8}: tau {statistics.mean(r.tau for r in results):.3f} "
                  f"over {len(results)} prompts; outputs equal to plain decoding {equal}/{len(results)}")


if __name__ == "__main__":
    main()
