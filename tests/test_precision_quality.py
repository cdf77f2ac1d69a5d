"""benchmarks/precision_quality.py: teacher-forced predictions through a runtime's prefill and chain verify."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from eagle3.runtimes import native
from eagle3.decoding.generate import generate
from eagle3.runtimes.target import load_target

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "precision_quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("precision_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("runtime", ["torch", "native-w8a8"])
def test_teacher_forced_predictions_follow_the_runtimes_own_greedy_answer(quality, stories_path, runtime):
    """Fed its own greedy answer, a runtime predicts every answer token as its argmax: the predictions line up
    with the answer (the prefill's last position, then the chain's nodes), one row of log-probabilities each."""
    if runtime.startswith("native") and native.library() is None:
        pytest.skip(f"eagle3's native kernels are unavailable here: {native.why_unavailable()}")
    target = load_target(str(stories_path), runtime=runtime)
    prompt = target.encode("Once upon a time")
    answer = generate(target, prompt, 24).token_ids
    logp = quality.predictions(target, prompt, answer)
    assert logp.shape == (len(answer), target.model.config.vocab_size)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(len(answer)), atol=1e-4)
    assert logp.argmax(-1).tolist() == answer
    shifted = quality.predictions(target, prompt, [answer[0], *answer[2:]])  # (a wrong token: no longer its own)
    assert shifted.argmax(-1).tolist() != [answer[0], *answer[2:]]
