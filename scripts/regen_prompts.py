"""The first-turn prompt mix behind the shipped SmolLM2 draft (README, "The shipped draft", stage 2).

Run from the repository root, then let the target answer the prompts:
    .venv/bin/python scripts/regen_prompts.py
    eagle3 regenerate --data runs/regen/prompts.jsonl --out runs/regen/answers.jsonl --max-new-tokens 128 --batch-size 16
"""

import json
import random
import sys
from pathlib import Path

from eagle3.data import read_conversations, sharegpt_path

SHARED_TRAIN = Path("../shared/data/train")


def first_turns(path: Path, n: int, rng: random.Random, max_chars: int = 2000) -> list[list[dict]]:
    """n random conversations cut after their first user turn and its answer (prompts up to max_chars)."""
    out = []
    for messages in read_conversations([path])[0]:
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users or not messages[users[0]]["content"].strip() or len(messages[users[0]]["content"]) > max_chars:
            continue
        i = users[0]
        if i + 1 < len(messages) and messages[i + 1]["role"] == "assistant":
            out.append(messages[: i + 2])
    rng.shuffle(out)
    print(f"{path}: {len(out)} first turns, taking {n}", file=sys.stderr)
    return out[:n]


def main() -> None:
    if not SHARED_TRAIN.is_dir():
        sys.exit(f"missing {SHARED_TRAIN}: the training sets live in ../shared beside the repository")
    rng = random.Random(0)
    mix = (first_turns(sharegpt_path(), 1400, rng) + first_turns(SHARED_TRAIN / "gpteacher_codegen.json", 250, rng)
           + first_turns(SHARED_TRAIN / "gsm8k_train.jsonl", 250, rng)
           + first_turns(SHARED_TRAIN / "gpteacher_roleplay.json", 100, rng))  # fmt: skip
    rng.shuffle(mix)
    out = Path("runs/regen/prompts.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"messages": m}) + "\n" for m in mix))
    print(f"wrote {len(mix)} prompts to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
