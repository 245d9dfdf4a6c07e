"""A hostile review of this round's finished-run resume and Ray driver check: each test failed before its fix."""

import json
import os
import subprocess
import sys

import pytest
import torch

from eval_fixtures import build_text_setting
from factories import invoke_cli, write_task_folders

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    return build_text_setting(tmp_path_factory.mktemp("review14"))


def _args(setting, run_dir, *extra, strategy="surrogate"):
    budget = ["--budget", "8"] if strategy in ("surrogate", "greedy", "random") else []
    return ["search-mask", "--adapters", *setting.adapter_args(), "--tasks", str(setting.tasks_file), "--merger",
            "ties", "--strategy", strategy, *budget, "--max-prune", "0.5", "--threads", "1",
            "--run-dir", str(run_dir), *extra]


def test_a_run_killed_before_its_out_is_written_gives_its_table_on_the_rerun(setting, tmp_path, monkeypatch):
    """best.json and finished.json are written (holding the lock) before --out: a kill in between leaves a
    finished run whose rerun writes --out without searching. (--out came before finished.json: the rerun searched
    again and was refused, '--out ... already exists'.)"""
    run_dir, out = tmp_path / "run", tmp_path / "mask.json"

    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("loramerge_cli.outputs.write_result", killed)
        first = invoke_cli(_args(setting, run_dir, "--out", str(out)))
    assert first.exit_code == 130 and not out.exists() and (run_dir / "finished.json").is_file()
    monkeypatch.setattr("loramerge_cli.search.runner.build_problem", lambda *a, **k: pytest.fail("a model was built"))
    again = invoke_cli(["search-mask", "--run-dir", str(run_dir), "--resume", "--threads", "1"])
    assert again.exit_code == 0 and "had already finished" in again.stderr, again.stderr
    assert json.loads(out.read_text())["weights"] == json.loads((run_dir / "best.json").read_text())["weights"]


@pytest.mark.parametrize("strategy", ["surrogate", "screened", "enmp"])
def test_an_interrupted_report_test_resume_leaves_the_run_finished(setting, tmp_path, monkeypatch, strategy):
    """`--resume --report-test` on a finished run without test figures searches again; Ctrl-C during it leaves
    the run finished, as it was."""
    run_dir, out = tmp_path / "run", tmp_path / "mask.json"
    small = [] if strategy == "surrogate" else ["--popsize", "4", "--generations", "2"]
    assert invoke_cli(_args(setting, run_dir, "--out", str(out), *small, strategy=strategy)).exit_code == 0
    resume = ["search-mask", "--run-dir", str(run_dir), "--resume", "--threads", "1"]

    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("loramerge_cli.search.runner._test_report", killed)
        cut = invoke_cli([*resume, "--report-test", "--out", str(tmp_path / "tested.json")])
    assert cut.exit_code == 130
    again = invoke_cli(resume)  # the pipeline's plain rerun
    assert again.exit_code == 0 and "had already finished" in again.stderr, again.stderr


def test_a_rerun_with_the_same_plot_leaves_the_pictures(setting, tmp_path):
    """--out that holds the table is left as it is; --plot that holds the run's pictures was refused."""
    run_dir, out, plots = tmp_path / "run", tmp_path / "mask.json", tmp_path / "plots"
    pytest.importorskip("matplotlib")
    assert invoke_cli(_args(setting, run_dir, "--out", str(out), "--plot", str(plots))).exit_code == 0
    again = invoke_cli(["search-mask", "--run-dir", str(run_dir), "--resume", "--threads", "1", "--plot",
                        str(plots)])
    assert again.exit_code == 0, again.stderr


@pytest.mark.parametrize("strategy", ["greedy", "random"])
def test_a_finished_greedy_or_random_run_gives_its_table_on_resume(setting, tmp_path, strategy):
    """They write finished.json too, but --resume was a usage error (exit 2) that said 'rerun it without
    --resume', and without --resume the run dir is refused: no rerun of a finished run passed."""
    run_dir, out = tmp_path / "run", tmp_path / "mask.json"
    assert invoke_cli(_args(setting, run_dir, "--out", str(out), strategy=strategy)).exit_code == 0
    assert (run_dir / "finished.json").is_file()
    again = invoke_cli(["search-mask", "--run-dir", str(run_dir), "--resume", "--threads", "1"])
    assert again.exit_code == 0 and "had already finished" in again.stderr, again.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_finished_ray_gpu_runs_table_comes_back_on_a_machine_without_cuda(setting, tmp_path):
    """A finished `--device cuda --backend ray` run needs no GPU to give its table back, but check_driver
    refused the resume command the run prints (`--device cuda --backend ray`), and a plain --resume on a CPU
    machine for the run's kind of device."""
    run_dir = tmp_path / "run"
    assert invoke_cli(_args(setting, run_dir, "--out", str(tmp_path / "mask.json"))).exit_code == 0
    config = json.loads((run_dir / "config.json").read_text())
    config["settings"]["device_kind"] = "cuda"  # as the GPU run saved it
    (run_dir / "config.json").write_text(json.dumps(config))
    resume = ["search-mask", "--run-dir", str(run_dir), "--resume", "--threads", "1", "--device", "cuda"]
    assert invoke_cli(resume).exit_code == 0
    ray = invoke_cli([*resume, "--backend", "ray"])
    assert ray.exit_code == 0, ray.stderr
    plain = invoke_cli(resume[:-2])
    assert plain.exit_code == 0, plain.stderr


