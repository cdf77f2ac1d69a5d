"""The shipped SmolLM2 draft in llama.cpp (`--spec-type draft-eagle3`) beside eagle3, on the same prompts: how
often each accepts the draft's tokens (which shows llama.cpp feeds the draft the layers it was trained on),
and llama.cpp's decoding speed with it.

    bash scripts/interop.sh --llama-cpp     # once: builds llama.cpp's speculative example
    EAGLE3_LLAMA_CPP=~/.cache/eagle3/peers/llama.cpp-bin python benchmarks/llama_cpp_eagle3.py [--prompts 5]

Both draft a chain of --draft-max tokens every round, greedy, MT-bench first turns through the chat template,
--max-new-tokens each. Acceptance = accepted draft tokens / drafted tokens (llama.cpp's own n_accept /
n_drafted; eagle3's from its accept lengths with the fixed chain). Also reports how many of llama.cpp's answers
equal eagle3's plain greedy answer (informational: llama.cpp's arithmetic differs).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from eagle3.fetch import resolve_draft, resolve_model
from eagle3.generate import generate
from eagle3.gguf_draft import export_gguf, llama_cpp_converter
from eagle3.drafter import load_drafter
from eagle3.speculative import speculative_generate
from eagle3.suites import data_dir, read_suite
from eagle3.target import load_target
from eagle3.tree import TreeSpec


def number(pattern: str, log: str) -> float:
    found = re.search(pattern, log)
    if not found:
        raise SystemExit(f"error: llama.cpp's output lacks {pattern!r}:\n{log[-1500:]}")
    return float(found.group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--draft-max", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    converter = llama_cpp_converter()
    binary = converter.parent / "build" / "bin" / "llama-speculative-simple"
    if not binary.is_file():
        raise SystemExit(f"error: {binary} is not built; run bash scripts/interop.sh --llama-cpp")
    target = load_target("smollm2-135m", runtime="native")
    draft_dir = resolve_draft("default", "smollm2-135m")
    questions = read_suite("mt_bench", data_dir(), args.prompts).questions[: args.prompts]
    with tempfile.TemporaryDirectory() as tmp:
        target_gguf, draft_gguf = Path(tmp) / "target.gguf", Path(tmp) / "draft.gguf"
        made = subprocess.run([sys.executable, str(converter), str(resolve_model("smollm2-135m")), "--outtype", "f32",
                               "--outfile", str(target_gguf)], capture_output=True, text=True)  # fmt: skip
        if made.returncode != 0:
            raise SystemExit(f"error: converting the target failed: {made.stderr[-500:]}")
        export_gguf(draft_dir, draft_gguf, "smollm2-135m")
        drafter = load_drafter(draft_dir, target)
        chain = TreeSpec(args.draft_max + 1, args.draft_max, 1)
        totals = {"ours_accepted": 0, "ours_drafted": 0, "theirs_accepted": 0, "theirs_drafted": 0, "equal": 0}
        speeds = []
        for q in questions:
            ids = target.encode(q.turns[0], chat=True)
            text = target.tokenizer.decode(ids)
            plain = generate(target, ids, args.max_new_tokens)
            ours = speculative_generate(target, drafter, ids, args.max_new_tokens, tree=chain)
            assert ours.token_ids == plain.token_ids
            totals["ours_accepted"] += sum(a - 1 for a in ours.accept_lengths)
            totals["ours_drafted"] += args.draft_max * len(ours.accept_lengths)
            run = subprocess.run([str(binary), "-m", str(target_gguf), "-md", str(draft_gguf), "--spec-type",
                                  "draft-eagle3", "-p", text, "-n", str(args.max_new_tokens), "--temp", "0", "-t",
                                  str(args.threads), "--draft-max", str(args.draft_max), "--draft-min",
                                  str(args.draft_max), "--draft-p-min", "0"], capture_output=True, text=True)  # fmt: skip
            log = run.stdout + run.stderr
            if run.returncode != 0:
                raise SystemExit(f"error: llama.cpp failed on {q.question_id}:\n{log[-1500:]}")
            totals["theirs_accepted"] += int(number(r"n_accept\s*=\s*(\d+)", log))
            totals["theirs_drafted"] += int(number(r"n_drafted\s*=\s*(\d+)", log))
            speeds.append(number(r"decoded\s+\d+ tokens in\s+[\d.]+ seconds, speed:\s+([\d.]+) t/s", log))
            totals["equal"] += plain.text.strip() in run.stdout
            print(f"{q.question_id}: eagle3 tau {ours.tau:.2f}; llama.cpp {speeds[-1]:.1f} tok/s", file=sys.stderr)
    ours_rate = totals["ours_accepted"] / max(totals["ours_drafted"], 1)
    theirs_rate = totals["theirs_accepted"] / max(totals["theirs_drafted"], 1)
    print(f"draft tokens accepted, chain of {args.draft_max}: eagle3 {ours_rate:.1%} ({totals['ours_accepted']}/"
          f"{totals['ours_drafted']}), llama.cpp {theirs_rate:.1%} ({totals['theirs_accepted']}/{totals['theirs_drafted']})")
    print(f"llama.cpp with the draft: median {sorted(speeds)[len(speeds) // 2]:.1f} tok/s over {len(speeds)} prompts; "
          f"its answer contains eagle3's plain answer on {totals['equal']}/{len(speeds)}")


if __name__ == "__main__":
    main()
