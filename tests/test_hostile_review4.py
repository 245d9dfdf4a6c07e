"""A fourth hostile review (of main at 3742051; merge, apply-mask, inspect, eval): one test per defect, each
failing on that commit. Each docstring says what the user did, what happened and what should happen."""

from __future__ import annotations

import hashlib
import json
import os
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
    return build_text_setting(tmp_path_factory.mktemp("review4"))


def _merge(setting, out, *extra):
    return invoke_cli(["merge", "--adapters", *setting.adapter_args(), *extra, "--threads", "1", "--quiet",
                       "--out", out])


def _sha(folder: Path) -> str:
    return hashlib.sha256((Path(folder) / "adapter_model.safetensors").read_bytes()).hexdigest()


def _table(setting, tmp_path, name, tasks=("alpha", "beta", "gamma"), merger=None) -> Path:
    """A table of ones over the setting's two blocks (tasks in the order given), with `merger` recorded."""
    data = {"format": "loramerge.mask/v1", "tasks": list(tasks), "unit": "block",
            "units": ["model.layers.0", "model.layers.1"], "weights": [[1.0, 1.0] for _ in tasks]}
    if merger is not None:
        data["merger"] = merger
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def _one_line_error(result, code=1):
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr


# --- masks -------------------------------------------------------------------------------------------

def test_a_mask_in_another_task_order_reorders_its_per_adapter_density(setting, tmp_path):
    """A table searched with `--merger ties --density 0.9,0.5,0.3` on adapters gamma beta alpha records
    `"merger": {"merger": "ties", "density": [0.9, 0.5, 0.3]}`. The user merges it with `--adapters alpha beta
    gamma --mask mask.json`. align_table (masks.py) reorders the rows and the recorded `weights` by task name,
    but not the recorded per-adapter `density`: alpha is trimmed at gamma's 0.9 and gamma at alpha's 0.3
    (the summary even shows density=[0.9, 0.5, 0.3]). It should merge exactly as `--merger ties --density
    0.3,0.5,0.9` does (the same sha256)."""
    mask = _table(setting, tmp_path, "reversed", tasks=("gamma", "beta", "alpha"),
                  merger={"merger": "ties", "density": [0.9, 0.5, 0.3]})
    assert _merge(setting, tmp_path / "masked", "--mask", mask).exit_code == 0
    assert _merge(setting, tmp_path / "flags", "--merger", "ties", "--density", "0.3,0.5,0.9").exit_code == 0
    assert _sha(tmp_path / "masked") == _sha(tmp_path / "flags")


def test_a_masks_recorded_lambda_that_is_not_a_number_is_one_line(setting, tmp_path):
    """`merge --mask mask.json` where the table's merger record holds `"lambda": "x"` (hand-edited, or another
    tool's file) ended with `internal error: ValueError: could not convert string to float: 'x'`
    (plan.recorded_settings calls float() on it unchecked). It should be a one-line data error, exit 1,
    naming the mask (as a bad "density" or "seed" in the same record already is)."""
    mask = _table(setting, tmp_path, "lam", merger={"merger": "ta", "lambda": "x"})
    _one_line_error(_merge(setting, tmp_path / "out", "--mask", mask), code=1)
    assert not (tmp_path / "out").exists()


def test_a_masks_recorded_isotropize_false_string_does_not_isotropize(setting, tmp_path):
    """A table whose merger record holds `"isotropize": "false"` (a string, as some tools write booleans)
    merged with `isotropize=True` (the summary shows it): any non-empty string is taken as true. It should
    be refused (exit 1: the record's value is not a boolean) or, at least, not flatten the spectrum."""
    mask = _table(setting, tmp_path, "iso", merger={"merger": "ties", "isotropize": "false"})
    result = _merge(setting, tmp_path / "masked", "--mask", mask)
    if result.exit_code == 1:
        return
    assert result.exit_code == 0, result.stderr
    assert _merge(setting, tmp_path / "plain", "--merger", "ties").exit_code == 0
    assert _sha(tmp_path / "masked") == _sha(tmp_path / "plain")


def test_a_bad_value_in_a_masks_merger_record_is_a_data_error(setting, tmp_path):
    """`merge --mask mask.json` (no flags) where the table records `"density": 5` answered `error: --density
    must be <= 1.0 (got 5)`, exit 2: a usage error blaming a flag the user never gave. README's table: a mask
    that cannot be used is exit 1 (like a NaN in its weights). It should exit 1 and name the mask file."""
    mask = _table(setting, tmp_path, "dens", merger={"merger": "ties", "density": 5})
    result = _merge(setting, tmp_path / "out", "--mask", mask)
    _one_line_error(result, code=1)
    assert str(mask.name) in result.stderr


