"""The benchmark harness end to end on stories260K with tiny suites: metrics, outlier re-runs, resume, suites."""

import json
import math
import statistics

import pytest
import torch

from eagle3.evaluation import bench
from eagle3.evaluation.bench import RUN_KEYS, acceptance_by_depth, outliers, read_records, summarize
from eagle3.cli import main
from eagle3.paths import MissingSharedData
from eagle3.evaluation.suites import load_suite, parse_suites, read_suite


def write_suite(folder, name, questions):
    rows = [{"question_id": i, "category": c, "turns": t} for i, (c, t) in enumerate(questions)]
    (folder / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.fixture(autouse=True)
def keep_threads():
    """The bench runs below pass --threads 1 (stories260K is faster on one thread, and does not stall on a
    shared machine's busy cores); torch's thread count is restored for the tests that follow."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "eval"
    folder.mkdir()
    write_suite(folder, "mt_bench", [("writing", ["Once upon a time", "Then the dog said"]),
                                     ("roleplay", ["Lily and Ben went", "They were happy"])])
    write_suite(folder, "gsm8k", [("math", ["Tom had two apples."]), ("math", ["One day, Sam"]),
                                  ("math", ["The cat sat"])])
    return folder


@pytest.fixture
def draft(tmp_path):
    assert main(["draft-init", str(tmp_path / "draft"), "--target", "stories260k"]) == 0
    return tmp_path / "draft"


def bench_args(data, draft, out, *extra):
    """A small fixed-tree bench of our three methods."""
    return ["bench", "--target", "stories260k", "--threads", "1", "--draft", str(draft), "--methods",
            "vanilla,eagle3,pld", "--tree", "10,3,3", "--max-new-tokens", "6", "--data-dir", str(data),
            "--out", str(out), *extra]


def steady_timing(monkeypatch, slow_once=(), slow_always=()):
    """Makes every answer's time a function of its token count, so that per-question ratios are exactly 1
    where outputs agree; vanilla's answer to a turn in slow_once looks 50 times slower the first time, in
    slow_always every time (the warm-up answers the first question's first turn: keep it out of both)."""
    make_methods, seen = bench.make_methods, set()

    def make(*args, **kwargs):
        runners = make_methods(*args, **kwargs)

        def timed(name, runner):
            def answer(messages):
                out = runner(messages)
                out.wall_s = 0.001 * (len(out.token_ids) + 1)
                turn = messages[-1]["content"]
                if name == "vanilla" and (turn in slow_always or (turn in slow_once and turn not in seen)):
                    seen.add(turn)
                    out.wall_s *= 50
                return out

            return answer

        return {name: timed(name, runner) for name, runner in runners.items()}

    monkeypatch.setattr(bench, "make_methods", make)


def test_bench_end_to_end(tmp_path, data, draft, capsys, monkeypatch):
    monkeypatch.setenv("EAGLE3_HOME", str(tmp_path / "home"))  # the auto tree's cost model is measured here
    out = tmp_path / "out"
    code = main(["bench", "--target", "stories260k", "--threads", "1", "--draft", str(draft), "--suites",
                 "mt_bench,gsm8k", "--methods", "vanilla,eagle3,pld,hf,hf-pld", "--max-new-tokens", "16",
                 "--limit", "2", "--tree", "10,3,3", "auto", "--lookup", "3", "--data-dir", str(data), "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    summary, rows = results["summary"], results["rows"]
    eagle3 = ["eagle3 10,3,3", "eagle3 10,3,3+lookup", "eagle3 auto", "eagle3 auto+lookup"]  # one per tree, +lookup
    assert set(summary) == {"vanilla", *eagle3, "pld", "hf", "hf-pld"} and results["config"]["lookup"] == 3
    for per_suite in summary.values():
        assert set(per_suite) == {"mt_bench", "gsm8k", "all"}
        for suite, entry in per_suite.items():
            assert {"speedup", "speedup_median", "speedup_geomean", "speedup_total", "tau", "tokens_per_s",
                    "identical", "n"} <= set(entry)
            assert entry["n"] == (4 if suite == "all" else 2)
            assert entry["tokens_per_s"] > 0 and entry["speedup_median"] > 0
    for method in (*eagle3, "pld"):  # ours are lossless, token for token
        assert summary[method]["all"]["identical"] == 4
    # The speed-up measures are those of the per-question ratios in the rows.
    base = {(r["suite"], r["question_id"]): r for r in rows if r["method"] == "vanilla"}
    for method in ("eagle3 10,3,3", "pld", "hf"):
        ratios = [(r["new_tokens"] / r["wall_s"]) / (base[k]["new_tokens"] / base[k]["wall_s"])
                  for r in rows if r["method"] == method for k in [(r["suite"], r["question_id"])]]
        entry = summary[method]["all"]
        assert entry["speedup_median"] == pytest.approx(statistics.median(ratios))
        assert entry["speedup_geomean"] == pytest.approx(math.exp(statistics.fmean(map(math.log, ratios))))
        assert entry["speedup"] == pytest.approx(statistics.fmean(ratios))
    assert summary["eagle3 10,3,3"]["all"]["tau"] >= 1 and summary["vanilla"]["all"]["tau"] is None
    # MT-bench has two turns; the second follows the method's own first answer.
    mt = [r for r in rows if r["suite"] == "mt_bench"]
    assert len(mt) == 2 * 8 and all(len(r["turns"]) == 2 for r in mt)
    # Written as it went: one record per question (plus any re-run), and the configuration first.
    records = read_records(out / "rows.jsonl")
    assert sorted(records) == [0, 1, 2, 3]
    assert [r for i in sorted(records) for r in records[i]["rows"]] == rows
    run = json.loads((out / "run.json").read_text())
    assert {k: run[k] for k in RUN_KEYS} == {k: results["config"][k] for k in RUN_KEYS}
    report = (out / "results.md").read_text()
    assert report.count("| eagle3 auto |") >= 4 and "### Outliers" in report
    for png in ("speedup.png", "tau.png", "acceptance.png"):
        assert (out / png).stat().st_size > 1000
    assert "Speed-up over vanilla (median of per-question ratios)" in capsys.readouterr().out


def test_bench_errors(tmp_path, data, capsys):
    out = tmp_path / "out"
    assert main(["bench", "--target", "stories260k", "--suites", "nope", "--out", str(out)]) == 2
    assert "unknown suite" in capsys.readouterr().err
    assert main(["bench", "--target", "stories260k", "--methods", "vanilla,magic", "--out", str(out)]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["bench", "--target", "stories260k", "--data-dir", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    # With the data present, eagle3 fails for want of a draft, before any model is loaded or file written.
    assert main(["bench", "--target", "stories260k", "--methods", "eagle3", "--draft", "none", "--data-dir", str(data),
                 "--suites", "gsm8k", "--out", str(out)]) == 2
    assert "method eagle3 needs a draft: pass --draft PATH" in capsys.readouterr().err
    assert not out.exists()
    bad = [("--max-new-tokens", "0"), ("--limit", "0"), ("--temperature", "nan"), ("--top-p", "0"), ("--top-k", "-1"),
           ("--seed", "-1"), ("--pld-tokens", "65"), ("--tree", "1,2"), ("--threads", "0"), ("--device", "tpu")]
    for flag, value in bad:  # refused where parsed
        assert main(["bench", "--target", "stories260k", flag, value, "--out", str(out)]) == 2
        assert capsys.readouterr().err.startswith(f"error: {flag}: ")


def test_bench_out_folder_rules(tmp_path, data, capsys):
    (data / "gsm8k.jsonl").write_text((data / "gsm8k.jsonl").read_text() + '{"turns": []}\n')
    out = tmp_path / "out"
    args = ["bench", "--target", "stories260k", "--threads", "1", "--draft", "none", "--suites", "gsm8k", "--methods",
            "vanilla", "--max-new-tokens", "4", "--data-dir", str(data), "--out", str(out)]
    assert main(args + ["--limit", "1"]) == 0
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["malformed_rows"] == {"gsm8k": 1}  # skipped, counted and recorded
    (out / "notes.txt").write_text("mine")
    (out / "mine.png").write_text("mine")
    capsys.readouterr()
    assert main(args + ["--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert f"error: {out} holds a bench run; pass --resume to continue it or --overwrite to start over" in err
    assert main(args + ["--limit", "2", "--resume"]) == 2  # another configuration: named, nothing touched
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: --resume: ") and "limit (1 there, 2 now)" in err and "max_new_tokens" not in err
    assert len(read_records(out / "rows.jsonl")) == 1
    assert main(args + ["--limit", "2", "--resume", "--overwrite"]) == 2
    assert "contradict" in capsys.readouterr().err
    assert main(args[:-1] + [str(out / "notes.txt"), "--limit", "1"]) == 2
    assert "is a file" in capsys.readouterr().err
    # --overwrite removes what bench wrote and starts over; the user's files stay.
    assert main(args + ["--limit", "2", "--overwrite"]) == 0
    assert sorted(read_records(out / "rows.jsonl")) == [0, 1]
    assert json.loads((out / "run.json").read_text())["limit"] == 2
    assert (out / "notes.txt").read_text() == "mine" and (out / "mine.png").read_text() == "mine"
    # Resuming a finished run rewrites its results from its rows.
    first = json.loads((out / "results.json").read_text())
    (out / "results.json").unlink()
    assert main(args + ["--limit", "2", "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["rows"] == first["rows"] and again["config"]["resumed"]


def outputs(results):
    """What a run computed, apart from its timings: question order, methods, tokens, texts, acceptance."""
    return [(r["suite"], r["question_id"], r["method"], r["token_ids"], r["turns"], r["accept_lengths"])
            for r in results["rows"]]


def test_bench_resumes_where_it_stopped(tmp_path, data, draft, monkeypatch, capsys):
    steady_timing(monkeypatch)  # no outlier re-runs: the runs differ only by the interruption
    args = ["--suites", "mt_bench,gsm8k", "--limit", "3"]
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    answer_question, seen = bench.answer_question, []

    def stop_at_third_question(method, question):
        seen.extend([question] if question not in seen else [])
        if len(seen) == 3:
            raise KeyboardInterrupt
        return answer_question(method, question)

    monkeypatch.setattr(bench, "answer_question", stop_at_third_question)
    assert main(bench_args(data, draft, stopped, *args)) == 130
    err = capsys.readouterr().err
    assert (f"interrupted: bench stopped after 2 of 5 questions, kept in {stopped / 'rows.jsonl'}; rerun the same "
            "command with --resume to continue") in err
    assert sorted(read_records(stopped / "rows.jsonl")) == [0, 1] and not (stopped / "results.json").exists()
    kept = read_records(stopped / "rows.jsonl")
    with (stopped / "rows.jsonl").open("a") as f:
        f.write('{"index": 2, "suite": "gsm8k", "ques')  # the torn last line of a killed run
    monkeypatch.setattr(bench, "answer_question", answer_question)
    assert main(bench_args(data, draft, stopped, *args)) == 2  # not without --resume
    assert main(bench_args(data, draft, stopped, *args, "--resume")) == 0
    assert main(bench_args(data, draft, whole, *args)) == 0
    resumed, reference = (json.loads((d / "results.json").read_text()) for d in (stopped, whole))
    assert outputs(resumed) == outputs(reference)
    for method, per_suite in reference["summary"].items():
        for suite, entry in per_suite.items():
            for key in ("identical", "n", "tau"):
                assert resumed["summary"][method][suite][key] == entry[key]
    assert resumed["rows"][:6] == [r for i in (0, 1) for r in kept[i]["rows"]]  # the finished questions kept
    assert resumed["config"]["resumed"] and not reference["config"]["resumed"]
    assert sorted(read_records(stopped / "rows.jsonl")) == [0, 1, 2, 3, 4]


def synthetic_rows(ratios):
    """Rows of vanilla and a method "fast" whose per-question ratios to vanilla are the given ones."""
    rows = []
    for i, ratio in enumerate(ratios):
        for method, wall in (("vanilla", 6.0), ("fast", 6.0 / ratio)):
            rows.append({"suite": "s", "question_id": str(i), "method": method, "new_tokens": 64, "wall_s": wall,
                         "token_ids": [1], "accept_lengths": [], "plain_rounds": 0})  # fmt: skip
    return rows


def test_outlier_rule_and_robust_speedups():
    tight = [0.98, 1.02, 1.05, 1.09, 1.00, 0.99, 1.03, 1.07, 1.01, 1.04]
    methods = ["vanilla", "fast"]
    assert outliers(synthetic_rows(tight), methods) == {}
    assert outliers(synthetic_rows([1.0] * 10), methods) == {}  # no spread at all: the 1.5x floor
    assert outliers(synthetic_rows([0.7, 1.4, 0.8, 1.3, 1.0, 0.75, 1.35]), methods) == {}  # wide but no outlier
    assert outliers(synthetic_rows([1.0, 20.0]), methods) == {}  # two questions: neither stands out
    # One vanilla question took 69 s instead of 6: its ratio is 11.5x the others'.
    hiccup = tight[:3] + [tight[3] * 69 / 6] + tight[4:]
    flagged = outliers(synthetic_rows(hiccup), methods)
    assert list(flagged) == ["s/3"] and flagged["s/3"]["fast"] == pytest.approx(hiccup[3])
    assert list(outliers(synthetic_rows(tight[:5] + [0.1] + tight[5:]), methods)) == ["s/5"]  # a slow hiccup too
    entry = summarize(synthetic_rows(hiccup), methods, greedy=True)["fast"]["all"]
    assert entry["speedup"] > 2  # the mean is swung by the hiccup
    assert abs(entry["speedup_median"] - statistics.median(tight)) < 0.03  # the median barely moves
    assert entry["speedup_median"] < entry["speedup_geomean"] < entry["speedup"]


def test_outliers_are_rerun(tmp_path, draft, monkeypatch):
    folder = tmp_path / "eval"
    folder.mkdir()
    turns = ["Tom had two apples.", "One day, Sam", "The cat sat", "Lily and Ben went", "The dog ran"]
    write_suite(folder, "gsm8k", [("math", [t]) for t in turns])
    # Question 1's vanilla run is slow once (a hiccup), question 3's every time.
    steady_timing(monkeypatch, slow_once={turns[1]}, slow_always={turns[3]})
    out = tmp_path / "out"
    assert main(bench_args(folder, draft, out, "--suites", "gsm8k")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["reruns"] == ["gsm8k/1", "gsm8k/3"]
    assert list(results["flagged"]) == ["gsm8k/3"]  # still an outlier after its re-run: kept and flagged
    assert set(results["flagged"]["gsm8k/3"]) == {"eagle3", "pld"}
    rows = results["rows"]
    assert [r["question_id"] for r in rows] == [str(i) for i in range(5) for _ in range(3)]  # in place
    assert [r["method"] for r in rows[3:6]] == ["eagle3", "pld", "vanilla"]  # the usual rotated order
    for r in rows:
        assert r["rerun"] == (r["question_id"] in ("1", "3")) and ("first_wall_s" in r) == r["rerun"]
    again = {r["method"]: r for r in rows if r["question_id"] == "1"}
    assert again["vanilla"]["first_wall_s"] == pytest.approx(50 * again["vanilla"]["wall_s"])
    assert again["pld"]["first_wall_s"] == pytest.approx(again["pld"]["wall_s"])
    assert results["summary"]["eagle3"]["all"]["speedup_median"] == pytest.approx(1.0)
    assert len((out / "rows.jsonl").read_text().splitlines()) == 5 + 2  # the re-runs appended
    report = (out / "results.md").read_text()
    assert "- re-run: gsm8k/1, gsm8k/3" in report and "flagged): gsm8k/3 (eagle3 50.00x, pld 50.00x)" in report


def test_malformed_suite_rows_are_skipped_and_counted(tmp_path, capsys):
    lines = [json.dumps({"question_id": "a", "turns": ["Tom had two apples."]}), "{not json",
             json.dumps({"question_id": "b"}), json.dumps({"turns": []}), json.dumps({"turns": ["ok", 5]}),
             json.dumps({"turns": ["  "]}), json.dumps(["turns"]), "",
             json.dumps({"question_id": "c", "turns": ["The cat\u2028sat"]}, ensure_ascii=False)]
    path = tmp_path / "gsm8k.jsonl"
    path.write_bytes("\n".join(lines).encode() + b'\n{"question_id": "d", "turns": ["Sam \xff ran"]}\n')
    found = read_suite("gsm8k", tmp_path)
    assert [(q.question_id, q.turns) for q in found.questions] == [
        ("a", ("Tom had two apples.",)), ("c", ("The cat\u2028sat",)), ("d", ("Sam \ufffd ran",))]
    assert (found.malformed, found.replaced) == (6, 1) and found.first_malformed == "line 2: not JSON"
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: {path}: skipped 6 malformed row(s), the first at line 2: not JSON; replaced 1 "
                   "undecodable byte sequence(s) by U+FFFD"]
    assert len(load_suite("gsm8k", tmp_path, limit=2)) == 2
    with pytest.raises(MissingSharedData):
        read_suite("mt_bench", tmp_path)


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
