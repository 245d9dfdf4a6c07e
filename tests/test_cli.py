"""The loramerge command line: merge, inspect, apply-mask, --config, --json, masks, help."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from factories import invoke_cli, random_adapter, write_peft_folder

from loramerge_cli import api
from loramerge_cli.adapters.peft_reader import load_adapter, load_adapters
from loramerge_cli.cli.common import spread_multi_values
from loramerge_cli.masks import ones_table
from loramerge_cli.merging.merge import MergeConfig, merge


def _deltas(folder) -> dict[str, torch.Tensor]:
    adapter = load_adapter(str(folder))
    return {path: module.delta() for path, module in adapter.modules.items()}


def _assert_same_deltas(first, second, rtol=1e-6):
    one, two = _deltas(first), _deltas(second)
    assert one.keys() == two.keys()
    for path in one:
        assert torch.allclose(one[path], two[path], rtol=rtol, atol=1e-7), path


def _ok(args):
    result = invoke_cli(args)
    assert result.exit_code == 0, result.stderr
    return result


def test_spread_multi_values():
    assert spread_multi_values(["merge", "--adapters", "a", "b", "c", "--out", "o"]) == [
        "merge", "--adapters", "a", "--adapters", "b", "--adapters", "c", "--out", "o"]
    assert spread_multi_values(["merge", "--adapters=a", "b", "--json"]) == [
        "merge", "--adapters=a", "--adapters", "b", "--json"]
    assert spread_multi_values(["inspect", "a", "b"]) == ["inspect", "a", "b"]
    assert spread_multi_values(["merge", "--adapters", "a", "--", "b"]) == ["merge", "--adapters", "a", "--", "b"]


@pytest.mark.parametrize("args, says", [
    (["search-mask", "--strategy", "bogus"], "'bogus' is not one of"),
    (["merge", "--bogus"], "No such option: --bogus"),
    (["bogus"], "No such command 'bogus'"),
    (["--bogus"], "No such option: --bogus"),
    (["search-mask", "--budget", "x"], "Invalid value for '--budget'"),
    (["merge", "--lambda"], "'--lambda' requires an argument. (see 'loramerge merge -h')"),
])
def test_click_s_usage_errors_are_one_line_and_exit_2(args, says):
    result = invoke_cli(args)
    assert result.exit_code == 2 and says in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert "Value error" not in result.stderr


@pytest.mark.parametrize("help_flag", ["--help", "-h"])
def test_help_comes_before_a_broken_recipe(tmp_path, help_flag):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("bad: [")
    result = invoke_cli(["merge", "--config", recipe, help_flag])
    assert result.exit_code == 0 and "Usage: loramerge merge" in result.output, result.output


def test_loramerge_alone_still_prints_the_help():
    result = invoke_cli([])
    assert "Usage: loramerge" in result.output and "search-mask" in result.output and "error:" not in result.output


def test_merge_writes_every_file_and_matches_the_library(folders, sources, tmp_path):
    out = tmp_path / "merged"
    _ok(["merge", "--adapters", *sources, "--merger", "knots", "--out", out, "--head", "a", "--quiet"])
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "heads", "loramerge.json", "loramerge.yaml"]
    assert sorted(p.name for p in (out / "heads").iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors"]
    provenance = json.loads((out / "loramerge.json").read_text())
    assert provenance["command"].startswith("loramerge merge --adapters ")
    assert provenance["parameters"]["density"] == 0.9 and provenance["space"] == "knots"
    expected = merge(load_adapters(sources), MergeConfig(merger="knots"))
    written = load_adapter(str(out))
    assert set(written.modules) == set(expected.modules)
    for path, module in expected.modules.items():
        assert torch.allclose(written.modules[path].delta(), module.lora_B @ module.lora_A, rtol=1e-5, atol=1e-6)
    assert written.heads.keys() == {"score.weight"}


def test_adapters_after_one_flag_equal_repeated_flags(sources, tmp_path):
    _ok(["merge", "--adapters", *sources, "--merger", "ties", "--density", "0.5", "--out", tmp_path / "one"])
    repeated = [token for source in sources for token in ("--adapters", source)]
    _ok(["merge", *repeated, "--merger", "ties", "--density", "0.5", "--out", tmp_path / "many"])
    _assert_same_deltas(tmp_path / "one", tmp_path / "many", rtol=0)


def test_config_yaml_equals_flags_and_flags_win(sources, tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text(
        "adapters: [" + ", ".join(sources) + "]\nmerger: dare_ties\ndrop_rate: 0.3\nknots-scaled: false\n"
        "seed: 7\nweights: [1, 0.5, 2]\nlambda: 0.8\nout: " + str(tmp_path / "from_yaml") + "\n"
    )
    _ok(["merge", "--config", config])
    _ok(["merge", "--adapters", *sources, "--merger", "dare_ties", "--drop-rate", "0.3", "--seed", "7",
         "--weights", "1,0.5,2", "--lambda", "0.8", "--out", tmp_path / "from_flags"])
    _assert_same_deltas(tmp_path / "from_yaml", tmp_path / "from_flags", rtol=0)
    _ok(["merge", "--config", config, "--seed", "8", "--out", tmp_path / "seed8"])
    assert json.loads((tmp_path / "seed8" / "loramerge.json").read_text())["seed"] == 8
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_flag: 1\n")
    result = invoke_cli(["merge", "--config", bad, "--adapters", *sources, "--out", tmp_path / "x"])
    assert result.exit_code == 2 and "no_such_flag" in result.stderr


def test_json_output_parses_and_goes_alone_to_stdout(sources, tmp_path):
    result = _ok(["merge", "--adapters", *sources, "--merger", "ties", "--out-rank", "3", "--out", tmp_path / "m",
                  "--json"])
    report = json.loads(result.stdout)
    assert report["method"] == "ties" and report["ranks"] == {"3": 7} and report["modules"] == 7
    assert report["max_truncation_error"] > 0
    assert result.stderr == ""


def test_inspect_json_norms_equal_dense_norms(folders, sources):
    result = _ok(["inspect", *sources, "--json"])
    summary = json.loads(result.stdout)
    norms = summary["norms"]
    assert norms["tasks"] == ["a", "b", "c"]
    assert norms["units"] == ["model.layers.0", "model.layers.1", "model.layers.2", "pooler.dense"]
    for task, name in enumerate("abc"):
        adapter = load_adapter(str(folders[name]))
        for row, unit in enumerate(norms["units"]):
            dense = [m.delta() for m in adapter.modules.values() if (m.unit or m.path) == unit]
            expected = float(torch.sqrt(sum(torch.linalg.matrix_norm(d) ** 2 for d in dense)))
            assert norms["values"][row][task] == pytest.approx(expected, rel=1e-10)
    assert [a["ranks"] for a in summary["adapters"]] == [{"2": 7}, {"3": 7}, {"4": 7}]
    assert summary["adapters"][0]["task_type"] == "SEQ_CLS" and summary["adapters"][0]["heads"] == ["score"]
    assert summary["merge_refusals"] == []
    human = _ok(["inspect", *sources, "--heatmap"])
    assert "model.layers.2" in human.stdout and "merge would refuse: nothing" in human.stdout


def test_apply_mask_writes_the_masked_adapters(folders, sources, tmp_path):
    adapters = load_adapters(sources)
    table = ones_table(adapters)
    table.weights[0][1] = 0.0
    table.weights[2][0] = 0.25
    table.save(tmp_path / "mask.json")
    _ok(["apply-mask", "--adapters", *sources, "--mask", tmp_path / "mask.json", "--out", tmp_path / "pruned"])
    assert sorted(p.name for p in (tmp_path / "pruned").iterdir()) == ["a", "b", "c", "loramerge.yaml", "mask.json"]
    for index, adapter in enumerate(adapters):
        written = load_adapter(str(tmp_path / "pruned" / adapter.name))
        expected = api.apply_table(adapter, table, index)
        assert written.modules.keys() == expected.modules.keys()
        for path, module in expected.modules.items():
            assert torch.allclose(written.modules[path].delta(), module.delta(), rtol=1e-6)
        assert torch.equal(written.heads["score.weight"], adapter.heads["score.weight"])
    assert "model.layers.1.self_attn.q_proj" not in load_adapter(str(tmp_path / "pruned" / "a")).modules
    # the same pruning as flat indices i = u·T + t
    _ok(["apply-mask", "--adapters", *sources, "--indices", "[3]", "--out", tmp_path / "by_index"])
    _assert_same_deltas(tmp_path / "by_index" / "a", tmp_path / "pruned" / "a", rtol=0)


def test_mask_round_trip(sources, tmp_path):
    adapters = load_adapters(sources)
    # constant rows: the table acts like per-adapter weights
    table = ones_table(adapters)
    table.weights = [[0.5] * 3, [2.0] * 3, [1.0] * 3]
    table.save(tmp_path / "weights.json")
    _ok(["merge", "--adapters", *sources, "--mask", tmp_path / "weights.json", "--out", tmp_path / "masked"])
    _ok(["merge", "--adapters", *sources, "--weights", "0.5,2,1", "--out", tmp_path / "weighted"])
    _ok(["merge", "--adapters", *sources, "--out", tmp_path / "plain"])
    masked, weighted, plain = (_deltas(tmp_path / name) for name in ("masked", "weighted", "plain"))
    for path in masked:  # a module outside every block cannot be masked (docs/algorithms.md, Inputs)
        expected = plain[path] if path == "pooler.dense" else weighted[path]
        assert torch.allclose(masked[path], expected, rtol=1e-6, atol=1e-7), path
    # a searched 0/1 table, saved and reloaded, equals the library merge; the flat-index form too
    table = ones_table(adapters)
    table.weights[1][0] = table.weights[2][0] = 0.0  # block 0: only a is left
    table.weights[0][2] = 0.0
    table.merger = {"merger": "tsv", "method": "tsv", "space": "full", "lambda": 0.6}
    table.save(tmp_path / "mask.json")
    assert api.load_table(tmp_path / "mask.json").to_json() == table.to_json()
    _ok(["merge", "--adapters", *sources, "--mask", tmp_path / "mask.json", "--out", tmp_path / "pruned"])
    expected = merge(adapters, MergeConfig(merger="tsv", lam=0.6), table)
    written = load_adapter(str(tmp_path / "pruned"))
    for path, module in expected.modules.items():
        assert torch.allclose(written.modules[path].delta(), module.lora_B @ module.lora_A, rtol=1e-5, atol=1e-6)
    only_a = adapters[0].modules["model.layers.0.self_attn.q_proj"].delta()
    assert torch.allclose(written.modules["model.layers.0.self_attn.q_proj"].delta(), 0.6 * only_a, rtol=1e-5)
    indices = json.dumps([0 * 3 + 1, 0 * 3 + 2, 2 * 3 + 0])
    _ok(["merge", "--adapters", *sources, "--indices", indices, "--merger", "tsv", "--lambda", "0.6",
         "--out", tmp_path / "indexed"])
    _assert_same_deltas(tmp_path / "indexed", tmp_path / "pruned")


def test_mask_reuses_recorded_settings_and_refuses_conflicts(sources, tmp_path):
    adapters = load_adapters(sources)
    table = ones_table(adapters)
    table.merger = {"merger": "knots", "method": "ties", "space": "knots", "density": 0.6, "scope": "module"}
    table.scale = 1.5
    table.save(tmp_path / "mask.json")
    _ok(["merge", "--adapters", *sources, "--mask", tmp_path / "mask.json", "--out", tmp_path / "m"])
    parameters = json.loads((tmp_path / "m" / "loramerge.json").read_text())["parameters"]
    assert parameters["density"] == 0.6 and parameters["space"] == "knots" and parameters["lambda"] == 1.5
    conflict = invoke_cli(["merge", "--adapters", *sources, "--mask", tmp_path / "mask.json", "--density", "0.9",
                           "--out", tmp_path / "c"])
    assert conflict.exit_code == 2 and "--override" in conflict.stderr and not (tmp_path / "c").exists()
    _ok(["merge", "--adapters", *sources, "--mask", tmp_path / "mask.json", "--density", "0.9", "--override",
         "--lambda", "0.5", "--out", tmp_path / "o"])
    parameters = json.loads((tmp_path / "o" / "loramerge.json").read_text())["parameters"]
    assert parameters["density"] == 0.9 and parameters["lambda"] == 0.5


def test_force_replaces_output(sources, tmp_path):
    out = tmp_path / "m"
    _ok(["merge", "--adapters", *sources, "--out", out])
    _ok(["merge", "--adapters", *sources, "--merger", "tsv", "--out", out, "--force"])
    assert json.loads((out / "loramerge.json").read_text())["method"] == "tsv"


def test_merge_options_come_from_the_registry():
    """--merger choices and one option per method parameter, generated from the (torch-free) registry."""
    import inspect

    from loramerge_cli.cli.app import app  # noqa: F401  (registers the commands)
    from loramerge_cli.cli.merge_cmd import merge_command
    from loramerge_cli.merging.registry import PARAMETERS, merger_names

    assert set(PARAMETERS) <= set(inspect.signature(merge_command).parameters)
    text = _ok(["merge", "--help"]).stdout
    assert all(name in text for name in merger_names())


def test_evaluation_and_search_options_take_the_settings_dataclasses_defaults():
    """The command line and the library start from the same numbers: each option of a settings field has the
    field's default, and the fields one flag feeds (--seed, --batch-size) agree across the dataclasses."""
    import dataclasses
    import inspect
    import typing

    from loramerge_cli.cli.app import app  # noqa: F401  (registers the commands)
    from loramerge_cli.cli.eval_cmd import eval_command
    from loramerge_cli.cli.search_cmd import search_command
    from loramerge_cli.evaluation.settings import EvalSettings
    from loramerge_cli.search.enmp_settings import EnmpSettings
    from loramerge_cli.search.nsc_settings import NscSettings

    def defaults(settings) -> dict:
        return {field.name: field.default for field in dataclasses.fields(settings)}

    def flag_defaults(command) -> dict:
        return {name: parameter.default for name, parameter in inspect.signature(command).parameters.items()}

    search, evaluation = flag_defaults(search_command), flag_defaults(eval_command)
    shown = {"eval_dtype": "dtype"}  # flag -> EvalSettings field, where the names differ
    checked = 0
    for settings, flags in ((EvalSettings, search), (EvalSettings, evaluation), (EnmpSettings, search),
                            (NscSettings, search)):
        fields = defaults(settings)
        for flag, value in flags.items():
            field = shown.get(flag, flag) if settings is EvalSettings else flag
            if field in fields and flag not in ("threads", "max_length", "target_blocks", "target_modules"):
                assert value == fields[field], (settings.__name__, flag)
                checked += 1
    assert checked >= 20
    assert NscSettings.seed == EnmpSettings.seed and NscSettings.batch_size == EvalSettings.batch_size
    assert typing.get_type_hints(EnmpSettings)["popsize"] is int


