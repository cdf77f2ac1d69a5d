"""Benchmark suites: the prompts of the EAGLE-3 paper's evaluation and Spec-Bench, read from JSONL files
(FastChat format: question_id, category, turns) in ../shared/data/eval, --data-dir or $EAGLE3_DATA."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

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


def load_suite(name: str, folder: Path, limit: int | None = None) -> list[Question]:
    """Questions of one suite (the first `limit` per reported suite, in file order)."""
    path = folder / f"{name}.jsonl"
    if not path.is_file():
        raise MissingSharedData(f"suite {name!r} has no file {path}")
    per_suite: dict[str, list[Question]] = {}
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns = tuple(str(t) for t in row["turns"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{line_no} is not a FastChat question ({err})") from None
        suite = f"spec_bench/{_spec_bench_category(row.get('category'))}" if name == "spec_bench" else name
        questions = per_suite.setdefault(suite, [])
        if limit is None or len(questions) < limit:
            questions.append(Question(suite, str(row.get("question_id", line_no)), turns))
    return [q for qs in per_suite.values() for q in qs]
