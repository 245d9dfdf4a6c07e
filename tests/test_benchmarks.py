"""The benchmark scripts run (a small setting each): a library change that breaks one fails here, not in a
user's hands. Their numbers are not checked (performance lives in benchmarks/, as ratios)."""

import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def test_bench_nsc_runs(tmp_path):
    """It crashed on every run (a stand-in task file lacked the task type the entropy objective reads), and
    showed only the parent's CalledProcessError."""
    done = subprocess.run([sys.executable, str(REPOSITORY / "benchmarks" / "bench_nsc.py"), "--hidden", "32",
                           "--layers", "2", "--length", "8", "--steps", "1", "--threads", "1",
                           "--json", str(tmp_path / "nsc.json")], capture_output=True, text=True, timeout=300,
                          cwd=REPOSITORY)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "NSC" in done.stdout and "1 LoRA" in done.stdout and (tmp_path / "nsc.json").is_file()