@pytest.mark.parametrize("command", ["inspect", "merge", "apply-mask", "search-mask"])
def test_help_ends_with_examples(command):
    result = _ok([command, "--help"])
    tail = result.stdout.rstrip().splitlines()
    assert "Examples:" in result.stdout and tail[-1].strip().startswith("loramerge ")


def test_cli_startup_imports_no_heavy_library():
    code = ("import sys; import loramerge_cli.cli.app; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_search_mask_needs_tasks_and_a_valid_seed(sources, tmp_path):
    missing = invoke_cli(["search-mask", "--adapters", *sources, "--out", str(tmp_path / "mask.json")])
    assert missing.exit_code == 2 and "--tasks" in missing.stderr
    seed = invoke_cli(["search-mask", "--adapters", *sources, "--tasks", "tasks.yaml", "--seed", "0",
                       "--out", str(tmp_path / "mask.json")])
    assert seed.exit_code == 2 and seed.stderr.startswith("error: --seed must be an integer from 1 to 4294967295")
    assert not (tmp_path / "mask.json").exists()
    cache = invoke_cli(["search-mask", "--adapters", *sources, "--tasks", "tasks.yaml", "--block-cache-mb", "-1",
                        "--out", str(tmp_path / "mask.json")])
    assert cache.exit_code == 2 and cache.stderr.startswith("error: --block-cache-mb must be a number >= 0")
    assert not (tmp_path / "mask.json").exists()


def test_lambda_auto_uses_the_tuner_and_records_its_grid(sources, tmp_path, monkeypatch):
    import loramerge_cli.evaluation.data as data
    import loramerge_cli.evaluation.tuning as tuning

    calls = []

    def fake_search(adapters, config, table, tasks_file, **options):
        assert callable(options.pop("report"))  # progress goes to the display, never printed by the tuner
        calls.append((config.merger, str(tasks_file), options))
        return tuning.LambdaSearch(0.3, 1.0, [{"lambda": 0.3, "mean_normalized_accuracy": 99.0}], ["edge!"])

    monkeypatch.setattr(tuning, "search_lambda", fake_search)
    def checked(path, splits, labelled=True):
        calls.append(("checked", str(path), splits))
        return data.load_task_file(path)

    monkeypatch.setattr(data, "check_task_file", checked)
    from loramerge_cli import plan

    monkeypatch.setattr(plan.TaskData, "pinned_base", lambda self, *args: "tiny/base")  # (no such model here)
    (tmp_path / "tasks.yaml").write_text("model_type: sequence-classification\ntasks:\n" + "".join(
        f"- {{name: {name}, text: s, label: y, data: {{validation: {name}.jsonl}}}}\n" for name in ("a", "b", "c")))
    result = _ok(["merge", "--adapters", *sources, "--merger", "tsv", "--lambda", "auto", "--tasks",
                  tmp_path / "tasks.yaml", "--val-limit", "8", "--out", tmp_path / "m", "--json"])
    assert calls == [("checked", str(tmp_path / "tasks.yaml"), ["validation"]),
                     ("tsv", str(tmp_path / "tasks.yaml"), {"val_limit": 8, "base": "tiny/base",
                                                            "allow_base_mismatch": False})]
    assert "lambda: 0.3" in (tmp_path / "m" / "loramerge.yaml").read_text()  # the recipe holds the tuned λ
    provenance = json.loads((tmp_path / "m" / "loramerge.json").read_text())
    assert provenance["parameters"]["lambda"] == 0.3
    report = json.loads(result.stdout)
    assert report["lambda_tuning"]["best"] == 0.3 and "edge!" in report["warnings"]
    assert report["lambda_tuning"]["grid"] == provenance["lambda_tuning"]["grid"]
    shown = _ok(["merge", "--adapters", *sources, "--merger", "tsv", "--lambda", "auto", "--tasks",
                 tmp_path / "tasks.yaml", "--out", tmp_path / "m2"])
    output = shown.stderr + shown.stdout
    assert "λ auto" in output and "0.3:99.0" in output and "edge!" in output
    assert provenance["lambda_tuning"]["grid"] == [{"lambda": 0.3, "mean_normalized_accuracy": 99.0}]


def test_inspect_notes_a_bare_safetensors_file(tmp_path):
    folder = write_peft_folder(tmp_path / "a", random_adapter("a", {"model.layers.0.q_proj": (6, 5)}, seed=1))
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((folder / "adapter_model.safetensors").read_bytes())
    result = invoke_cli(["inspect", str(bare), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)["adapters"][0]
    assert summary["notes"] == ["no adapter_config.json beside the weights: read with lora_alpha = r (scale 1)"]
    assert summary["scales"] == {"1": 1}
    assert invoke_cli(["inspect", str(folder), "--json"]).stdout.count("lora_alpha = r") == 0
