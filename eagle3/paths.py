"""Where things live on disk: the eagle3 cache and the shared data folder beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class MissingSharedData(FileNotFoundError):
    """../shared (or $EAGLE3_SHARED) is absent or lacks the file asked for."""


def eagle3_home() -> Path:
    """The cache root: $EAGLE3_HOME, default ~/.cache/eagle3."""
    return Path(os.environ.get("EAGLE3_HOME", Path.home() / ".cache" / "eagle3")).expanduser()


def shared_dir() -> Path:
    """The shared data folder: $EAGLE3_SHARED, else ../shared beside the repository, else ../shared from the cwd."""
    env = os.environ.get("EAGLE3_SHARED")
    candidates = [Path(env)] if env else [REPO_ROOT.parent / "shared", Path.cwd().parent / "shared"]
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    raise MissingSharedData(
        "the shared data folder was not found (looked at: "
        + ", ".join(str(p) for p in candidates)
        + "); place it beside the repository as ../shared or set EAGLE3_SHARED"
    )


def shared_path(relative: str) -> Path:
    """A file or folder inside the shared data folder, with a clear error when it is missing."""
    path = shared_dir() / relative
    if not path.exists():
        raise MissingSharedData(f"{relative} is missing from the shared data folder {shared_dir()}")
    return path