def test_a_resume_while_the_run_writes_its_table_is_refused_as_in_use(setting, tmp_path, monkeypatch):
    """run_search released the run dir's lock before best.json and finished.json were written: a `--resume` in
    that window was not refused as 'in use', searched again, and the two runs' finished.json and best.json
    disagreed: the next rerun was refused."""
    run_dir, out = tmp_path / "run", tmp_path / "mask.json"
    from loramerge_cli.search import runner

    real = runner.record_finished
    seen = {}

    def racing(path, text):
        if not seen:
            seen["nested"] = invoke_cli(["search-mask", "--run-dir", str(run_dir), "--resume", "--threads", "1",
                                         "--out", str(tmp_path / "other.json")])
        real(path, text)

    with monkeypatch.context() as patch:
        patch.setattr(runner, "record_finished", racing)
        assert invoke_cli(_args(setting, run_dir, "--out", str(out))).exit_code == 0
    nested = seen["nested"]
    assert nested.exit_code == 1 and "in use by another search" in nested.stderr, nested.stderr
    after = invoke_cli(["search-mask", "--run-dir", str(run_dir), "--resume", "--threads", "1"])
    assert after.exit_code == 0, after.stderr


def test_out_rank_or_energy_with_isotropize_is_refused_not_ignored(sources, tmp_path):
    """An isotropized dense merge (ties in the full space) is written exactly, at up to min(m, n) directions:
    --out-rank 2 was accepted and ignored (the docs said dense results are truncated)."""
    for flag in (["--out-rank", "2"], ["--energy", "0.9"]):
        result = invoke_cli(["merge", "--adapters", *sources, "--merger", "ties", "--isotropize", *flag,
                             "--out", str(tmp_path / "merged")])
        assert result.exit_code == 2 and "does not apply with --isotropize" in result.stderr, result.stderr
    assert not (tmp_path / "merged").exists()
    plain = invoke_cli(["merge", "--adapters", *sources, "--merger", "ties", "--out-rank", "2", "--out",
                        str(tmp_path / "merged")])
    assert plain.exit_code == 0, plain.stderr


def test_a_ray_drivers_own_device_is_checked_before_any_work(setting, tmp_path, monkeypatch):
    """--backend ray: the driver scores on --device / --devices[0] here; a non-cuda device was not checked."""
    monkeypatch.setattr("loramerge_cli.search.runner.build_problem", lambda *a, **k: pytest.fail("a model was built"))
    result = invoke_cli(["search-mask", "--adapters", *setting.adapter_args(), "--tasks", str(setting.tasks_file),
                         "--threads", "1", "--backend", "ray", "--workers", "1", "--device", "mps",
                         "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 1 and "MPS is not available" in result.stderr, result.stderr


def test_merge_device_with_nothing_reading_tasks_is_still_a_usage_error(setting, tmp_path):
    """The device of task data nothing reads is a usage error (exit 2), not a missing device."""
    result = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--tasks", str(setting.tasks_file),
                         "--device", "cuda:0", "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "does nothing here" in result.stderr, result.stderr


def test_eval_spec_errors_come_before_torch_with_a_device(tmp_path):
    """plan_eval's spec and input checks are torch-free: the device check (which imports torch) comes last."""
    script = ("import atexit, runpy, sys\nsys.argv = ['loramerge'] + sys.argv[1:]\n"  # (the command ends the process)
              "atexit.register(lambda: print('torch' in sys.modules))\n"
              "runpy.run_module('loramerge_cli', run_name='__main__')\n")
    args = ["eval", "--adapters", f"a={tmp_path / 'none'}", "--tasks", str(tmp_path / "missing.yaml"),
            "--device", "cuda:0"]
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert (done.returncode, done.stdout.split()) == (1, ["False"]) and "missing.yaml" in done.stderr, done.stderr


def test_a_recipe_written_before_the_refusal_still_rebuilds(tmp_path):
    """Before, `isotropize: true` with `out-rank: 10` was accepted (and ignored) and written into loramerge.yaml:
    such a recipe rebuilds, the truncation dropped with a warning."""
    write_task_folders(tmp_path / "adapters", head=False)
    recipe = tmp_path / "old" / "loramerge.yaml"
    recipe.parent.mkdir()
    recipe.write_text("adapters:\n" + "".join(f"  {n}: ../adapters/{n}\n" for n in "abc")
                      + "merger: ties\nisotropize: true\nout-rank: 10\n")
    result = invoke_cli(["merge", "--config", str(recipe), "--out", str(tmp_path / "rebuilt")])
    assert result.exit_code == 0 and "the recipe's out-rank dropped" in result.stderr, result.stderr
    assert "out-rank" not in (tmp_path / "rebuilt" / "loramerge.yaml").read_text()


def test_a_full_disk_at_the_end_of_a_search_is_one_line_and_the_run_resumes(setting, tmp_path, monkeypatch):
    """The machine's storage errors were reported as 'internal error: OSError …'; the search is kept."""
    import errno

    run_dir, out = tmp_path / "run", tmp_path / "mask.json"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr("loramerge_cli.search.runner.record_finished", full)
        failed = invoke_cli(_args(setting, run_dir, "--out", str(out), "--quiet"))
    assert failed.exit_code == 1 and len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    assert "No space left on device" in failed.stderr and "--resume" in failed.stderr
    assert "internal error" not in failed.stderr and not out.exists()
    resumed = invoke_cli(["search-mask", "--run-dir", str(run_dir), "--resume", "--threads", "1"])
    assert resumed.exit_code == 0 and out.is_file(), resumed.stderr
