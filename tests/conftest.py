import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K" / "hf"


@pytest.fixture(scope="session")
def stories_path() -> Path:
    if not STORIES.is_dir():
        pytest.fail(f"stories260K is missing at {STORIES}: the tests need ../shared beside the repository")
    return STORIES


@pytest.fixture(scope="session")
def stories(stories_path):
    from eagle3.target import load_target

    return load_target(str(stories_path), device="cpu")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from eagle3.fetch import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    from eagle3.target import load_target

    return load_target(str(smollm2_path), device="cpu")
