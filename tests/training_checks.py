"""What the training tests of every method share: a tiny conversation file, the exact-resume check, and the
learning check on a run's log."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from eagle3.training.train import TrainConfig, train


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


PROMPTS = ("Once upon a time", "The little dog", "One day, Tom")


def assert_decodes_losslessly(stories, drafter, trees, method: str, min_tau: float) -> None:
    """Greedy speculative output equals plain decoding's for PROMPTS on every tree, and the drafted rounds
    accept on average more than min_tau - 1 draft tokens (a trained draft gets tokens accepted)."""
    from eagle3.decoding.generate import generate
    from eagle3.decoding.speculative import speculative_generate

    accepted = []
    for tree in trees:
        for text in PROMPTS:
            prompt = stories.encode(text)
            out = speculative_generate(stories, drafter, prompt, 48, tree=tree, method=method)
            assert out.token_ids == generate(stories, prompt, 48).token_ids, (text, tree)
            accepted += out.accept_lengths
    assert sum(accepted) / len(accepted) > min_tau


def assert_batched_and_sampled_exactly(stories, drafter, tree) -> None:
    """Rows decoded together equal each decoded alone, and sampled triples follow the target's distribution."""
    from eagle3.decoding.engine import Engine, Request
    from eagle3.decoding.generate import generate
    from eagle3.decoding.sampling import SamplingParams
    from test_sampling_exact import ALPHA, N_LOOP, PARAMS, chi_square_p_value, exact_triples, speculative_triples

    prompts = [stories.encode(text) for text in PROMPTS]
    engine = Engine(stories, drafter, tree, max_rows=2)
    assert [r.token_ids for r in engine.run([Request(p, 40) for p in prompts])] == [
        generate(stories, p, 40).token_ids for p in prompts]  # fmt: skip
    prompt = stories.encode("One day, Tom")
    table = exact_triples(stories, prompt, SamplingParams(**PARAMS))
    assert chi_square_p_value(speculative_triples(stories, drafter, prompt, PARAMS, N_LOOP), table) > ALPHA
