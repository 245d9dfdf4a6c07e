"""`loramerge merge` with the options and mergers of issue 14: flags reach the library, bad ones stop
before any work, and a lossy dense result gives one warning line."""

from __future__ import annotations

import pytest
import torch
from factories import invoke_cli, write_task_folders

from loramerge_cli.adapters.peft_reader import load_adapter, load_adapters
from loramerge_cli.merging.merge import MergeConfig, merge


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folders = write_task_folders(tmp_path_factory.mktemp("adapters"), head=False)
    return [str(folders[name]) for name in "abc"]


def test_options_reach_the_merge(sources, tmp_path):
    args = ["merge", "--adapters", *sources, "--out", tmp_path / "out", "--merger", "ties", "--density",
            "0.4,0.6,0.8", "--consensus", "count", "--normalize", "weight", "--keep-rule", "floor",
            "--weights", "1,0.5,2", "--isotropize"]  # (isotropized: written exactly, no --out-rank)
    result = invoke_cli(args)
    assert result.exit_code == 0, result.stderr
    written = load_adapter(str(tmp_path / "out"))
    expected = merge(load_adapters(sources), MergeConfig(
        merger="ties", density=[0.4, 0.6, 0.8], weights=[1.0, 0.5, 2.0], isotropize=True,
        params={"consensus": "count", "normalize": "weight", "keep_rule": "floor"}))
    for path, module in expected.modules.items():
        assert torch.allclose(written.modules[path].delta(torch.float64), module.lora_B @ module.lora_A,
                              rtol=1e-5, atol=1e-6), path


def test_lossy_dense_results_give_one_warning_line_unless_quiet(sources, tmp_path):
    args = ["merge", "--adapters", *sources, "--merger", "ties", "--density", "0.5", "--energy", "1"]
    loud = invoke_cli([*args, "--out", tmp_path / "loud"])
    assert loud.exit_code == 0, loud.stderr
    lines = [line for line in (loud.stdout + loud.stderr).splitlines() if "warning" in line]
    assert len(lines) == 1 and "--out-rank 10 makes them exact" in lines[0]
    quiet = invoke_cli([*args, "--out", tmp_path / "quiet", "--quiet"])
    assert quiet.exit_code == 0 and "warning" not in quiet.stdout + quiet.stderr


@pytest.mark.parametrize(("flags", "message"), [
    (["--merger", "lora_lego", "--space", "knots"], "full space only"),
    (["--merger", "tsv", "--gamma", "0.1"], "does not apply"),
    (["--merger", "ties", "--density", "0.5,0.5"], "one per adapter"),
])
def test_bad_options_exit_2_with_one_line(sources, tmp_path, flags, message):
    result = invoke_cli(["merge", "--adapters", *sources, "--out", tmp_path / "x", *flags])
    assert result.exit_code == 2 and message in result.stderr + result.stdout
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", ["merge", "search-mask"])
def test_merge_and_search_mask_offer_the_new_options(command):
    text = invoke_cli([command, "--help"]).stdout
    assert all(flag in text for flag in ("--consensus", "--keep-rule", "--clusters", "--isotropize", "lora_lego"))
