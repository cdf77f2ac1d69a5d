"""The first-turn prompt mix behind the shipped SmolLM2 draft (eagle3/drafts/smollm2-135m/README.md, stages 2 and 3).

Run from the repository root, then let the target answer the prompts:
    .venv/bin/python scripts/regen_prompts.py [--more N]
    eagle3 regenerate --data runs/regen/prompts.jsonl --out runs/regen/answers.jsonl --max-new-tokens 128 --batch-size 16
"""

import argparse
import json
import random
import sys
from pathlib import Path

from eagle3.training.data import read_conversations, sharegpt_path

SHARED_TRAIN = Path("../shared/data/train")


def first_turns(path: Path, rng: random.Random, max_chars: int = 2000) -> list[list[dict]]:
    """All conversations cut after their first user turn and its answer (prompts up to max_chars), shuffled."""
    out = []
    for messages in read_conversations([path])[0]:
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users or not messages[users[0]]["content"].strip() or len(messages[users[0]]["content"]) > max_chars:
            continue
        i = users[0]
        if i + 1 < len(messages) and messages[i + 1]["role"] == "assistant":
            out.append(messages[: i + 2])
    rng.shuffle(out)
    print(f"{path}: {len(out)} first turns", file=sys.stderr)
    return out


# (source, share of the mix): 2000 prompts take 1400, 250, 250 and 100.
SOURCES = [(None, 0.70), ("gpteacher_codegen.json", 0.125), ("gsm8k_train.jsonl", 0.125),
           ("gpteacher_roleplay.json", 0.05)]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--more", type=int, default=0, help="extra prompts after the first 2000, in the same shares "
                   "(the first 2000 stay the same, so a regeneration run resumes)")  # fmt: skip
    args = p.parse_args()
    if not SHARED_TRAIN.is_dir():
        sys.exit(f"missing {SHARED_TRAIN}: the training sets live in ../shared beside the repository")
    rng = random.Random(0)
    pools = [first_turns(sharegpt_path() if name is None else SHARED_TRAIN / name, rng) for name, _ in SOURCES]
    base = [round(2000 * share) for _, share in SOURCES]
    mix = [m for pool, n in zip(pools, base) for m in pool[:n]]
    rng.shuffle(mix)
    more = [m for pool, n, (_, share) in zip(pools, base, SOURCES) for m in pool[n : n + round(args.more * share)]]
    rng.shuffle(more)
    mix += more
    out = Path("runs/regen/prompts.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"messages": m}) + "\n" for m in mix))
    print(f"wrote {len(mix)} prompts to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
