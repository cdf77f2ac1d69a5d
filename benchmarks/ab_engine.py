"""Two checkouts of eagle3 side by side in one run: does a change slow decoding down?

    python benchmarks/ab_engine.py --before ../eagle3-before --after . --limit 20 --max-new-tokens 64 [--runtime native]

Each checkout runs in a worker process of its own (its own PYTHONPATH) that loads the target and the shipped
draft once; per question the workers take turns, in an order that alternates with the question, so that only
one computes at a time and machine noise hits both alike. Every question is decoded by plain decoding and by
EAGLE-3 with the auto tree (one policy per worker for the whole run; with --lookup N, prompt-lookup chains of up
to N tokens grafted on), greedy; MT-bench's second turn follows
each worker's own first answer. Reports, per suite and method: the median and geometric mean of per-question
speed ratios (after / before), the ratio of totals, and how many outputs are identical. Writes a JSON file with
every row and a Markdown summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKER = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from eagle3.runtimes.target import load_target
from eagle3.methods.drafter import load_drafter
from eagle3.fetch import shipped_draft
from eagle3.decoding.autotree import auto_tree
from eagle3.decoding.tree import TreeSpec
from eagle3.decoding.generate import generate
from eagle3.decoding.speculative import speculative_generate
try:
    from eagle3.runtimes.target import encode_messages
except ImportError:  # (older checkouts kept it in bench)
    from eagle3.evaluation.bench import encode_messages
target = load_target(sys.argv[2], runtime=sys.argv[3])
drafter = load_drafter(shipped_draft(sys.argv[2]), target)
tree = TreeSpec.parse("auto")
policy = auto_tree(target, drafter, tree)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    ask = json.loads(line)
    ids = encode_messages(target, ask["messages"])
    if ask["method"] == "vanilla":
        r = generate(target, ids, ask["max_new_tokens"])
    else:
        lookup = {"lookup": int(sys.argv[4])} if int(sys.argv[4]) else {}  # (older checkouts had no lookup)
        r = speculative_generate(target, drafter, ids, ask["max_new_tokens"], tree=tree, policy=policy, **lookup)
    print(json.dumps({"token_ids": r.token_ids, "text": r.text, "wall_s": r.wall_s,
                      "accept_lengths": getattr(r, "accept_lengths", [])}), flush=True)
"""

SUITES = "mt_bench,humaneval,gsm8k,alpaca,cnn_dm,natural_questions"
METHODS = ("vanilla", "eagle3")


class Worker:
    def __init__(self, name: str, checkout: Path, target: str, threads: int, runtime: str, lookup: int = 0):
        env = {**os.environ, "PYTHONPATH": str(checkout.resolve()), "OMP_NUM_THREADS": str(threads)}
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(threads), target, runtime, str(lookup)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd="/")  # fmt: skip
        assert json.loads(self.proc.stdout.readline())["ready"]

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def answer(worker: Worker, method: str, turns: list[str], max_new_tokens: int) -> dict:
    messages, token_ids, wall, lengths = [], [], 0.0, []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        out = worker.ask(method=method, messages=messages, max_new_tokens=max_new_tokens)
        messages.append({"role": "assistant", "content": out["text"]})
        token_ids += out["token_ids"]
        wall += out["wall_s"]
        lengths += out["accept_lengths"]
    return {"token_ids": token_ids, "wall_s": wall, "accept_lengths": lengths}


def summarize(rows: list[dict]) -> dict:
    out: dict = {}
    for method in METHODS:
        for suite in sorted({r["suite"] for r in rows}) + ["all"]:
            mine = [r for r in rows if r["method"] == method and suite in ("all", r["suite"])]
            ratios = [(len(r["after"]["token_ids"]) / r["after"]["wall_s"]) / (len(r["before"]["token_ids"]) / r["before"]["wall_s"])
                      for r in mine if r["after"]["wall_s"] > 0 and r["before"]["wall_s"] > 0 and r["before"]["token_ids"]]  # fmt: skip
            totals = [sum(len(r[k]["token_ids"]) for r in mine) / sum(r[k]["wall_s"] for r in mine) for k in ("before", "after")]
            out.setdefault(method, {})[suite] = {
                "n": len(mine), "median": statistics.median(ratios), "geomean": math.exp(statistics.fmean(map(math.log, ratios))),
                "total": totals[1] / totals[0], "before_tok_s": totals[0], "after_tok_s": totals[1],
                "identical": sum(r["before"]["token_ids"] == r["after"]["token_ids"] for r in mine),
            }  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, type=Path, help="checkout of the code before the change")
    parser.add_argument("--after", required=True, type=Path, help="checkout of the code after the change")
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--suites", default=SUITES)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runtime", default="torch", help="what runs the target in both checkouts (default torch)")
    parser.add_argument("--lookup", type=int, default=0, help="EAGLE-3 with prompt-lookup chains of up to N tokens")
    parser.add_argument("--out", type=Path, default=Path("runs/ab-engine"))
    args = parser.parse_args()

    sys.path.insert(0, str(args.after.resolve()))
    from eagle3.paths import shared_path
    from eagle3.evaluation.suites import load_suite

    questions = [q for s in args.suites.split(",") for q in load_suite(s, shared_path("data/eval"), args.limit)]
    workers = [Worker(name, checkout, args.target, args.threads, args.runtime, args.lookup)
               for name, checkout in (("before", args.before), ("after", args.after))]
    for w in workers:  # warm-up
        for method in METHODS:
            answer(w, method, [questions[0].turns[0]], 8)
    rows = []
    start = time.time()
    for i, q in enumerate(questions):
        for method in METHODS:
            pair = {}
            for w in (workers if i % 2 == 0 else workers[::-1]):
                pair[w.name] = answer(w, method, list(q.turns), args.max_new_tokens)
            rows.append({"suite": q.suite, "question_id": q.question_id, "method": method, **pair})
        print(f"{i + 1}/{len(questions)} questions, {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    for w in workers:
        w.close()
    summary = summarize(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ab.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                  "summary": summary, "rows": rows}, indent=1))  # fmt: skip
    suites = sorted({r["suite"] for r in rows}) + ["all"]
    lines = ["| method | " + " | ".join(suites) + " |", "|---" * (len(suites) + 1) + "|"]
    for method in METHODS:
        cells = [f"{summary[method][s]['median']:.3f} / {summary[method][s]['geomean']:.3f} / {summary[method][s]['total']:.3f}"
                 f" ({summary[method][s]['identical']}/{summary[method][s]['n']})" for s in suites]  # fmt: skip
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    report = "after / before speed: median / geometric mean of per-question ratios / ratio of totals (identical outputs)\n\n"
    report += "\n".join(lines) + "\n"
    (args.out / "ab.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
