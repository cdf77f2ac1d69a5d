"""The shipped SmolLM2 draft in OpenVINO GenAI's EAGLE-3 pipeline beside eagle3, on the same prompts: how often
each accepts the draft's tokens (which shows GenAI feeds the draft the layers it was trained on), whether
GenAI's answers equal eagle3's, and the decoding speed of each, plainly and with the draft.

    python benchmarks/openvino_genai_eagle3.py [--prompts 5] [--draft-max 3]

`eagle3 convert --to openvino` writes the target and the draft (fp32 IR); GenAI runs them with its
`LLMPipeline` on the CPU (f32 inference and KV cache, --threads), against eagle3's native runtime in fp32.
Both draft a chain of --draft-max tokens every round (GenAI's num_assistant_tokens), then a tree (--tree DEPTH,
BRANCHING,TOKENS: GenAI's tree_depth, branching_factor and num_assistant_tokens; eagle3's TreeSpec of as many
draft tokens, depth and top-k), greedy, MT-bench first turns through the chat template, --max-new-tokens each,
prompt by prompt in turns. Acceptance = accepted draft
tokens / drafted tokens (GenAI's own counts; eagle3's from its accept lengths with the fixed chain). Speeds are
decoding only: GenAI's time per output token after the first; eagle3's new tokens over its wall time less
the prefill. GenAI's plain decoding is timed twice: as its LLMPipeline runs by default, and on paged attention
(a SchedulerConfig), the backend its speculative pipeline runs on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from eagle3.methods.drafter import load_drafter
from eagle3.fetch import resolve_draft
from eagle3.decoding.generate import generate
from eagle3.formats.openvino_export import export_openvino
from eagle3.runtimes.openvino_runtime import own_signal_stack
from eagle3.decoding.speculative import speculative_generate
from eagle3.evaluation.suites import data_dir, read_suite
from eagle3.runtimes.target import load_target
from eagle3.decoding.tree import TreeSpec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--draft-max", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tree", default="5,3,12", help="DEPTH,BRANCHING,TOKENS of the tree run")
    args = p.parse_args()
    depth, branching, tree_tokens = (int(v) for v in args.tree.split(","))
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
    shapes = {"chain": TreeSpec(args.draft_max + 1, args.draft_max, 1), "tree": TreeSpec(tree_tokens + 1, depth, branching)}
    props = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "INFERENCE_NUM_THREADS": args.threads}
    totals = {f"{k} {shape}": 0 for k in ("ours_accepted", "theirs_accepted", "theirs_drafted", "spec_equal", "ours_rounds")
              for shape in shapes}  # fmt: skip
    totals["plain_equal"] = totals["paged_equal"] = 0
    runs = {"GenAI": ("plain", "plain-paged", *shapes), "eagle3": ("plain", *shapes)}
    speeds: dict[str, list[float]] = {f"{engine} {run}": [] for engine, names in runs.items() for run in names}
    # (own_signal_stack: GenAI's pipelines leave the thread a signal stack that dies with them; Ctrl-C would crash)
    with tempfile.TemporaryDirectory() as tmp, own_signal_stack():
        out = export_openvino(draft_dir, Path(tmp) / "ov", "smollm2-135m")
        plain_pipe = genai.LLMPipeline(str(out / "target"), "CPU", **props)
        # (its speculative pipeline runs on paged attention, its plain one by default does not: both are timed)
        paged_pipe = genai.LLMPipeline(str(out / "target"), "CPU", scheduler_config=genai.SchedulerConfig(), **props)
        spec_pipe = genai.LLMPipeline(str(out / "target"), "CPU", draft_model=genai.draft_model(str(out / "draft"), "CPU",
                                      **props), **props)  # fmt: skip
        for q in questions:
            ids = target.encode(q.turns[0], chat=True)
            plain = generate(target, ids, args.max_new_tokens)
            speeds["eagle3 plain"].append(plain.new_tokens / (plain.wall_s - plain.prefill_s))
            tensor = ov.Tensor(np.array([ids], dtype=np.int64))
            alone = plain_pipe.generate(tensor, genai_config(genai, args.max_new_tokens))
            speeds["GenAI plain"].append(1000.0 / alone.perf_metrics.get_tpot().mean)
            theirs_plain = list(alone.tokens[0])
            paged = paged_pipe.generate(tensor, genai_config(genai, args.max_new_tokens))
            speeds["GenAI plain-paged"].append(1000.0 / paged.perf_metrics.get_tpot().mean)
            totals["paged_equal"] += list(paged.tokens[0]) == theirs_plain
            totals["plain_equal"] += theirs_plain == list(plain.token_ids)
            for shape, spec in shapes.items():
                ours = speculative_generate(target, drafter, ids, args.max_new_tokens, tree=spec)
                assert ours.token_ids == plain.token_ids
                speeds[f"eagle3 {shape}"].append(ours.new_tokens / (ours.wall_s - ours.prefill_s))
                totals[f"ours_accepted {shape}"] += sum(a - 1 for a in ours.accept_lengths)
                totals[f"ours_rounds {shape}"] += len(ours.accept_lengths)
                cfg = genai_config(genai, args.max_new_tokens)
                if shape == "chain":
                    cfg.num_assistant_tokens = args.draft_max
                else:
                    cfg.tree_depth, cfg.branching_factor, cfg.num_assistant_tokens = depth, branching, tree_tokens
                run = spec_pipe.generate(tensor, cfg)
                speeds[f"GenAI {shape}"].append(1000.0 / run.perf_metrics.get_tpot().mean)
                metrics = run.extended_perf_metrics
                totals[f"theirs_accepted {shape}"] += metrics.get_num_accepted_tokens()
                totals[f"theirs_drafted {shape}"] += metrics.get_num_draft_tokens()
                totals[f"spec_equal {shape}"] += list(run.tokens[0]) == theirs_plain
            print(f"{q.question_id}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in speeds.items()) + " tok/s",
                  file=sys.stderr)  # fmt: skip
    n = len(questions)
    print(f"GenAI plain equals eagle3 plain on {totals['plain_equal']}/{n} prompts, and its paged plain on "
          f"{totals['paged_equal']}/{n}")
    median = {k: statistics.median(v) for k, v in speeds.items()}
    print("median tok/s: " + ", ".join(f"{k} {v:.1f}" for k, v in median.items()))
    for shape in shapes:
        accepted, rounds = totals[f"ours_accepted {shape}"], totals[f"ours_rounds {shape}"]
        ours = f"eagle3 tau {1 + accepted / max(rounds, 1):.2f}"
        if shape == "chain":  # (a chain drafts the same number of tokens every round)
            ours += f", {accepted / max(args.draft_max * rounds, 1):.1%} of {args.draft_max * rounds} drafted tokens accepted"
        theirs_accepted, theirs_drafted = totals[f"theirs_accepted {shape}"], totals[f"theirs_drafted {shape}"]
        print(f"{shape} ({shapes[shape]}): GenAI accepted {theirs_accepted / max(theirs_drafted, 1):.1%} of "
              f"{theirs_drafted} drafted tokens, its output equal to its plain output on "
              f"{totals[f'spec_equal {shape}']}/{n}; {ours}; over plain: GenAI "
              f"{median[f'GenAI {shape}'] / median['GenAI plain']:.2f}x (over its paged plain "
              f"{median[f'GenAI {shape}'] / median['GenAI plain-paged']:.2f}x), eagle3 "
              f"{median[f'eagle3 {shape}'] / median['eagle3 plain']:.2f}x")


def genai_config(genai, max_new_tokens: int):
    cfg = genai.GenerationConfig()
    cfg.max_new_tokens = max_new_tokens
    return cfg

if __name__ == "__main__":
    main()
