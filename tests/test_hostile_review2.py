"""A second hostile review (of main at 035950c): one test per defect, each failing on that commit. Each
docstring says what the user did, what happened and what should happen."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from eval_fixtures import build_text_setting
from factories import invoke_cli

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    return build_text_setting(tmp_path_factory.mktemp("review2"))


def _search(setting, *extra):
    return invoke_cli(["search-mask", "--strategy", "screened",
                       "--adapters", *setting.adapter_args(), "--merger", "ta", "--tasks",
                       setting.tasks_file, "--popsize", "2", "--generations", "1", "--val-limit", "4",
                       "--threads", "1", "--quiet", *extra])


def _one_line_error(result, code=1):
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert "internal error" not in result.stderr, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr


# --- the screened default ------------------------------------------------------------------------------

def test_screened_budget_below_the_unit_count_is_not_an_internal_error(setting, tmp_path):
    """`search-mask ... --budget 3` (default strategy screened; 2 blocks x 3 tasks = 6 units) ended with
    `internal error: KeyError: ((3,), None)` after the screen had scored 3 tables (`_screen` reads the memo
    of every single, but the budget stopped the screen early). On a real model (96 units) any --budget
    below 96 crashes after that much work. It should return the best table found within the budget (or
    refuse the budget up front, exit 2)."""
    out = tmp_path / "mask.json"
    result = _search(setting, "--budget", "3", "--out", out)
    assert "internal error" not in result.stderr, result.stderr
    assert result.exit_code in (0, 2), result.stderr
    if result.exit_code == 0:
        assert json.loads(out.read_text())["provenance"]["full_evaluations"] <= 3


# --- what is never done to your files -----------------------------------------------------------------

def test_run_dir_never_overwrites_a_users_files(setting, tmp_path):
    """`search-mask ... --run-dir proj` where proj/ is an existing folder of the user's holding best.json and
    trajectory.jsonl (common names) silently replaced both with the search's own (exit 0). README: an existing
    output is replaced only with --force and only if loramerge wrote it. The search should refuse such a run
    dir (one line) before any work, or leave the user's files alone."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "best.json").write_text('{"my": "results"}\n')
    (proj / "trajectory.jsonl").write_text("my notes\n")
    _search(setting, "--run-dir", proj, "--out", tmp_path / "mask.json")
    assert (proj / "best.json").read_text() == '{"my": "results"}\n'
    assert (proj / "trajectory.jsonl").read_text() == "my notes\n"


def test_run_dir_dot_the_working_folder_is_refused(setting, tmp_path, monkeypatch):
    """`cd work && loramerge search-mask ... --run-dir .` ran and wrote config.json, best.json, scores.json,
    trajectory.jsonl and screened_state.json into the working folder. README ("What is never done to your
    files"): no output, --run-dir included, resolves to the working folder. It should be refused in one line."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = _search(setting, "--run-dir", ".", "--out", tmp_path / "mask.json")
    _one_line_error(result)
    assert sorted(p.name for p in work.iterdir()) == []


def test_plot_never_overwrites_a_users_pictures(setting, tmp_path):
    """`search-mask ... --plot figs/` where figs/ already holds the user's fitness.png: replaced without --force
    (exit 0). It should be refused before the search (one line), as an existing --out is."""
    pytest.importorskip("matplotlib")
    figs = tmp_path / "figs"
    figs.mkdir()
    (figs / "fitness.png").write_bytes(b"my own figure")
    _search(setting, "--out", tmp_path / "mask.json", "--plot", figs)
    assert (figs / "fitness.png").read_bytes() == b"my own figure"


def test_the_table_is_never_overwritten_by_a_plot(setting, tmp_path):
    """`search-mask ... --plot figs --out figs/mask.png`: exit 0, but figs/mask.png holds the picture: the
    weight table the search produced is lost. --out inside --plot on a plot's name should be refused up front."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "figs" / "mask.png"
    result = _search(setting, "--out", out, "--plot", tmp_path / "figs")
    if result.exit_code == 0:
        assert out.read_bytes()[:1] == b"{", "the weight table was overwritten by the plot's PNG"
        assert json.loads(out.read_text())["format"] == "loramerge.mask/v1"
    else:
        _one_line_error(result, code=2)


