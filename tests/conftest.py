import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture(scope="session")
def stories_path() -> Path:
    """stories260K from the shared data folder ($EAGLE3_SHARED, else ../shared beside the checkout)."""
    from eagle3.paths import MissingSharedData, shared_dir

    try:
        stories = shared_dir() / "models" / "stories260K" / "hf"
    except MissingSharedData as err:
        pytest.fail(f"the tests need the shared data folder: {err}")
    if not stories.is_dir():
        pytest.fail(f"stories260K is missing at {stories}: the shared data folder is incomplete")
    return stories


@pytest.fixture(scope="session")
def stories(stories_path):
    from eagle3.runtimes.target import load_target

    return load_target(str(stories_path), device="cpu")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from eagle3.fetch import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    from eagle3.runtimes.target import load_target

    return load_target(str(smollm2_path), device="cpu")


TRAIN_PROMPTS = ["Once upon a time", "Tom and Lily", "One day, a little", "The cat", "Sara had a", "The sun was",
                 "Ben wanted to", "There was a big"]  # fmt: skip


@pytest.fixture(scope="session")
def examples(stories):
    """Training text stories260K wrote itself (the drafts are trained on target-generated answers)."""
    from eagle3.training.data import tokenize_text
    from eagle3.decoding.generate import generate
    from eagle3.decoding.sampling import SamplingParams

    texts = []
    for i, prompt in enumerate(TRAIN_PROMPTS * 2):
        out = generate(stories, stories.encode(prompt), 60, SamplingParams(temperature=0.8, seed=i))
        texts.append(prompt + stories.tokenizer.decode(out.token_ids, skip_special_tokens=True))
    return [tokenize_text(stories.tokenizer, t) for t in texts]
