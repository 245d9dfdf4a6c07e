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


def test_the_scripts_argument_types_refuse_what_the_scripts_cannot_use():
    """`--max-prune 0` passed the check and failed after minutes of model loading; `--merger ta,ties` went on as
    one merger name; `--lambdas ta=inf` and a λ given twice were taken; seeds past numpy's were taken."""
    import argparse

    import pytest

    sys.path.insert(0, str(REPOSITORY))
    from examples.arguments import at_least, fraction, integer_list, lambda_map, merger_list, merger_name, names_of

    for parse, text in ((fraction, "0"), (fraction, "1.5"), (merger_name, "ta,ties"), (lambda_map, "ta=inf"),
                        (lambda_map, "ta=1,ta=2"), (lambda_map, "ta"), (lambda_map, "bogus=1"),
                        (integer_list, "1,x"), (integer_list, str(2**32)), (at_least(1), "0"),
                        (merger_list, "ta,bogus"), (names_of(("a", "b")), "a,c")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    assert fraction("1") == 1.0 and lambda_map("ta=0.5,ties=1") == {"ta": 0.5, "ties": 1.0}
    assert names_of(("a", "b"))("a,") == "a," and integer_list("1,2") == "1,2" and merger_list("ta,knots")