@pytest.mark.parametrize("case", ["same path", "run dir file"])
def test_plot_onto_a_path_the_search_writes_is_refused_before_the_search(setting, tmp_path, case):
    """`search-mask --out X --plot X` and `search-mask --run-dir R --plot R/best.json`: the whole search ran,
    then `internal error: FileExistsError` (exit 1; the table was written all the same). Both should be refused
    in one line before any work (exit 2, like --out equal to --run-dir)."""
    pytest.importorskip("matplotlib")
    if case == "same path":
        extra = ["--out", tmp_path / "x", "--plot", tmp_path / "x"]
    else:
        extra = ["--run-dir", tmp_path / "run", "--out", tmp_path / "m.json", "--plot", tmp_path / "run" / "best.json"]
    result = _search(setting, *extra)
    assert "internal error" not in result.stderr, result.stderr
    assert result.exit_code in (1, 2)
    assert not (tmp_path / "x").exists() and not (tmp_path / "m.json").exists()


def _local_base_copy(tmp_path):
    """A fresh setting (its spec's base_model and the adapters' base are its local `base/`), and its tasks.yaml:
    writes into the base folder are seen without touching the module's setting."""
    fresh = build_text_setting(tmp_path / "fresh")
    return fresh, fresh.base, fresh.tasks_file


def test_eval_out_inside_the_local_base_model_is_refused(tmp_path):
    """`eval --tasks tasks.yaml --out BASE/report.json` (BASE: the spec's local base_model) wrote the report
    into the base model's folder (exit 0). README: a local base model is an input and no output goes inside
    an input; search-mask refuses the same --out ("is inside the input")."""
    setting, base, tasks = _local_base_copy(tmp_path)
    result = invoke_cli(["eval", "--adapters", *setting.adapter_args(), "--tasks", tasks, "--val-limit", "2",
                         "--threads", "1", "--quiet", "--out", base / "report.json"])
    assert not (base / "report.json").exists()
    _one_line_error(result)


@pytest.mark.parametrize("merger", ["regmean", "lambda auto"])
def test_merge_with_tasks_out_inside_the_local_base_model_is_refused(tmp_path, merger):
    """`merge --merger regmean --tasks tasks.yaml --out BASE/merged` (and `--lambda auto`) wrote the merge into
    the local base model's folder, which the command reads (exit 0). README lists a local base model among the
    inputs no output may go into; `task_inputs` (plan.py) protects only the spec and its data."""
    setting, base, tasks = _local_base_copy(tmp_path)
    method = ["--merger", "regmean"] if merger == "regmean" else ["--merger", "ta", "--lambda", "auto"]
    result = invoke_cli(["merge", "--adapters", *setting.adapter_args(), *method, "--tasks", tasks,
                         "--val-limit", "2", "--threads", "1", "--quiet", "--out", base / "merged"])
    assert not (base / "merged").exists()
    _one_line_error(result)


def test_eval_run_dir_never_writes_into_an_input_adapter(setting, tmp_path):
    """`eval ... --run-dir adapters/alpha` (a typo for runs/alpha) wrote scores.json into the input adapter's
    folder (exit 0); search-mask refuses the same --run-dir. eval's --run-dir is an output too."""
    adapter = shutil.copytree(setting.adapters["alpha"], tmp_path / "alpha")
    before = sorted(p.name for p in adapter.iterdir())
    adapters = [f"alpha={adapter}" if a.startswith("alpha=") else a for a in setting.adapter_args()]
    result = invoke_cli(["eval", "--adapters", *adapters, "--tasks", setting.tasks_file, "--val-limit", "2",
                         "--threads", "1", "--quiet", "--run-dir", adapter])
    assert sorted(p.name for p in adapter.iterdir()) == before
    _one_line_error(result)


def test_eval_out_onto_its_run_dir_s_score_cache_is_named_as_such(setting, tmp_path):
    (tmp_path / "er").mkdir()
    result = invoke_cli(["eval", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file, "--val-limit",
                         "2", "--threads", "1", "--quiet", "--run-dir", tmp_path / "er", "--out",
                         tmp_path / "er" / "scores.json"])
    _one_line_error(result)
    assert "the run-directory file" in result.stderr and "input" not in result.stderr


# --- refusals: one line, before the work, nothing left behind --------------------------------------------

def test_a_corrupt_base_model_is_one_line_and_leaves_no_run_dir(setting, tmp_path):
    """`search-mask --base BASE --run-dir R` where BASE/model.safetensors is truncated: `internal error:
    SafetensorError: Error while deserializing header` (eval and merge --merger regmean say the same), and R is
    left holding config.json and .lock. README: corrupt or truncated weights are one line (exit 1), and a search
    refused because its base does not load removes what it wrote in its run dir."""
    base = shutil.copytree(setting.base, tmp_path / "base")
    os.truncate(base / "model.safetensors", 100)
    run_dir = tmp_path / "run"
    result = _search(setting, "--base", base, "--run-dir", run_dir, "--out", tmp_path / "mask.json")
    _one_line_error(result)
    assert not (run_dir / "config.json").exists()


