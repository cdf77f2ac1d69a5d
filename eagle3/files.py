"""Files on disk, written so that nothing is lost or torn, and text read by one documented rule.

Writes: a file or folder is built under a temp name beside its final path and renamed into place, so a reader
sees the old version or the whole new one, never half of one. Temp names carry the writer's process id, so the
next writer to the same path removes the temps of writers that are gone (an interrupted run leaves nothing
behind for long) and never those of one still running.

Reads: text files (training data, benchmark suites, prompt files) are UTF-8; a byte sequence that is not valid
UTF-8 is replaced by U+FFFD and counted, never fatal, and a leading byte-order mark is dropped.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TEMP_MARK = ".tmp-"


def temp_path(path: Path) -> Path:
    """A fresh temp name beside path, marked with this process's id."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Removes temps beside path left by writers that are no longer running; returns what it removed."""
    removed = []
    for temp in path.parent.glob(f".{path.name}{TEMP_MARK}*"):
        pid_text = temp.name.rsplit(TEMP_MARK, 1)[1].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        if temp.is_dir() and not temp.is_symlink():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)
        removed.append(temp)
    return removed


@contextmanager
def atomic_path(path: str | Path, folder: bool = False) -> Iterator[Path]:
    """Yields a temp path to write (a file, or with folder=True an empty folder); on success it replaces path
    (a folder may replace only an empty one), on failure it is removed and path is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    temp = temp_path(path)
    if folder:
        temp.mkdir()
    try:
        yield temp
        os.replace(temp, path)
    finally:
        if temp.is_dir() and not temp.is_symlink():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Writes a text file atomically (UTF-8)."""
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")


def read_text(path: str | Path) -> tuple[str, int]:
    """(text, number of undecodable byte sequences replaced by U+FFFD) of a UTF-8 file."""
    data = Path(path).read_bytes()
    text = data.decode("utf-8-sig", errors="replace")
    replaced = text.count("\ufffd") - data.decode("utf-8-sig", errors="ignore").count("\ufffd")
    return text, replaced


def end_torn_line(path: Path) -> None:
    """Ends a JSONL file's torn last line (a writer killed mid-line), so that the next appended record starts
    on a line of its own; readers skip the torn one."""
    if path.is_file() and path.stat().st_size:
        with path.open("rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def read_json_object(path: str | Path) -> dict:
    """A JSON file holding an object (a config), with a one-line error naming the file when it is not one."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} is not a JSON object")
    return value
