"""The shipped SmolLM2 draft in OpenVINO GenAI's EAGLE-3 pipeline beside eagle3, on the same prompts: how often
each accepts the draft's tokens (which shows GenAI feeds the draft the layers it was trained on), whether
GenAI's answers equal eagle3's, and the decoding speed of each, plainly and with the draft.

    python benchmarks/openvino_genai_eagle3.py [--prompts 5] [--draft-max 3]

`eagle3 convert --to openvino` writes the target and the draft (fp32 IR); GenAI runs them with its
`LLMPipeline` on the CPU (f32 inference and KV cache, --threads), against eagle3's native runtime in fp32.
Both draft a chain of --draft-max tokens every round (GenAI's num_assistant_tokens), greedy, MT-bench first
turns through the chat template, --max-new-tokens each, prompt by prompt in turns. Acceptance = accepted draft
tokens / drafted tokens (GenAI's own counts; eagle3's from its accept lengths with the fixed chain). Speeds are
decoding only: GenAI's time per output token after the first; eagle3's new tokens over its wall time less
the prefill.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from eagle3.drafter import load_drafter
from eagle3.fetch import resolve_draft
from eagle3.generate import generate
from eagle3.openvino_export import export_openvino
from eagle3.speculative import speculative_generate
from eagle3.suites import data_dir, read_suite
from eagle3.target import load_target
from eagle3.tree import TreeSpec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--draft-max", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    try:
        import openvino as ov
        import openvino_genai as genai
    except ImportError:
        raise SystemExit("error: this benchmark needs openvino-genai (pip install openvino-genai)") from None
    torch.set_num_threads(args.threads)
    target = load_target("smollm2-135m", runtime="native")
    draft_dir = resolve_draft("default", "smollm2-135m")
    drafter = load_drafter(draft_dir, target)
    questions = read_suite("mt_bench", data_dir(), args.prompts).questions[: args.prompts]
    chain = TreeSpec(args.draft_max + 1, args.draft_max, 1)
    props = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "INFERENCE_NUM_THREADS": args.threads}
    totals = {"ours_accepted": 0, "ours_drafted": 0, "theirs_accepted": 0, "theirs_drafted": 0, "plain_equal": 0,
              "spec_equal": 0}  # fmt: skip
    speeds: dict[str, list[float]] = {"GenAI plain": [], "GenAI EAGLE-3": [], "eagle3 plain": [], "eagle3 EAGLE-3": []}
    with tempfile.TemporaryDirectory() as tmp:
        out = export_openvino(draft_dir, Path(tmp) / "ov", "smollm2-135m")
        plain_pipe = genai.LLMPipeline(str(out / "target"), "CPU", **props)
        spec_pipe = genai.LLMPipeline(str(out / "target"), "CPU", draft_model=genai.draft_model(str(out / "draft"), "CPU",
                                      **props), **props)  # fmt: skip
        for q in questions:
            ids = target.encode(q.turns[0], chat=True)
            plain = generate(target, ids, args.max_new_tokens)
            ours = speculative_generate(target, drafter, ids, args.max_new_tokens, tree=chain)
            assert ours.token_ids == plain.token_ids
            speeds["eagle3 plain"].append(plain.new_tokens / (plain.wall_s - plain.prefill_s))
            speeds["eagle3 EAGLE-3"].append(ours.new_tokens / (ours.wall_s - ours.prefill_s))
            totals["ours_accepted"] += sum(a - 1 for a in ours.accept_lengths)
            totals["ours_drafted"] += args.draft_max * len(ours.accept_lengths)

            cfg = genai.GenerationConfig()
            cfg.max_new_tokens, cfg.ignore_eos = args.max_new_tokens, False
            tensor = ov.Tensor(np.array([ids], dtype=np.int64))
            alone = plain_pipe.generate(tensor, cfg)
            cfg.num_assistant_tokens = args.draft_max
            run = spec_pipe.generate(tensor, cfg)
            speeds["GenAI plain"].append(1000.0 / alone.perf_metrics.get_tpot().mean)
            speeds["GenAI EAGLE-3"].append(1000.0 / run.perf_metrics.get_tpot().mean)
            metrics = run.extended_perf_metrics
            totals["theirs_accepted"] += metrics.get_num_accepted_tokens()
            totals["theirs_drafted"] += metrics.get_num_draft_tokens()
            theirs_plain, theirs_spec = list(alone.tokens[0]), list(run.tokens[0])
            totals["plain_equal"] += theirs_plain == list(plain.token_ids)
            totals["spec_equal"] += theirs_spec == theirs_plain
            print(f"{q.question_id}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in speeds.items()) + " tok/s",
                  file=sys.stderr)  # fmt: skip
    ours_rate = totals["ours_accepted"] / max(totals["ours_drafted"], 1)
    theirs_rate = totals["theirs_accepted"] / max(totals["theirs_drafted"], 1)
    n = len(questions)
    print(f"draft tokens accepted, chain of {args.draft_max}: eagle3 {ours_rate:.1%} ({totals['ours_accepted']}/"
          f"{totals['ours_drafted']}), GenAI {theirs_rate:.1%} ({totals['theirs_accepted']}/{totals['theirs_drafted']})")
    print(f"GenAI plain equals eagle3 plain on {totals['plain_equal']}/{n} prompts; GenAI EAGLE-3 equals GenAI plain "
          f"on {totals['spec_equal']}/{n}")
    median = {k: statistics.median(v) for k, v in speeds.items()}
    print("median tok/s: " + ", ".join(f"{k} {v:.1f}" for k, v in median.items()))
    print(f"EAGLE-3 over plain: GenAI {median['GenAI EAGLE-3'] / median['GenAI plain']:.2f}x, eagle3 "
          f"{median['eagle3 EAGLE-3'] / median['eagle3 plain']:.2f}x (chain of {args.draft_max})")


if __name__ == "__main__":
    main()
