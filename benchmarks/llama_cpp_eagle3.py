"""The shipped SmolLM2 draft in llama.cpp (`--spec-type draft-eagle3`) beside eagle3, on the same prompts: how
often each accepts the draft's tokens (which shows llama.cpp feeds the draft the layers it was trained on),
and the decoding speed of each, plainly and with the draft (llama.cpp's `llama-completion` and
`llama-speculative-simple`, --threads each, GGUF F32 or Q8_0; eagle3's native runtime in fp32 or int8 weights,
--precision), prompt by prompt in turns.
Speeds are decoding only, after the prompt (llama.cpp's own "eval" / "decoded" figures; eagle3's new tokens
over its wall time less the prefill).

    bash scripts/interop.sh --llama-cpp     # once: builds llama.cpp's examples
    EAGLE3_LLAMA_CPP=~/.cache/eagle3/peers/llama.cpp-bin python benchmarks/llama_cpp_eagle3.py [--prompts 5]

Both draft a chain of --draft-max tokens every round, greedy, MT-bench first turns through the chat template,
--max-new-tokens each. Acceptance = accepted draft tokens / drafted tokens (llama.cpp's own n_accept /
n_drafted; eagle3's from its accept lengths with the fixed chain). Also reports how many of llama.cpp's answers
equal eagle3's plain greedy answer and agree with llama.cpp's own plain answer (informational: llama.cpp's
batched arithmetic differs from its one-token arithmetic).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from eagle3.fetch import resolve_draft
from eagle3.decoding.generate import generate
from eagle3.formats.gguf_export import export_gguf, export_target_gguf, llama_cpp_converter
from eagle3.methods.drafter import load_drafter
from eagle3.decoding.speculative import speculative_generate
from eagle3.evaluation.suites import data_dir, read_suite
from eagle3.runtimes.target import load_target
from eagle3.decoding.tree import TreeSpec


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
    p.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                   help="fp32: GGUF F32 against --runtime native; int8: GGUF Q8_0 against --runtime native-int8")
    args = p.parse_args()
    outtype, runtime = ("f32", "native") if args.precision == "fp32" else ("q8_0", "native-int8")
    torch.set_num_threads(args.threads)
    converter = llama_cpp_converter()
    binary = converter.parent / "build" / "bin" / "llama-speculative-simple"
    simple = binary.with_name("llama-completion")
    if not (binary.is_file() and simple.is_file()):
        raise SystemExit(f"error: {binary} or {simple} is not built; run bash scripts/interop.sh --llama-cpp")
    target = load_target("smollm2-135m", runtime=runtime)
    draft_dir = resolve_draft("default", "smollm2-135m")
    questions = read_suite("mt_bench", data_dir(), args.prompts).questions[: args.prompts]
    with tempfile.TemporaryDirectory() as tmp:
        target_gguf, draft_gguf = Path(tmp) / "target.gguf", Path(tmp) / "draft.gguf"
        export_target_gguf("smollm2-135m", target_gguf, outtype)
        export_gguf(draft_dir, draft_gguf, "smollm2-135m", outtype)
        drafter = load_drafter(draft_dir, target)
        chain = TreeSpec(args.draft_max + 1, args.draft_max, 1)
        totals = {"ours_accepted": 0, "ours_drafted": 0, "theirs_accepted": 0, "theirs_drafted": 0, "equal": 0,
                  "own_plain": 0}  # fmt: skip
        speeds: dict[str, list[float]] = {"llama.cpp plain": [], "llama.cpp EAGLE-3": [], "eagle3 plain": [],
                                           "eagle3 EAGLE-3": []}  # fmt: skip
        for q in questions:
            ids = target.encode(q.turns[0], chat=True)
            text = target.tokenizer.decode(ids)
            plain = generate(target, ids, args.max_new_tokens)
            ours = speculative_generate(target, drafter, ids, args.max_new_tokens, tree=chain)
            assert ours.token_ids == plain.token_ids
            speeds["eagle3 plain"].append(plain.new_tokens / (plain.wall_s - plain.prefill_s))
            speeds["eagle3 EAGLE-3"].append(ours.new_tokens / (ours.wall_s - ours.prefill_s))
            alone = subprocess.run([str(simple), "-m", str(target_gguf), "-p", text, "-n", str(args.max_new_tokens),
                                    "--temp", "0", "-t", str(args.threads), "-no-cnv"], capture_output=True, text=True,
                                   stdin=subprocess.DEVNULL)  # fmt: skip
            if alone.returncode != 0:
                raise SystemExit(f"error: llama-completion failed on {q.question_id}:\n{alone.stderr[-1500:]}")
            speeds["llama.cpp plain"].append(number(r"\beval time =[^\n]*?runs[^\n]*?([\d.]+) tokens per second",
                                                   alone.stderr))  # fmt: skip)
            totals["ours_accepted"] += sum(a - 1 for a in ours.accept_lengths)
            totals["ours_drafted"] += args.draft_max * len(ours.accept_lengths)
            run = subprocess.run([str(binary), "-m", str(target_gguf), "-md", str(draft_gguf), "--spec-type",
                                  "draft-eagle3", "-p", text, "-n", str(args.max_new_tokens), "--temp", "0", "-t",
                                  str(args.threads), "--spec-draft-n-max", str(args.draft_max), "--spec-draft-n-min",
                                  str(args.draft_max), "--spec-draft-p-min", "0"], capture_output=True, text=True)  # fmt: skip
            log = run.stdout + run.stderr
            if run.returncode != 0:
                raise SystemExit(f"error: llama.cpp failed on {q.question_id}:\n{log[-1500:]}")
            totals["theirs_accepted"] += int(number(r"n_accept\s*=\s*(\d+)", log))
            totals["theirs_drafted"] += int(number(r"n_drafted\s*=\s*(\d+)", log))
            speeds["llama.cpp EAGLE-3"].append(number(r"decoded\s+\d+ tokens in\s+[\d.]+ seconds, speed:\s+([\d.]+) t/s",
                                                     log))  # fmt: skip
            totals["equal"] += plain.text.strip() in run.stdout
            # Both print the prompt, differently (special tokens or not), then the answer: compared after the
            # prompt's last line (SmolLM2's chat template ends it "assistant"). The speculative example may run
            # a few tokens past -n.
            theirs, own = (out.rsplit("assistant\n", 1)[-1].strip() for out in (run.stdout, alone.stdout))
            totals["own_plain"] += theirs.startswith(own) or own.startswith(theirs)
            print(f"{q.question_id}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in speeds.items()) + " tok/s",
                  file=sys.stderr)  # fmt: skip
    ours_rate = totals["ours_accepted"] / max(totals["ours_drafted"], 1)
    theirs_rate = totals["theirs_accepted"] / max(totals["theirs_drafted"], 1)
    print(f"draft tokens accepted, chain of {args.draft_max}: eagle3 {ours_rate:.1%} ({totals['ours_accepted']}/"
          f"{totals['ours_drafted']}), llama.cpp {theirs_rate:.1%} ({totals['theirs_accepted']}/{totals['theirs_drafted']})")
    median = {k: statistics.median(v) for k, v in speeds.items()}
    print("median tok/s: " + ", ".join(f"{k} {v:.1f}" for k, v in median.items()))
    print(f"EAGLE-3 over plain: llama.cpp {median['llama.cpp EAGLE-3'] / median['llama.cpp plain']:.2f}x, eagle3 "
          f"{median['eagle3 EAGLE-3'] / median['eagle3 plain']:.2f}x (chain of {args.draft_max}); llama.cpp's EAGLE-3 "
          f"answer contains eagle3's plain answer on {totals['equal']}/{len(questions)} prompts and agrees with its own "
          f"plain answer (as far as both go) on {totals['own_plain']}/{len(questions)}")


if __name__ == "__main__":
    main()
