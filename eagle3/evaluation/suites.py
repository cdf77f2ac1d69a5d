"""Benchmark suites: the prompts of the EAGLE-3 paper's evaluation and Spec-Bench, read from JSONL files
(FastChat format: question_id, category, turns) in ../shared/data/eval, --data-dir or $EAGLE3_DATA.

Files are read by the project's rule for text (files.read_text: UTF-8, undecodable bytes replaced and
counted); a malformed row is skipped and counted, with a warning, so one bad line never stops a benchmark."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from eagle3.files import read_text
from eagle3.paths import MissingSharedData, shared_path

EAGLE_SUITES = ("mt_bench", "humaneval", "gsm8k", "alpaca", "cnn_dm", "natural_questions")
SPEC_BENCH_CATEGORIES = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
SUITES = EAGLE_SUITES + ("spec_bench",)


@dataclass(frozen=True)
class Question:
    suite: str  # e.g. "gsm8k" or "spec_bench/translation" (Spec-Bench's categories are reported separately)
    question_id: str
    turns: tuple[str, ...]  # user turns; MT-bench has two


def data_dir(override: str | None = None) -> Path:
    """--data-dir, else $EAGLE3_DATA, else ../shared/data/eval."""
    chosen = override or os.environ.get("EAGLE3_DATA")
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_dir():
            raise MissingSharedData(f"benchmark data folder {path} does not exist")
        return path
    return shared_path("data/eval")


def parse_suites(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SUITES]
    if unknown or not names:
        raise ValueError(f"unknown suite(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SUITES)}")
    return names


def _spec_bench_category(category: str | None) -> str:
    # Spec-Bench's first 80 questions are MT-bench's, tagged with MT-bench's own 8 categories.
    return category if category in SPEC_BENCH_CATEGORIES else "mt_bench"


@dataclass(frozen=True)
class SuiteFile:
    """One suite file as read: its questions, and the rows that could not be read (skipped, never fatal)."""

    path: Path
    questions: list[Question]
    malformed: int = 0  # rows skipped: not JSON, no turns, turns not a non-empty list of non-empty strings
    first_malformed: str = ""  # "line N: why", for the warning
    replaced: int = 0  # undecodable byte sequences read as U+FFFD (files.read_text)


def _parse_row(line: str) -> tuple[dict | None, str]:
    """(the row, "") for a FastChat question, else (None, why not)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None, "not JSON"
    if not isinstance(row, dict):
        return None, "not a JSON object"
    turns = row.get("turns")
    if turns is None:
        return None, "no turns"
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        return None, "turns is not a non-empty list of strings"
    if not all(t.strip() for t in turns):
        return None, "an empty turn"
    return row, ""


def read_suite(name: str, folder: Path, limit: int | None = None) -> SuiteFile:
    """Questions of one suite (the first `limit` per reported suite, in file order). Malformed rows are skipped
    and counted, with one warning line on stderr; a missing file is an error (MissingSharedData)."""
    path = folder / f"{name}.jsonl"
    if not path.is_file():
        raise MissingSharedData(f"suite {name!r} has no file {path}")
    text, replaced = read_text(path)
    per_suite: dict[str, list[Question]] = {}
    malformed, first = 0, ""
    # Split on newlines only: str.splitlines also breaks at U+2028 and friends, which JSON strings may hold raw.
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        row, why = _parse_row(line)
        if row is None:
            malformed += 1
            first = first or f"line {line_no}: {why}"
            continue
        suite = f"spec_bench/{_spec_bench_category(row.get('category'))}" if name == "spec_bench" else name
        questions = per_suite.setdefault(suite, [])
        if limit is None or len(questions) < limit:
            questions.append(Question(suite, str(row.get("question_id", line_no)), tuple(row["turns"])))
    found = SuiteFile(path, [q for qs in per_suite.values() for q in qs], malformed, first, replaced)
    _warn(found)
    return found


def _warn(found: SuiteFile) -> None:
    problems = []
    if found.malformed:
        problems.append(f"skipped {found.malformed} malformed row(s), the first at {found.first_malformed}")
    if found.replaced:
        problems.append(f"replaced {found.replaced} undecodable byte sequence(s) by U+FFFD")
    if problems:
        print(f"warning: {found.path}: {'; '.join(problems)}", file=sys.stderr)


def load_suite(name: str, folder: Path, limit: int | None = None) -> list[Question]:
    """Questions of one suite (read_suite's, without the counts)."""
    return read_suite(name, folder, limit).questions
