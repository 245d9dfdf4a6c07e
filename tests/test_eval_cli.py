"""`loramerge eval`: JSON rows equal the engine's scores, tables for people, one-line errors."""

from __future__ import annotations

import json

import pytest
import typer
from eval_fixtures import build_text_setting, write_tasks_file
from typer.testing import CliRunner

from loramerge_cli.adapters.peft_reader import load_adapters
from loramerge_cli.cli import eval_cmd
from loramerge_cli.cli.common import LoramergeGroup
from loramerge_cli.evaluation.engine import EvalSettings, Evaluator
from loramerge_cli.evaluation.specs import load_task_file
from loramerge_cli.merging.merge import MergeConfig, merge


@pytest.fixture(scope="module")
def app():
    app = typer.Typer(cls=LoramergeGroup, rich_markup_mode=None)

    @app.callback()
    def root() -> None:
        """loramerge (test app)."""

    eval_cmd.register(app)
    return app


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    return build_text_setting(tmp_path_factory.mktemp("eval_cli"), rows=12)


def run(app, args):
    return CliRunner().invoke(app, args)


def test_json_rows_match_the_engine(app, setting, tmp_path):
    from loramerge_cli.adapters.writer import write_merged_adapter

    adapters = load_adapters(setting.adapter_args())
    result = merge(adapters, MergeConfig(merger="ties"))
    merged_folder = write_merged_adapter(result, adapters, tmp_path / "ties")
    args = ["eval", "--adapters", *setting.adapter_args(), "--tasks", str(setting.tasks_file),
            "--merged", f"ties={merged_folder}", f"alpha_copy={setting.adapters['alpha']}",
            "--threads", "1", "--batch-size", "4", "--run-dir", str(tmp_path / "run"), "--json"]
    outcome = run(app, args)
    assert outcome.exit_code == 0, outcome.stderr
    report = json.loads(outcome.stdout)
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["base", "experts", "ties", "alpha_copy"]
    assert report["tasks"] == ["alpha", "beta", "gamma"] and report["split"] == "validation"

    engine = Evaluator(load_task_file(setting.tasks_file), adapters, EvalSettings(threads=1))
    experts = {a.name: engine.score_adapter(a, [a.name])[a.name] for a in adapters}
    assert rows["base"]["accuracy"] == engine.score_base()
    assert rows["experts"]["accuracy"] == experts
    assert rows["ties"]["accuracy"] == engine.score_merged(result)
    for task, value in rows["ties"]["accuracy"].items():
        assert rows["ties"]["normalized_accuracy"][task] == pytest.approx(100 * value / experts[task])
    assert rows["ties"]["mean_accuracy"] == pytest.approx(sum(rows["ties"]["accuracy"].values()) / 3)
    assert rows["alpha_copy"]["normalized_accuracy"]["alpha"] == pytest.approx(100.0)
    assert rows["experts"]["mean_normalized_accuracy"] == pytest.approx(100.0)
    assert (tmp_path / "run" / "scores.json").is_file()

    again = run(app, args)  # served from the run directory's cache: same numbers
    assert again.exit_code == 0 and json.loads(again.stdout)["rows"] == report["rows"]


def test_tables_on_stdout_progress_on_stderr(app, setting, tmp_path):
    args = ["eval", "--adapters", *setting.adapter_args(), "--tasks", str(setting.tasks_file), "--split", "test",
            "--threads", "1"]
    outcome = run(app, [*args, "--out", str(tmp_path / "scores.json")])
    assert outcome.exit_code == 0, outcome.stderr
    assert "accuracy (%), test split" in outcome.stdout and "normalized accuracy (%)" in outcome.stdout
    assert "alpha (12)" in outcome.stdout
    assert "experts: 3/3" in outcome.stderr and "accuracy (%)" not in outcome.stderr  # progress, not results
    assert json.loads((tmp_path / "scores.json").read_text())["tasks"] == ["alpha", "beta", "gamma"]
    quiet = run(app, [*args, "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == "" and "accuracy (%), test split" in quiet.stdout


def test_errors_are_one_line(app, setting, tmp_path):
    bad = write_tasks_file(tmp_path / "tasks.yaml", {"tasks": [{"name": "alpha"}]})
    outcome = run(app, ["eval", "--adapters", *setting.adapter_args(), "--tasks", str(bad)])
    assert outcome.exit_code == 1
    assert outcome.stderr == f"error: {bad}: tasks[0].data: required field is missing\n"
    outcome = run(app, ["eval", "--adapters", f"alpha={setting.adapters['alpha']}", "--tasks",
                        str(setting.tasks_file)])
    assert outcome.exit_code == 1
    assert outcome.stderr.count("\n") == 1 and "tasks[1].name: no adapter named 'beta'" in outcome.stderr
    assert run(app, ["eval", "--adapters", "x"]).exit_code == 2  # usage: --tasks missing
    outcome = run(app, ["eval", "--adapters", "x", "--tasks", str(bad), "--out", str(tmp_path)])  # before the spec
    assert outcome.exit_code == 2 and outcome.stderr == f"error: --out {tmp_path} is a folder: give a file (missing " \
        "folders above it are made)\n"


def test_help_ends_with_worked_examples(app):
    outcome = run(app, ["eval", "--help"])
    assert outcome.exit_code == 0
    text = outcome.stdout
    assert "--val-limit" in text and "--merged" in text and "--run-dir" in text
    tail = text[text.index("Examples:"):]
    assert tail.count("loramerge eval --adapters") == 3


def test_registered_in_the_loramerge_app():
    from loramerge_cli.cli.app import app as loramerge_app

    outcome = CliRunner().invoke(loramerge_app, ["eval", "--help"])
    assert outcome.exit_code == 0 and "Examples:" in outcome.stdout
