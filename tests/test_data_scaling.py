"""benchmarks/data_scaling.py: the data-scaling table and figure from the scaling benches' results."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "data_scaling.py"


def bench_results(folder: Path, taus: dict[str, float]) -> None:
    folder.mkdir(parents=True)
    cell = {"n": 40, "identical": 40, "speedup_median": 1.1, "drafted": 0.25}
    summary = {label: {"mt_bench": {**cell, "tau": tau}} for label, tau in taus.items()}
    (folder / "results.json").write_text(json.dumps({"summary": summary}))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_table_and_figure_from_the_benches_run_so_far(tmp_path):
    runs = tmp_path / "runs"
    bench_results(runs / "scaling" / "bench-1of4", {"vanilla": None, "eagle3 60,5,10": 1.5, "eagle2 60,5,10": 1.4,
                                                    "eagle3 auto": 1.3, "eagle2 auto": 1.2})  # fmt: skip
    bench_results(runs / "scaling" / "bench-1of1", {"vanilla": None, "eagle3 60,5,10": 1.9, "eagle2 60,5,10": 1.6,
                                                    "eagle3 auto": 1.7, "eagle2 auto": 1.5})  # fmt: skip
    (runs / "equal" / "eagle3").mkdir(parents=True)
    (runs / "equal" / "eagle3" / "summary.json").write_text(json.dumps({"steps": 440, "tau": {"tree": 1.93}}))
    done = run("--runs", str(runs))
    assert done.returncode == 0, done.stderr
    text = (runs / "scaling" / "data_scaling.md").read_text()
    assert "| EAGLE-3 | 60,5,10 | all | 440 | 1.90 | 25% | 1.10x | 40/40 | 1.93 |" in text
    assert "| EAGLE-2 | 60,5,10 | 1/4 |  | 1.40 |" in text
    assert "| EAGLE-3 | auto | 1/4 |  | 1.30 |" in text
    assert "Not run yet: " + str(runs / "scaling" / "bench-1of2") in text
    assert (runs / "scaling" / "data_scaling.png").read_bytes()[:4] == b"\x89PNG"


def test_no_bench_and_a_corrupt_one_are_one_line_errors(tmp_path):
    done = run("--runs", str(tmp_path))
    assert done.returncode == 2 and "no scaling bench found" in done.stderr and "Traceback" not in done.stderr
    folder = tmp_path / "scaling" / "bench-1of4"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text("{not json")
    done = run("--runs", str(tmp_path))
    assert done.returncode == 2 and "cannot be read" in done.stderr and "Traceback" not in done.stderr
    bench_results(tmp_path / "scaling" / "bench-1of2", {"vanilla": None, "eagle3 auto": 1.3})  # (no 60,5,10: an old run)
    folder.joinpath("results.json").unlink()
    done = run("--runs", str(tmp_path))
    assert done.returncode == 2 and "has no eagle3 60,5,10" in done.stderr and "Traceback" not in done.stderr
