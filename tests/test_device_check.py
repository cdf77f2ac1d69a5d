"""scripts/device_check.sh as the dry run the device machine's check gets: every step, on the CPU, tiny."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_device_check_dry_run_on_cpu(tmp_path, stories_path):
    shared = stories_path.parents[2]  # the shared data folder holding models/stories260K/hf
    env = {**os.environ, "PYTHON": sys.executable, "EAGLE3_SHARED": str(shared), "OMP_NUM_THREADS": "2"}
    run = subprocess.run(["bash", str(REPO / "scripts" / "device_check.sh"), "--device", "cpu", "--dry-run",
                          "--out", str(tmp_path / "check")], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    summary = (tmp_path / "check" / "summary.md").read_text()
    for section in ("## machine", "## tests on cpu", "costs (eagle3 calibrate)", "throughput at batch sizes 1,2"):
        assert section in summary, section
    assert "passed" in (tmp_path / "check" / "tests.log").read_text()
    assert "| eagle3 auto |" in summary and "new tokens" in summary  # the bench's table and the cost table
    assert (tmp_path / "check" / "bench-stories" / "batch.json").is_file()
    assert subprocess.run(["bash", str(REPO / "scripts" / "device_check.sh"), "--bogus"], env=env,
                          capture_output=True, text=True).returncode == 2  # fmt: skip
