"""The benchmark harness end to end on stories260K with two tiny suites."""

import json

import pytest

from eagle3.bench import acceptance_by_depth
from eagle3.cli import main
from eagle3.suites import load_suite, parse_suites


def write_suite(folder, name, questions):
    rows = [{"question_id": i, "category": c, "turns": t} for i, (c, t) in enumerate(questions)]
    (folder / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "eval"
    folder.mkdir()
    write_suite(folder, "mt_bench", [("writing", ["Once upon a time", "Then the dog said"]),
                                     ("roleplay", ["Lily and Ben went", "They were happy"])])
    write_suite(folder, "gsm8k", [("math", ["Tom had two apples."]), ("math", ["One day, Sam"]),
                                  ("math", ["The cat sat"])])
    return folder


def test_bench_end_to_end(tmp_path, data, capsys, monkeypatch):
    monkeypatch.setenv("EAGLE3_HOME", str(tmp_path / "home"))  # the auto tree's cost model is measured here
    assert main(["draft-init", str(tmp_path / "draft"), "--target", "stories260k"]) == 0
    out = tmp_path / "out"
    code = main(["bench", "--target", "stories260k", "--draft", str(tmp_path / "draft"), "--suites", "mt_bench,gsm8k",
                 "--methods", "vanilla,eagle3,pld,hf,hf-pld", "--max-new-tokens", "24", "--limit", "2",
                 "--tree", "10,3,3", "auto", "--data-dir", str(data), "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    summary = results["summary"]
    eagle3 = ["eagle3 10,3,3", "eagle3 auto"]  # one method per tree
    assert set(summary) == {"vanilla", *eagle3, "pld", "hf", "hf-pld"}
    for per_suite in summary.values():
        assert set(per_suite) == {"mt_bench", "gsm8k", "all"}
        for suite, entry in per_suite.items():
            assert {"speedup", "speedup_total", "tau", "tokens_per_s", "identical", "n"} <= set(entry)
            assert entry["n"] == (4 if suite == "all" else 2)
            assert entry["tokens_per_s"] > 0 and entry["speedup"] > 0
    for method in ("vanilla", *eagle3, "pld"):  # ours are lossless, token for token
        assert summary[method]["all"]["identical"] == 4
    assert summary["eagle3 10,3,3"]["all"]["tau"] >= 1 and summary["vanilla"]["all"]["tau"] is None
    assert abs(summary["vanilla"]["all"]["speedup"] - 1) < 1e-9
    # MT-bench has two turns; the second follows the method's own first answer.
    rows = [r for r in results["rows"] if r["suite"] == "mt_bench"]
    assert len(rows) == 2 * 6 and all(len(r["turns"]) == 2 for r in rows)
    assert (out / "results.md").read_text().count("| eagle3 auto |") >= 4
    for png in ("speedup.png", "tau.png", "acceptance.png"):
        assert (out / png).stat().st_size > 1000
    assert "Speed-up over vanilla" in capsys.readouterr().out


def test_bench_errors(tmp_path, capsys):
    assert main(["bench", "--target", "stories260k", "--suites", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown suite" in capsys.readouterr().err
    assert main(["bench", "--target", "stories260k", "--methods", "vanilla,magic", "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["bench", "--target", "stories260k", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", "--target", "stories260k", "--methods", "eagle3", "--data-dir", str(tmp_path),
                 "--suites", "gsm8k", "--out", str(tmp_path)]) == 2


def test_spec_bench_categories_are_separate_suites():
    from eagle3.paths import shared_path

    questions = load_suite("spec_bench", shared_path("data/eval"), limit=2)
    suites = {q.suite for q in questions}
    assert suites == {f"spec_bench/{c}" for c in ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")}
    assert len(questions) == 12
    assert parse_suites("mt_bench, gsm8k") == ["mt_bench", "gsm8k"]


def test_acceptance_by_depth():
    assert acceptance_by_depth([1, 2, 3, 3]) == [3 / 4, 2 / 3, 0.0]
    assert acceptance_by_depth([1, 1]) == [0.0]
