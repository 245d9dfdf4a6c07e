"""A ninth round of hostile inputs (of main at 65f6bae). One test per defect, each failing on that commit; each
docstring says what the user did, what happened and what should happen."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from factories import invoke_cli
from test_hostile_inputs import REPO, one_line


def test_config_given_twice_is_a_usage_error(tmp_path):
    """`merge --config a.yaml --config b.yaml`: the second recipe was used and the first ignored, without a
    word. Two recipes are now a usage error naming the flag, before either is read."""
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(f"out: {tmp_path / 'from_a'}\n")
    second.write_text(f"out: {tmp_path / 'from_b'}\n")
    for args in (["--config", first, "--config", second], [f"--config={first}", "--config", second]):
        one_line(invoke_cli(["merge", *args, "--adapters", "x", "y"]), "given twice", 2)
    assert not (tmp_path / "from_a").exists() and not (tmp_path / "from_b").exists()


@pytest.mark.parametrize("args", [["-h"], ["merge", "--help"], ["search-mask", "-h", "--strategy", "enmp"]])
def test_help_on_a_closed_stdout_says_so(args):
    """`loramerge -h >&-`: exit 0 and not a word (rich writes to nowhere when there is no stdout). The help is
    the product here: one line and exit 1, as any other command whose stdout is closed."""
    process = subprocess.run([sys.executable, "-m", "loramerge_cli", *args], stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": REPO}, timeout=120, preexec_fn=lambda: os.close(1))
    assert (process.returncode, process.stderr) == (1, "error: cannot write to standard output: it is closed\n")
