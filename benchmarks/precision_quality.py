"""How far each native precision's target is from fp32: teacher-forced on fp32's own greedy answers.

    python benchmarks/precision_quality.py [--suites mt_bench,gsm8k] [--limit 5] [--max-new-tokens 64] \
        [--runtimes native-int8,native-w8a8] [--out runs/precision-quality.json]

Speculative decoding is lossless relative to the precision the target runs in, so what a user trades for int8's
speed is how far that target is from fp32. Per question (first turns through the chat template), the fp32
runtime (`native`) answers greedily; every runtime then reads the prompt and that answer (the prompt's prefill,
then the answer verified as one chain: the decoding path) and predicts each answer token. Reports per runtime:
top-1 agreement with fp32's predictions, mean KL(fp32 || runtime) per token, and how many of its own greedy
answers equal fp32's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

SUITES = "mt_bench,humaneval,gsm8k,alpaca,cnn_dm,natural_questions"


def predictions(target, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """Log-probabilities [len(answer), V] of each answer token's position, teacher-forced."""
    from eagle3.runtimes.runtime import make_runtime
    from eagle3.decoding.tree import chain

    runtime = make_runtime(target)
    runtime.open(1, len(prompt) + len(answer) + 1, spare=len(answer) + 1)
    _, first, _ = runtime.prefill(prompt)
    rows = [first[None]]
    if len(answer) > 1:  # (the chain's node i predicts the token after answer[i])
        rows.append(runtime.verify([chain(torch.tensor(answer[:-1]))])[0][0])
    return torch.cat(rows).float().log_softmax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--suites", default=SUITES)
    parser.add_argument("--limit", type=int, default=5, help="questions per suite")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--runtimes", default="native-int8,native-w8a8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from eagle3.decoding.generate import generate
    from eagle3.paths import shared_path
    from eagle3.evaluation.suites import load_suite
    from eagle3.runtimes.target import RUNTIMES, encode_messages, load_target

    runtimes = args.runtimes.split(",")
    if unknown := [r for r in runtimes if r not in RUNTIMES]:
        raise ValueError(f"unknown runtime {unknown[0]!r}; choose from {', '.join(RUNTIMES)}")
    questions = [q for s in args.suites.split(",") for q in load_suite(s, shared_path("data/eval"), args.limit)]
    reference = load_target(args.target, runtime="native")
    targets = {r: load_target(args.target, runtime=r) for r in runtimes}
    stats = {r: {"tokens": 0, "agree": 0, "kl": 0.0, "same_answers": 0} for r in runtimes}
    with torch.inference_mode():
        for i, question in enumerate(questions):
            prompt = encode_messages(reference, [{"role": "user", "content": question.turns[0]}])
            answer = generate(reference, prompt, args.max_new_tokens).token_ids
            if not answer:
                continue
            expected = predictions(reference, prompt, answer)
            for name, target in targets.items():
                got = predictions(target, prompt, answer)
                s = stats[name]
                s["tokens"] += len(answer)
                s["agree"] += int((got.argmax(-1) == expected.argmax(-1)).sum())
                s["kl"] += float((expected.exp() * (expected - got)).sum())
                s["same_answers"] += generate(target, prompt, args.max_new_tokens).token_ids == answer
            print(f"{i + 1}/{len(questions)} questions", file=sys.stderr, flush=True)
    rows = {name: {"top1_agreement": s["agree"] / max(s["tokens"], 1), "kl_per_token": s["kl"] / max(s["tokens"], 1),
                   "same_greedy_answers": s["same_answers"], "questions": len(questions), "tokens": s["tokens"]}
            for name, s in stats.items()}  # fmt: skip
    print("| runtime | top-1 agreement with fp32 | KL(fp32 || runtime) per token | greedy answers equal to fp32's |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['top1_agreement']:.3f} | {row['kl_per_token']:.4f} | "
              f"{row['same_greedy_answers']}/{row['questions']} |")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runtimes": rows}, indent=1))


if __name__ == "__main__":
    from eagle3.paths import MissingSharedData

    try:
        main()
    except (MissingSharedData, ValueError, OSError) as err:  # (a missing suite, a bad runtime or target)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