def test_ray_address_without_a_cluster_is_refused_before_the_model_loads(setting, tmp_path):
    """`search-mask ... --backend ray --ray-address auto` with no Ray cluster running: the base model loaded, the
    experts and the unpruned merge were scored (progress shown), and only then `cannot connect to the Ray cluster
    at auto`. CHANGELOG: the backend is checked before any model loads; the connection should be tried then."""
    pytest.importorskip("ray")
    result = invoke_cli(["search-mask", "--strategy", "screened",
                         "--adapters", *setting.adapter_args(), "--merger", "ta", "--tasks",
                         setting.tasks_file, "--popsize", "2", "--generations", "1", "--val-limit", "4",
                         "--threads", "1", "--backend", "ray", "--ray-address", "auto", "--out", tmp_path / "m.json"])
    assert result.exit_code == 1 and "cannot connect" in result.stderr, result.stderr
    assert "experts" not in result.stderr and "unpruned merge" not in result.stderr, result.stderr


def test_an_unreachable_ray_address_is_one_line_not_a_hang(setting, tmp_path):
    """`search-mask ... --backend ray --ray-address 127.0.0.1:1` (nothing listens there) hung for more than five
    minutes, printing Ray's "Failed to connect to GCS" warnings every few seconds, until Ctrl-C. It should be
    one line, exit 1, in seconds."""
    pytest.importorskip("ray")
    command = [sys.executable, "-m", "loramerge_cli", "search-mask", "--strategy", "screened",
                                                      "--adapters", *setting.adapter_args(),
               "--merger", "ta", "--tasks", str(setting.tasks_file), "--popsize", "2", "--generations", "1",
               "--val-limit", "4", "--threads", "1", "--quiet", "--backend", "ray", "--ray-address", "127.0.0.1:1",
               "--out", str(tmp_path / "m.json")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGINT)
        process.communicate(timeout=30)
        pytest.fail("still connecting after 60 s")
    assert process.returncode == 1 and "cannot connect" in stderr


def test_nsc_target_blocks_are_checked_before_the_model_loads(setting, tmp_path, monkeypatch):
    """`search-mask --strategy nsc --target-blocks 99`: the base model was loaded first, then `--target-blocks:
    '99' is no block with LoRA` (6 s against 0.6 s for other refusals; minutes on an 8B model). The blocks come
    from the adapters' module names: check them before any model loads."""
    from loramerge_cli.evaluation import engine

    def no_model(*args, **kwargs):
        raise AssertionError("the base model was loaded before --target-blocks was checked")

    monkeypatch.setattr(engine, "load_base", no_model)
    result = invoke_cli(["search-mask", "--adapters", *setting.adapter_args(), "--merger", "ta", "--tasks",
                         setting.tasks_file, "--val-limit", "4", "--threads", "1", "--quiet", "--strategy", "nsc",
                         "--target-blocks", "99", "--steps", "1", "--out", tmp_path / "c.json"])
    _one_line_error(result)
    assert "--target-blocks" in result.stderr


# --- output hygiene ----------------------------------------------------------------------------------

def test_quiet_screened_search_prints_no_library_warnings(setting, tmp_path):
    """`search-mask ... --popsize 4 --generations 4 --quiet` (the default screened strategy) printed cma's
    8-line `InjectionWarning: orphanated injected solution ... This could be a bug in the calling order` to
    stderr (the redraws call ask(1) one at a time). README: --quiet leaves only errors and the result."""
    command = [sys.executable, "-m", "loramerge_cli", "search-mask", "--strategy", "screened",
                                                      "--adapters", *setting.adapter_args(),
               "--merger", "ta", "--tasks", str(setting.tasks_file), "--popsize", "4", "--generations", "4",
               "--val-limit", "8", "--threads", "1", "--quiet", "--out", str(tmp_path / "m.json")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr


@pytest.mark.parametrize("flags", [["--strategy", "enmp", "--eta", "5"], ["--strategy", "greedy", "--no-screen"]])
def test_another_strategys_option_is_a_usage_error(setting, tmp_path, flags):
    """`search-mask --strategy enmp --eta 5` (or `--strategy greedy --no-screen`) ran the search and ignored the
    option silently (exit 0): the user believes halving was tuned. An option of another strategy should be a
    usage error (exit 2) before any work, as `--addscale` without enmp is."""
    result = _search(setting, *flags, "--out", tmp_path / "m.json")
    _one_line_error(result, code=2)