# --- recipes -----------------------------------------------------------------------------------------

def _recipe(setting, tmp_path, beta_entry: str, merger="ties") -> Path:
    a = setting.adapters
    path = tmp_path / "recipe.yaml"
    path.write_text(f"adapters:\n  alpha: {a['alpha']}\n  beta: {{path: {a['beta']}, {beta_entry}}}\n"
                    f"  gamma: {a['gamma']}\nmerger: {merger}\n")
    return path


def test_a_recipe_weight_that_is_not_a_number_is_one_line_not_a_traceback(setting, tmp_path):
    """A hand-written recipe (README, Recipes) with `beta: {path: adapters/beta, weight: abc}` and `loramerge
    merge --config recipe.yaml --out merged/` printed a full Python traceback (`ValueError: could not convert
    string to float: 'abc'` in cli/recipe.py _adapter_map), not even the "internal error" line. It should be
    one line naming the recipe and the adapter (exit 2, as the recipe's other bad values are)."""
    recipe = _recipe(setting, tmp_path, "weight: abc")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "loramerge_cli", "merge", "--config", str(recipe), "--out",
                             str(tmp_path / "out"), "--threads", "1", "--quiet"],
                            capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode in (1, 2), result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_recipe_takes_one_density_per_adapter_as_the_command_line_does(setting, tmp_path):
    """`merge --help` says a recipe's `adapters` map each task "to path, weight, density", and README says
    `--density` takes one value or one per adapter (`--density 0.3,0.5,0.9` works). A recipe giving each
    adapter its own density (`alpha: {path: …, density: 0.3}`, …) is refused: "per-adapter density must be
    the same for every adapter (the mergers trim all tasks at one density)", which README contradicts. It
    should merge as `--merger ties --density 0.3,0.5,0.9` does."""
    a = setting.adapters
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"adapters:\n  alpha: {{path: {a['alpha']}, density: 0.3}}\n"
                      f"  beta: {{path: {a['beta']}, density: 0.5}}\n  gamma: {{path: {a['gamma']}, density: 0.9}}\n"
                      "merger: ties\n")
    result = invoke_cli(["merge", "--config", recipe, "--out", tmp_path / "recipe", "--threads", "1", "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert _merge(setting, tmp_path / "flags", "--merger", "ties", "--density", "0.3,0.5,0.9").exit_code == 0
    assert _sha(tmp_path / "recipe") == _sha(tmp_path / "flags")


# --- what is never done to your files ----------------------------------------------------------------

def test_eval_force_never_replaces_the_weight_table_inside_a_merged_folder(setting, tmp_path):
    """`merge --indices "[0, 4]" --out merged/` writes merged/mask.json, which merged/loramerge.yaml names.
    `eval ... --merged other/ --out merged/mask.json --force` (a slip for scores.json) replaced it with the eval report
    (exit 0): `merge --config merged/loramerge.yaml` now fails ("not a loramerge mask"). README protects a
    merge's loramerge.json even with --force; the table of a merged folder is part of that output and should
    be refused the same way (exit 1, file unchanged) — or at least an eval report should only replace an
    eval report (outputs.py _check_replaceable: match the file's format to the writer's kind)."""
    merged, other = tmp_path / "merged", tmp_path / "other"
    assert _merge(setting, merged, "--indices", "[0, 4]").exit_code == 0
    assert _merge(setting, other, "--merger", "ta").exit_code == 0
    before = (merged / "mask.json").read_bytes()
    result = invoke_cli(["eval", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                         "--merged", other, "--val-limit", "2", "--threads", "1", "--quiet",
                         "--out", merged / "mask.json", "--force"])
    assert result.exit_code == 1, result.stderr
    assert (merged / "mask.json").read_bytes() == before


def test_eval_refuses_two_merges_with_the_same_name(setting, tmp_path):
    """`eval ... --merged x=merged_a/ x=merged_b/` printed two rows both named `x` (and `rows` in the JSON
    report with two "x"), so nobody can tell which is which; inspect and merge refuse two adapters with one
    name ("name them with name=source"). eval should refuse duplicate --merged names the same way (exit 1 or
    2, one line)."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert _merge(setting, one, "--merger", "ta").exit_code == 0
    assert _merge(setting, two, "--merger", "ties").exit_code == 0
    result = invoke_cli(["eval", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                         "--merged", f"x={one}", f"x={two}", "--val-limit", "2", "--threads", "1", "--quiet"])
    assert result.exit_code in (1, 2), result.stdout
    assert "internal error" not in result.stderr
