"""What the training tests of every method share: a tiny conversation file, the exact-resume check, and the
learning check on a run's log."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from eagle3.train import TrainConfig, train


def story_conversations(path: Path, words=("dog", "cat", "girl", "boy", "bird", "fish")) -> Path:
    """A ShareGPT-style JSONL of one short story turn per word."""
    rows = [{"conversations": [{"from": "human", "value": "Tell me a story."},
                               {"from": "gpt", "value": f"Once upon a time, there was a little {w}. It was happy."}]}
            for w in words]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def assert_resumes_exactly(stories, examples, tmp_path: Path, cfg: TrainConfig) -> None:
    """6 steps straight and 3 + 3 resumed end with the same weights."""
    cfg = dataclasses.replace(cfg, steps=6, save_every=3)
    straight, _ = train(stories, examples, tmp_path / "straight", cfg, progress=False)
    train(stories, examples, tmp_path / "resumed", dataclasses.replace(cfg, steps=3), progress=False)
    resumed, state = train(stories, examples, tmp_path / "resumed", cfg, resume=True, progress=False)
    assert state.step == 6
    for key, value in straight.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[key], atol=1e-6), key


def assert_loss_fell(state, factor: float) -> None:
    """The mean first-step loss of the last 5 logged steps is under factor x that of the first 5."""
    first = sum(r["loss0"] for r in state.log[:5]) / 5
    last = sum(r["loss0"] for r in state.log[-5:]) / 5
    assert last < factor * first, (first, last)
