"""Defects found by the review round of 2026-12-07 (late evening); each test fails on the code before its fix."""
from __future__ import annotations

import os
import subprocess
import sys

import huggingface_hub.utils as hub_utils

from loramerge_cli.evaluation.loading import quiet_transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quiet_transformers_leaves_the_callers_hub_progress_bars_as_they_were():
    # transformers' enable_progress_bar turns every huggingface_hub bar back on, per-group settings cleared
    from transformers.utils import logging

    assert logging.is_progress_bar_enabled()
    hub_utils.disable_progress_bars()
    hub_utils.enable_progress_bars("huggingface_hub.lfs_upload")
    try:
        with quiet_transformers():
            assert not logging.is_progress_bar_enabled()
        assert hub_utils.are_progress_bars_disabled()
        assert not hub_utils.are_progress_bars_disabled("huggingface_hub.lfs_upload")
        assert logging.is_progress_bar_enabled()
    finally:
        hub_utils.enable_progress_bars()
    with quiet_transformers():
        pass
    assert not hub_utils.are_progress_bars_disabled()


def test_quiet_transformers_says_nothing_when_the_environment_pins_the_hub_bars():
    code = ("from loramerge_cli.evaluation.loading import quiet_transformers\n"
            "with quiet_transformers(): pass\n")
    for value in ("0", "1"):
        done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": value}, timeout=300)
        assert done.returncode == 0, done.stderr
        assert done.stderr == "", done.stderr
