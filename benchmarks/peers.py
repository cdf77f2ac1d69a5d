"""eagle3's runtimes and precisions side by side in one run, on the same prompts: plain decoding and EAGLE-3
(the shipped draft, auto tree) on the PyTorch runtime, on eagle3's native kernels in fp32 and int8 and on OpenVINO
fp32 and int8, with transformers' `generate` as the outside reference.

    python benchmarks/peers.py [--limit 5] [--max-new-tokens 128] [--out runs/peers]

Every engine decodes each prompt in turn (the order rotates with the prompt), greedy, through the chat template,
so machine noise hits them alike. Reports the median tokens/s per engine, its ratio to eagle3's PyTorch plain
decoding, EAGLE-3 over plain decoding per runtime, whether EAGLE-3's outputs equal plain decoding's on the same
runtime (they must), and the resident memory each runtime's target added when loaded (RSS growth, in load
order). llama.cpp and OpenVINO GenAI are not run by this script yet (partial: issue 16 asks for them when
installed). Writes rows.json and summary.md under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

RUNTIMES = ("torch", "native", "native-int8", "openvino", "openvino-int8")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    from eagle3.autotree import auto_tree
    from eagle3.drafter import load_drafter
    from eagle3.engine import Engine, Request
    from eagle3.fetch import shipped_draft
    from eagle3.suites import data_dir, load_suite
    from eagle3.target import load_target
    from eagle3.tree import TreeSpec

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=5, help="MT-bench first turns")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--out", default="runs/peers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    questions = load_suite("mt_bench", data_dir(), args.limit)
    engines: dict[str, object] = {}
    memory: dict[str, float] = {}
    targets = {}
    for runtime in args.runtimes.split(","):
        before = rss_mb()
        target = load_target(args.target, runtime=runtime)
        drafter = load_drafter(shipped_draft(args.target), target)
        tree = TreeSpec.parse("auto")
        engines[f"{runtime} plain"] = Engine(target, method="vanilla")
        engines[f"{runtime} eagle3"] = Engine(target, drafter, tree, auto_tree(target, drafter, tree))
        engines[f"{runtime} plain"].run([Request(target.encode("Hello", chat=True), 8)])  # compile, warm up
        memory[runtime] = rss_mb() - before
        targets[runtime] = target
    any_target = next(iter(targets.values()))
    prompts = [any_target.encode(q.turns[0], chat=True) for q in questions]
    hf = None
    if not args.no_transformers:
        from transformers import AutoModelForCausalLM

        before = rss_mb()
        hf = AutoModelForCausalLM.from_pretrained(any_target.path, dtype=torch.float32).eval()
        memory["transformers"] = rss_mb() - before

    names = list(engines) + (["transformers"] if hf is not None else [])
    rows = []
    for i, prompt in enumerate(prompts):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            if name == "transformers":
                start = time.perf_counter()
                with torch.inference_mode():
                    ids = hf.generate(torch.tensor([prompt]), max_new_tokens=args.max_new_tokens, do_sample=False)
                wall = time.perf_counter() - start
                tokens = ids[0, len(prompt):].tolist()
                tau = None
            else:
                r = engines[name].run([Request(prompt, args.max_new_tokens)])[0]
                tokens, wall, tau = r.token_ids, r.wall_s, getattr(r, "tau", None)
            rows.append({"prompt": i, "engine": name, "tokens": len(tokens), "wall_s": wall, "tok_s": len(tokens) / wall,
                         "tau": tau, "token_ids": tokens})  # fmt: skip
            print(f"prompt {i} {name:22s} {len(tokens) / wall:6.1f} tok/s", flush=True)

    speed = {n: statistics.median(r["tok_s"] for r in rows if r["engine"] == n) for n in names}
    base = speed.get("torch plain") or next(iter(speed.values()))
    lines = [f"# Runtimes side by side ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             f"{args.target}, {args.threads} threads, greedy, the first {len(prompts)} MT-bench turns through the chat "
             f"template, {args.max_new_tokens} new tokens; engines take turns per prompt.", "",
             "| engine | median tok/s | vs torch plain | EAGLE-3 / plain | tau | outputs = plain | RSS added (MB) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    by = {(r["engine"], r["prompt"]): r for r in rows}
    for n in names:
        runtime = n.split()[0]
        ratio = same = tau = ""
        if n.endswith("eagle3"):
            plain = f"{runtime} plain"
            ratio = f"{statistics.median(by[(n, i)]['tok_s'] / by[(plain, i)]['tok_s'] for i in range(len(prompts))):.2f}x"
            same = f"{sum(by[(n, i)]['token_ids'] == by[(plain, i)]['token_ids'] for i in range(len(prompts)))}/{len(prompts)}"
            taus = [by[(n, i)]["tau"] for i in range(len(prompts)) if by[(n, i)]["tau"]]
            tau = f"{statistics.mean(taus):.2f}" if taus else ""
        mem = f"{memory[runtime if n != 'transformers' else 'transformers']:.0f}" if not n.endswith("eagle3") else ""
        lines.append(f"| {n} | {speed[n]:.1f} | {speed[n] / base:.2f}x | {ratio} | {tau} | {same} | {mem} |")
    lines += ["", "EAGLE-3 / plain is the median of per-prompt ratios on the same runtime. RSS added: the process's "
              "resident memory growth while that runtime's target (and draft) loaded and warmed up, in load order.",
              "llama.cpp and OpenVINO GenAI: not run by this script yet."]  # fmt: skip
    (out / "rows.json").write_text(json.dumps(rows))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
