"""The everyday experience: Hub-ready cards, recipes that rebuild bit for bit, stdout/stderr, progress, plots."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import yaml
from factories import invoke_cli, write_task_folders

from loramerge_cli.adapters.card import hub_base_model, is_hub_id, portable_command
from loramerge_cli.cli.progress import ProgressDisplay, duration, eta
from loramerge_cli.events import stage

ABSOLUTE = re.compile(r"(?<![\w.])/(?:tmp|home|root|work|private|var|Users)/")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_task_folders(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def sources(folders):
    return [f"{name}={folders[name]}" for name in "abc"]


def _ok(args):
    result = invoke_cli(args)
    assert result.exit_code == 0, result.stderr
    return result


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _text_files(folder: Path):
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".yaml"):
            yield path


def test_hub_ids_and_portable_commands(tmp_path):
    assert is_hub_id("org/base") and is_hub_id("gpt2")
    assert not is_hub_id(str(tmp_path)) and not is_hub_id("./base") and not is_hub_id("a/b/c") and not is_hub_id("")
    assert hub_base_model(str(tmp_path), "org/base") == "org/base" and hub_base_model(str(tmp_path)) is None
    command = portable_command(f"loramerge merge --adapters a={tmp_path}/a {tmp_path}/b --out={tmp_path}/m", tmp_path)
    assert command == "loramerge merge --adapters a=a b --out=m"


def test_card_metadata_parses_and_names_no_local_path(folders, sources, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "merged"
    _ok(["merge", "--adapters", *sources, "--merger", "ties", "--out-rank", "2", "--out", out, "--quiet"])
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "tiny/base" and card.data.library_name == "peft"
    assert "loramerge" in card.data.tags
    assert "## Recipe" in card.text and "loramerge merge --config loramerge.yaml" in card.text
    assert "Truncated: " in card.text and "AutoPeftModelForSequenceClassification" in card.text
    for path in _text_files(out):
        assert not ABSOLUTE.search(path.read_text()), path
        assert str(tmp_path) not in path.read_text(), path


def test_local_base_is_left_out_of_the_card_with_a_note(folders, sources, tmp_path):
    from huggingface_hub import ModelCard

    base = tmp_path / "base-model"
    base.mkdir()
    out = tmp_path / "merged"
    _ok(["merge", "--adapters", *sources, "--base", base, "--out", out, "--quiet"])
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is None and "a local model, not a Hub id" in card.text
    for path in _text_files(out):
        if path.name != "adapter_config.json":  # PEFT loads the base from there: it keeps what --base said
            assert str(tmp_path) not in path.read_text(), path
    again = tmp_path / "hub"
    _ok(["merge", "--adapters", *sources, "--base", "org/other-base", "--out", again, "--quiet"])
    assert ModelCard.load(again / "README.md").data.base_model == "org/other-base"


def test_seq_cls_merge_has_a_loadable_task_type_and_every_head(sources, tmp_path):
    out = tmp_path / "m"
    _ok(["merge", "--adapters", *sources, "--out", out, "--quiet"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]  # task a's, the first
    assert sorted(p.name for p in (out / "heads").iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors"]
    _ok(["merge", "--adapters", *sources, "--out", tmp_path / "h", "--head", "b", "--quiet"])
    config = json.loads((tmp_path / "h" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]


@pytest.mark.parametrize("extra", [[], ["--merger", "dare_ties", "--density", "0.6", "--seed", "4",
                                        "--weights", "1,0.5,2"]])
def test_merge_recipe_rebuilds_bit_for_bit(sources, tmp_path, extra):
    out = tmp_path / "merged"
    _ok(["merge", "--adapters", *sources, *extra, "--out", out, "--quiet"])
    recipe = yaml.safe_load((out / "loramerge.yaml").read_text())
    assert set(recipe["adapters"]) == {"a", "b", "c"}
    assert all(not os.path.isabs(str(v if isinstance(v, str) else v["path"])) for v in recipe["adapters"].values())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = os.getcwd()
    try:
        os.chdir(elsewhere)  # paths are relative to the recipe, not to the working directory
        _ok(["merge", "--config", out / "loramerge.yaml", "--out", tmp_path / "again", "--quiet"])
    finally:
        os.chdir(cwd)
    again = tmp_path / "again"
    assert _sha(again / "adapter_model.safetensors") == _sha(out / "adapter_model.safetensors")
    assert (again / "loramerge.yaml").read_text() == (out / "loramerge.yaml").read_text()


def _mask(tmp_path, folders) -> Path:
    from loramerge_cli import api

    loaded = api.load_adapters([str(folders[name]) for name in "cab"])
    table = api.from_pruned_indices(loaded, [0, 4, 5])
    path = tmp_path / "mask.json"
    table.save(path)
    return path


def test_merge_mask_matches_tasks_by_name_and_rebuilds(folders, sources, tmp_path):
    mask = _mask(tmp_path, folders)  # tasks c, a, b: another order than the adapters'
    out = tmp_path / "merged"
    _ok(["merge", "--adapters", *sources, "--mask", mask, "--out", out, "--quiet"])
    assert json.loads((out / "mask.json").read_text())["tasks"] == ["a", "b", "c"]
    assert yaml.safe_load((out / "loramerge.yaml").read_text())["mask"] == "mask.json"
    _ok(["merge", "--config", out / "loramerge.yaml", "--out", tmp_path / "again", "--quiet"])
    assert _sha(tmp_path / "again" / "adapter_model.safetensors") == _sha(out / "adapter_model.safetensors")


def test_apply_mask_recipe_rebuilds_bit_for_bit(folders, sources, tmp_path):
    mask = _mask(tmp_path, folders)
    out = tmp_path / "pruned"
    _ok(["apply-mask", "--adapters", *sources, "--mask", mask, "--out", out, "--quiet"])
    _ok(["apply-mask", "--config", out / "loramerge.yaml", "--out", tmp_path / "again", "--quiet"])
    for name in "abc":
        weights = Path(name, "adapter_model.safetensors")
        assert _sha(out / weights) == _sha(tmp_path / "again" / weights)
    for path in _text_files(out):
        assert str(tmp_path) not in path.read_text(), path


def test_config_maps_adapters_with_per_adapter_weights(folders, tmp_path):
    config = tmp_path / "conf" / "merge.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({
        "adapters": {"a": os.path.relpath(folders["a"], config.parent),
                     "b": {"path": os.path.relpath(folders["b"], config.parent), "weight": 0.5}},
        "merger": "ta",
    }))
    _ok(["merge", "--config", config, "--out", tmp_path / "m", "--quiet"])
    provenance = json.loads((tmp_path / "m" / "loramerge.json").read_text())
    assert provenance["parameters"]["weights"] == [1.0, 0.5]
    assert [record["name"] for record in provenance["inputs"]] == ["a", "b"]
    sources_only = tmp_path / "conf" / "inspect.yaml"
    sources_only.write_text(yaml.safe_dump({"adapters": yaml.safe_load(config.read_text())["adapters"]}))
    inspected = _ok(["inspect", "--config", sources_only, "--json"])
    assert [row["name"] for row in json.loads(inspected.stdout)["adapters"]] == ["a", "b"]
    config.write_text(yaml.safe_dump({"adapters": {"a": {"path": "x", "density": 0.2}, "b": "y"}}))
    result = invoke_cli(["merge", "--config", config, "--out", tmp_path / "n"])
    assert result.exit_code == 2 and "density for every adapter" in result.stderr  # one per adapter, or none


def test_inspect_takes_adapters_positional_or_as_option(folders):
    positional = _ok(["inspect", str(folders["a"]), str(folders["b"]), "--json"])
    option = _ok(["inspect", "--adapters", str(folders["a"]), str(folders["b"]), "--json"])
    assert json.loads(positional.stdout) == json.loads(option.stdout)
    assert invoke_cli(["inspect"]).exit_code == 2


def test_push_to_hub_dry_run_lists_the_files(sources, tmp_path):
    out = tmp_path / "m"
    result = _ok(["merge", "--adapters", *sources, "--out", out, "--push-to-hub", "me/merged", "--private",
                  "--dry-run", "--json"])
    push = json.loads(result.stdout)["push"]
    assert push["dry_run"] and push["repo_id"] == "me/merged" and push["private"]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "loramerge.yaml",
            "heads/a.safetensors"} <= set(push["files"])
    human = _ok(["merge", "--adapters", *sources, "--out", tmp_path / "h", "--push-to-hub", "me/merged",
                 "--dry-run"])
    assert "would upload to me/merged" in human.stdout and "adapter_model.safetensors" in human.stdout
    card = (tmp_path / "h" / "README.md").read_text().replace("'", '"')
    assert 'from_pretrained("me/merged", num_labels=3)' in card  # the tiny heads' 3 classes
    bad = invoke_cli(["merge", "--adapters", *sources, "--out", tmp_path / "x", "--push-to-hub", "/not/a/repo"])
    assert bad.exit_code == 1 and "owner/name" in bad.stderr and not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", ["merge", "inspect", "apply-mask"])
def test_results_on_stdout_and_quiet_leaves_only_them(folders, sources, tmp_path, command):
    args = {"merge": ["merge", "--adapters", *sources, "--out", tmp_path / "m"],
            "inspect": ["inspect", *sources],
            "apply-mask": ["apply-mask", "--adapters", *sources, "--indices", "[0]", "--out", tmp_path / "p"]}[command]
    loud = _ok(args)
    assert loud.stdout.strip()
    quiet = _ok([*args, "--quiet", "--force"] if command != "inspect" else [*args, "--quiet"])
    assert quiet.stderr == "" and quiet.stdout.strip()


def test_plain_progress_lines_with_eta(capsys):
    from rich.console import Console

    console = Console(stderr=True, force_terminal=False, width=200)
    display = ProgressDisplay(console=console, interval=0.0)
    with display, stage(display, "λ grid", 3) as step:
        for value in (0.1, 0.2, 0.3):
            step(f"λ {value}")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "λ grid: 3 steps"
    assert lines[1].startswith("λ grid: 1/3, 0s elapsed, eta ") and lines[1].endswith("λ 0.1")
    assert lines[3].startswith("λ grid: 3/3") and "eta" not in lines[3]
    quiet = ProgressDisplay(quiet=True, console=console)
    with quiet, stage(quiet, "x", 2) as step:
        step()
    assert capsys.readouterr().err == ""
    assert duration(5) == "5s" and duration(125) == "2m05s" and duration(3720) == "1h02m"
    assert eta(0.0, 2, 10, now=4.0) == "16s" and eta(0.0, 0, 10) == "?" and eta(0.0, 1, None) is None


def test_help_is_free_of_jargon_and_completion_is_offered():
    for command in ("merge", "search-mask", "apply-mask", "inspect", "eval"):
        text = invoke_cli([command, "--help"]).stdout
        for jargon in ("Part A", "Σ r_t", "⌊", "<list[str]>", "LIST[STR]"):
            assert jargon not in text, (command, jargon)
    assert "--install-completion" in invoke_cli(["--help"]).stdout
    for command in ("merge", "search-mask", "apply-mask", "inspect", "eval"):
        assert "--threads" in invoke_cli([command, "--help"]).stdout, command


def test_plots_are_readable(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from loramerge_cli.masks import WeightTable
    from loramerge_cli.search.plots import fitness_figure, mask_figure, search_title

    table = WeightTable(tasks=["a", "b"], units=[f"model.layers.{i}" for i in range(12)],
                        weights=[[1] * 12, [1, 0] * 6], merger={"merger": "ta", "lambda": 0.4},
                        provenance={"seed": 3})
    title = search_title(table)
    assert title == "ta, λ 0.4, seed 3"
    history = [{"generation": g, "best_fitness": 0.5 * g, "mean_fitness": -1.0 + g} for g in (1, 2, 3)]
    figure = fitness_figure(history, title)
    axis = figure.axes[0]
    assert all(float(tick).is_integer() for tick in axis.get_xticks())
    assert axis.lines[1].get_marker() == "o" and title in axis.get_title()
    assert any(line.get_ydata()[0] == 0 for line in axis.lines)  # the zero line
    figure = mask_figure(table, title)
    axis = figure.axes[0]
    assert [label.get_text() for label in axis.get_xticklabels()] == [f"layers.{i}" for i in range(12)]
    assert [text.get_text() for text in axis.get_legend().get_texts()] == ["kept", "pruned"]
    assert "6 of 24 pruned" in axis.get_title()


def test_use_snippets_compile():
    from loramerge_cli.adapters.card import _use_snippet

    for task_type in (None, "SEQ_CLS", "CAUSAL_LM"):
        for base in (None, "org/base"):
            lines = _use_snippet(task_type, base, "me/merged", None, False, num_labels=4)
            code = "\n".join(lines[lines.index("```python") + 1:lines.index("```")])
            compile(code, "snippet", "exec")
            assert "me/merged" in code
            assert ("num_labels=4" in code) == (task_type == "SEQ_CLS")  # the head's classes, for classifiers


def test_threads_only_when_asked(sources, tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _ok(["merge", "--adapters", *sources, "--out", tmp_path / "a", "--quiet"])
        assert torch.get_num_threads() == 2  # no --threads: the environment's choice stands
        _ok(["merge", "--adapters", *sources, "--out", tmp_path / "b", "--quiet", "--threads", "1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_push_failure_is_one_line_and_keeps_the_folder(sources, tmp_path, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants

    def unreachable(*args, **kwargs):
        raise OSError("Cannot reach https://huggingface.co: connection refused")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # online, but the Hub does not answer
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", unreachable)
    result = invoke_cli(["merge", "--adapters", *sources, "--out", tmp_path / "m", "--push-to-hub", "me/merged"])
    *warnings, error = result.stderr.splitlines()  # the warnings: local paths the upload would publish
    assert result.exit_code == 1 and error.startswith("error: --push-to-hub me/merged: upload failed")
    assert all(line.startswith("warning: ") for line in warnings)
    assert (tmp_path / "m" / "adapter_model.safetensors").is_file()


def test_push_in_offline_mode_is_refused_before_any_work(sources, tmp_path, monkeypatch):
    """With HF_HUB_OFFLINE=1, `merge --push-to-hub` merged and wrote the folder, then failed to upload: the offline
    mode is known before any work. `--dry-run` (which uploads nothing) still runs."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    result = invoke_cli(["merge", "--adapters", *sources, "--out", tmp_path / "m", "--push-to-hub", "me/merged"])
    assert result.exit_code == 1 and "offline mode" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "m").exists()
    _ok(["merge", "--adapters", *sources, "--out", tmp_path / "d", "--push-to-hub", "me/merged", "--dry-run",
         "--quiet"])


def test_the_use_snippet_names_the_head_s_classes():
    """The bundled text heads have 4 classes and the base config names none: `AutoPeftModel…from_pretrained`
    as the card showed it failed with a size mismatch (4 × 64 against the default 2 × 64)."""
    from types import SimpleNamespace

    import torch

    from loramerge_cli.adapters.card import head_classes

    adapters = [SimpleNamespace(name="a", heads={"score.weight": torch.zeros(4, 8)}),
                SimpleNamespace(name="b", heads={"classifier.dense.weight": torch.zeros(8, 8),
                                                 "classifier.out_proj.weight": torch.zeros(3, 8)})]
    assert head_classes(adapters, "a") == 4
    assert head_classes(adapters, "b") == 3  # RoBERTa's two layers: the one non-square matrix is the output
    # (this said None, "which is the output is not known", and the card's snippet then failed to load)
    assert head_classes(adapters, None) is None and head_classes(adapters, "c") is None
