"""Plain greedy decoding: eagle3's native runtime against transformers `generate`, side by side in one run.

Both decode the same chat-templated MT-bench first turns with the same token budget and stop tokens; the
order of the two alternates per prompt so machine noise hits both alike. Prints a table and writes JSON.

    python benchmarks/plain_decoding.py --target smollm2-135m --prompts 10 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from eagle3.decoding.generate import generate
from eagle3.paths import shared_path
from eagle3.runtimes.target import load_target


def mt_bench_prompts(limit: int) -> list[str]:
    rows = [json.loads(line) for line in shared_path("data/eval/mt_bench.jsonl").read_text().splitlines() if line]
    return [row["turns"][0] for row in rows[:limit]]


def hf_generate(hf, prompt_ids: list[int], max_new_tokens: int, eos: list[int]) -> tuple[list[int], float]:
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
            pad_token_id=eos[0],
        )
    return out[0, len(prompt_ids):].tolist(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the per-prompt rows and summary as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    target = load_target(args.target, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(target.path, dtype=torch.float32).eval()
    eos = sorted(target.eos_token_ids)
    prompts = [target.encode(p, chat=True) for p in mt_bench_prompts(args.prompts)]

    # Warm-up both (first calls pay for allocations and kernel selection).
    generate(target, prompts[0], 16)
    hf_generate(hf, prompts[0], 16, eos)

    rows = []
    for i, ids in enumerate(tqdm(prompts, desc="prompts")):
        runs = {}
        for method in (["eagle3", "hf"] if i % 2 == 0 else ["hf", "eagle3"]):
            if method == "eagle3":
                r = generate(target, ids, args.max_new_tokens)
                runs[method] = (r.token_ids, r.wall_s)
            else:
                runs[method] = hf_generate(hf, ids, args.max_new_tokens, eos)
        (ours, t_ours), (ref, t_ref) = runs["eagle3"], runs["hf"]
        rows.append({"prompt": i, "prompt_tokens": len(ids), "new_tokens": len(ours), "hf_new_tokens": len(ref),
                     "eagle3_s": t_ours, "hf_s": t_ref, "identical": ours == ref})

    tokens = sum(r["new_tokens"] for r in rows)
    hf_tokens = sum(r["hf_new_tokens"] for r in rows)
    ours_tps = tokens / sum(r["eagle3_s"] for r in rows)
    hf_tps = hf_tokens / sum(r["hf_s"] for r in rows)
    summary = {
        "target": args.target, "prompts": len(rows), "max_new_tokens": args.max_new_tokens, "threads": args.threads,
        "eagle3_tokens_per_s": ours_tps, "hf_tokens_per_s": hf_tps, "speedup": ours_tps / hf_tps,
        "identical": sum(r["identical"] for r in rows), "torch": torch.__version__, "machine": platform.machine(),
    }
    print(f"\nplain greedy decoding, {args.target}, {len(rows)} MT-bench prompts, {args.max_new_tokens} new tokens max,"
          f" {args.threads} threads")
    print(f"| runtime | tokens/s |\n|---|---|\n| transformers generate | {hf_tps:.1f} |\n| eagle3 native | {ours_tps:.1f} |")
    print(f"speed-up: {summary['speedup']:.2f}x; identical outputs: {summary['identical']}/{len(rows)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
