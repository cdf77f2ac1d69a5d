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


def source_checkout() -> Path | None:
    """The source checkout eagle3 runs from, or None for an installed (non-editable) package."""
    return REPO_ROOT if (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "eagle3").is_dir() else None


def shared_dir() -> Path:
    """The shared data folder: $EAGLE3_SHARED, else ../shared beside the source checkout, else a clear error."""
    env = os.environ.get("EAGLE3_SHARED")
    if env:
        path = Path(env).expanduser()
        if path.is_dir():
            return path.resolve()
        raise MissingSharedData(f"EAGLE3_SHARED={env} is not a folder; point it at the shared data folder")
    checkout = source_checkout()
    if checkout is not None and (checkout.parent / "shared").is_dir():
        return (checkout.parent / "shared").resolve()
    where = f"../shared beside the checkout ({checkout.parent / 'shared'}) is absent" if checkout else (
        "eagle3 is installed as a package, with no checkout beside it")  # fmt: skip
    raise MissingSharedData(f"the shared data folder was not found: EAGLE3_SHARED is not set and {where}; set "
                            "EAGLE3_SHARED to the folder")  # fmt: skip


def shared_path(relative: str) -> Path:
    """A file or folder inside the shared data folder, with a clear error when it is missing."""
    path = shared_dir() / relative
    if not path.exists():
        raise MissingSharedData(f"{relative} is missing from the shared data folder {shared_dir()}")
    return path
