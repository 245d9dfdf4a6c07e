"""Defects found by the reviews of 2026-12-07 (eighth session), each test failing on the code before its fix."""

import json
from pathlib import Path


def test_lora_lego_says_what_its_default_cluster_count_stands_for(sources, tmp_path):
    """The summary and the card showed `clusters=0`, a count no merge uses (0 stands for the largest task rank)."""
    from factories import invoke_cli

    result = invoke_cli(["merge", "--adapters", *sources, "--merger", "lora_lego", "--out", tmp_path / "m"])
    assert result.exit_code == 0, result.stderr
    shown = "".join(result.stdout.replace("│", " ").split())  # (the table may wrap the row)
    assert "clusters=0(thelargesttaskrank)" in shown
    assert "clusters=0 (the largest task rank)" in (tmp_path / "m" / "README.md").read_text()
    given = invoke_cli(["merge", "--adapters", *sources, "--merger", "lora_lego", "--clusters", "2",
                        "--out", tmp_path / "g"])
    assert "clusters=2," in (tmp_path / "g" / "README.md").read_text()
    assert Path(tmp_path / "g" / "adapter_model.safetensors").is_file() and given.exit_code == 0


def test_library_calls_refuse_a_path_where_a_table_or_settings_object_belongs(sources, tmp_path):
    """A table given as a path (or eval settings as a dict) failed deep inside with an AttributeError; the sibling
    calls (merge, plan_merge, plan_prune, evaluate) said what to pass."""
    import pytest

    from loramerge_cli import api

    adapters = api.load_adapters(sources)
    result = api.merge(adapters, api.MergeConfig())
    calls = [lambda: api.write_merged_adapter(result, adapters, tmp_path / "m", table="mask.json"),
             lambda: api.write_adapters(adapters, tmp_path / "w", table="mask.json"),
             lambda: api.apply_table(adapters[0], "mask.json", 0)]
    for call in calls:
        with pytest.raises(api.UsageError, match="table must be a WeightTable"):
            call()
    with pytest.raises(api.UsageError, match="settings must be an EvalSettings"):
        api.plan_eval(tmp_path / "tasks.yaml", sources, [], settings={"threads": 1})
    for falsy in ({}, 0, ""):  # (an empty dict passed as the defaults)
        with pytest.raises(api.UsageError, match="settings must be an EvalSettings"):
            api.plan_eval(tmp_path / "tasks.yaml", sources, [], settings=falsy)
        with pytest.raises(api.UsageError, match="settings must be an EvalSettings"):
            api.evaluate(tmp_path / "tasks.yaml", adapters, settings=falsy)
    assert not any(tmp_path.iterdir())


def test_publishing_warnings_of_a_missing_folder_are_an_error_not_an_empty_list(tmp_path):
    """`local_paths_warnings` of a mistyped folder said nothing would leak ([]); push_folder refused it."""
    import pytest

    from loramerge_cli import api

    with pytest.raises(api.LoramergeError, match="not a folder"):
        api.local_paths_warnings(tmp_path / "nonexistent")


def test_the_library_exports_its_errors_and_documents_every_public_name():
    import inspect

    from loramerge_cli import api

    assert issubclass(api.UsageError, api.LoramergeError) and {"LoramergeError", "UsageError"} <= set(api.__all__)
    for name in api.__all__:
        value = getattr(api, name)
        doc = inspect.getdoc(value) or ""
        assert doc and not doc.startswith(f"{getattr(value, '__name__', name)}("), name  # (not dataclass's default)


def _folder(tmp_path, name: str, **config):
    from factories import attention_shapes, random_adapter, write_peft_folder

    adapter = random_adapter(name, attention_shapes(), dtype=__import__("torch").float32)
    return write_peft_folder(tmp_path / name, adapter, config)


def test_odd_adapter_configs_and_files_are_one_line_naming_what_is_wrong(tmp_path):
    """A rank-0 bare file and a pattern key that is no regex were internal errors; a bad exclude_modules,
    layers_to_transform or layers_pattern was blamed on target_modules; a symlink loop was called dangling."""
    import torch
    from safetensors.torch import save_file

    from factories import invoke_cli

    save_file({"base_model.model.model.layers.0.q_proj.lora_A.weight": torch.zeros(0, 4),
               "base_model.model.model.layers.0.q_proj.lora_B.weight": torch.zeros(4, 0)},
              str(tmp_path / "r0.safetensors"))
    targets = ["q_proj", "v_proj"]
    cases = {
        tmp_path / "r0.safetensors": r"rank 0 \(lora_A has no rows\)",
        _folder(tmp_path, "alpha", alpha_pattern={"q_proj": 2, "((": 3}): "alpha_pattern: the key '\\(\\(' is not a",
        _folder(tmp_path, "rank", rank_pattern={"q_proj[": 3}): r"rank_pattern: the key 'q_proj\[' is not a valid",
        _folder(tmp_path, "target", target_modules="q_proj["): r"target_modules 'q_proj\[' cannot be matched",
        _folder(tmp_path, "exclude", target_modules=targets, exclude_modules="(("): "exclude_modules '\\(\\(' cannot",
        _folder(tmp_path, "layers", target_modules=targets, layers_to_transform="abc"): "layers_to_transform 'abc'",
        _folder(tmp_path, "pattern", target_modules=targets, layers_to_transform=[0, 1], layers_pattern="(("):
            "layers_pattern '\\(\\(' cannot",
    }
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    cases[tmp_path / "loop"] = "a symbolic link in a loop"
    import re

    for path, expected in cases.items():
        result = invoke_cli(["inspect", str(path)])
        assert result.exit_code == 1, (path, result.stderr)
        assert re.search(expected, result.stderr) and result.stderr.count("\n") == 1, (path, result.stderr)
        assert "internal error" not in result.stderr


def test_inspect_names_every_dtype_of_its_factors_and_hedges_on_overflow(tmp_path):
    import json

    import torch

    from factories import attention_shapes, invoke_cli, random_adapter, write_peft_folder

    adapter = random_adapter("mixed", attention_shapes(), dtype=torch.float32)
    first = next(iter(adapter.modules.values()))
    first.lora_A, first.lora_B = first.lora_A.half(), first.lora_B.half()
    write_peft_folder(tmp_path / "mixed", adapter)
    summary = json.loads(invoke_cli(["inspect", str(tmp_path / "mixed"), "--json"]).stdout)
    assert summary["adapters"][0]["dtype"] == "float16,float32"
    huge = random_adapter("huge", attention_shapes(), dtype=torch.float32)
    for module in huge.modules.values():
        module.lora_A, module.lora_B = module.lora_A * 1e30, module.lora_B * 1e30
    write_peft_folder(tmp_path / "huge", huge)
    result = invoke_cli(["inspect", str(tmp_path / "huge"), str(tmp_path / "mixed")])
    assert "merge would refuse: nothing known before merging" in result.stdout, result.stdout


def test_lora_lego_scales_with_its_inputs_however_small():
    """An absolute floor of 1e-30 on norms and rescale factors shrank an update of entries below it ~100×."""
    import torch

    from loramerge_cli.merging.lowrank import LowRank
    from loramerge_cli.merging.subspace import lora_lego

    generator = torch.Generator().manual_seed(0)
    tasks = [LowRank(torch.randn(6, 3, generator=generator, dtype=torch.float64),
                     torch.randn(3, 5, generator=generator, dtype=torch.float64)) for _ in range(2)]
    reference = lora_lego(tasks, None, 10, 1).dense()
    for factor in (1e-40, 1e-20, 1e20):
        scaled = lora_lego([LowRank(task.left * factor, task.right) for task in tasks], None, 10, 1).dense()
        torch.testing.assert_close(scaled / factor, reference, rtol=1e-10, atol=0)


def test_counts_from_fractions_are_exact_in_the_decimal_given():
    """Trim, Breadcrumbs, CART and Iso-CTS computed D·κ in floating point: 50 · 0.29 = 14.499… kept 14 where the
    documented ⌊D·κ + 0.5⌋ is 15 (ENMP's ρ cap was already exact). The floor rule stays PEFT's float int(D·κ)."""
    import torch

    from dense_reference import cart as dense_cart
    from loramerge_cli.merging import elementwise, sparsify, subspace

    assert elementwise.keep_count(50, 0.29) == 15 and elementwise.keep_count(50, 0.29, "floor") == 14
    assert sparsify.outlier_count(90, 0.35) == 32 and sparsify.outlier_count(90, 0.35, "floor") == 31
    generator = torch.Generator().manual_seed(0)
    tasks = [torch.randn(50, 50, generator=generator, dtype=torch.float64) for _ in range(3)]
    mean = sum(tasks) / 3
    merged = subspace.cart(tasks, 0.14, 1.0).dense()
    singular = torch.linalg.svdvals(merged - mean)
    assert int((singular > 1e-9 * singular[0]).sum()) == 3 * 7  # k = ⌈0.14 · 50⌉ = 7 per task (not 8)
    torch.testing.assert_close(merged, dense_cart(tasks, 0.14, 1.0))


def test_screened_search_ranks_a_larger_rung_first_whatever_the_scores():
    """−(1000·rung + score) ranked a subset table at +1200 (a weak expert's normalised accuracy) above a full-set
    table at +5."""
    from loramerge_cli.search.screened import rung_first

    keys = rung_first([(1, 1200.0), (2, 5.0), (2, -3000.0), (0, 40.0)])
    assert sorted(range(4), key=keys.__getitem__) == [1, 2, 0, 3]
    assert rung_first([(1, 3.0), (2, -1.5)]) == [-1003.0, -1998.5]  # (the step of 1000 where scores stay below it)


def test_the_max_prune_hint_is_a_value_that_works(text_setting, tmp_path):
    """"give at least 0.333" for 3 units: ⌊0.333·3⌋ = 0, refused again."""
    import re

    from factories import invoke_cli
    from loramerge_cli.search.decode import max_pruned

    result = invoke_cli(["search-mask", "--adapters", *text_setting.adapter_args(), "--tasks", text_setting.tasks_file,
                         "--max-prune", "0.001", "--threads", "1", "--out", tmp_path / "t.json"])
    found = re.search(r"none of the (\d+) \(block, task\) units may be pruned .* give at least ([0-9.]+)$",
                      result.stderr.strip())
    assert result.exit_code == 1 and found, result.stderr
    units, hint = int(found.group(1)), float(found.group(2))
    assert max_pruned(hint, units, 1) == 1 and hint * units < 1.01
    from loramerge_cli.search.plan import smallest_max_prune

    for units in (3, 7, 9, 12, 1000, 3001):  # (1/3 written to 3 significant digits, 0.333, prunes none of 3)
        hint = smallest_max_prune(units)
        assert max_pruned(hint, units, 1) >= 1 and (hint == 0.001 or max_pruned(hint - 0.001, units, 1) == 0), units


def test_an_endless_file_given_as_a_table_or_spec_is_refused_not_read_into_memory(sources, tmp_path, monkeypatch):
    """`--mask /dev/zero` read until the kernel killed the process (24 GB); so did `--tasks /dev/zero`."""
    import loramerge_cli.evaluation.specs as specs
    import loramerge_cli.masks as masks
    from factories import invoke_cli

    monkeypatch.setattr(masks, "TABLE_MAX_BYTES", 1 << 20)  # (the limits are far above any real file)
    monkeypatch.setattr(specs, "SPEC_MAX_BYTES", 1 << 20)
    refused = {("merge", "--mask"): "/dev/zero: over 1 MiB: not a weight table",
               ("apply-mask", "--mask"): "/dev/zero: over 1 MiB: not a weight table",
               ("eval", "--tasks"): "/dev/zero: over 1 MiB: not a task spec"}
    for (command, flag), expected in refused.items():
        result = invoke_cli([command, "--adapters", *sources, flag, "/dev/zero", "--out", tmp_path / command])
        assert result.exit_code == 1 and result.stderr == f"error: {expected}\n", result.stderr
    assert not any(tmp_path.iterdir())


def test_workers_load_the_base_commit_the_driver_pinned(monkeypatch, tmp_path):
    """Workers resolved a Hub base's branch again when they started: after the branch moved (or on a machine whose
    cache names another commit) they scored another model than the driver's reference and the records named."""
    from dataclasses import replace
    from types import SimpleNamespace

    from loramerge_cli.evaluation.settings import EvalSettings
    from loramerge_cli.evaluation.workers import EngineSource, LambdaScorer, MergedScorer
    from loramerge_cli.merging.merge import MergeConfig
    from loramerge_cli.search import backends
    from loramerge_cli.search.enmp_settings import EnmpSettings
    from loramerge_cli.search.fidelity import LadderWorkerBuilder
    from loramerge_cli.search.runner import SearchRequest, WorkerBuilder
    from loramerge_cli.search.screened import SingleRungBuilder

    pinned = "org/base@" + "a" * 40
    request = SearchRequest(adapters=["a=x"], merge=MergeConfig(), tasks=tmp_path / "tasks.yaml", eval=EvalSettings(),
                            enmp=EnmpSettings(), base="org/base")
    source = EngineSource(tmp_path / "tasks.yaml", ["a=x"], EvalSettings())
    builders = {
        "search": (WorkerBuilder(request, 0.5, {}, 0.0), lambda b: b.request.base),
        "ladder": (SingleRungBuilder(LadderWorkerBuilder(request, 0.5, {}, 0.0, [8], 1)),
                   lambda b: b.build.request.base),
        "eval": (MergedScorer(source), lambda b: b.source.base),
        "lambda": (LambdaScorer(source, MergeConfig(), None), lambda b: b.source.base),
    }
    for name, (build, base_of) in builders.items():
        opened = []
        monkeypatch.setattr(backends, "open_pool", lambda build, *rest: opened.append(build) or (lambda *a: []))
        pool = backends.LazyPool(build, SimpleNamespace(), "cpu", 1)
        pool.reside(SimpleNamespace(base=pinned, park=lambda: None))
        pool.start()
        assert base_of(opened[0]) == pinned, name
        assert base_of(build) != pinned  # (the driver's own request is left as given)
    assert backends.at_base(replace(source, base="/a/folder"), None).base == "/a/folder"


def test_an_old_output_that_cannot_be_removed_is_named(sources, tmp_path, monkeypatch):
    """`merge --force` over an output holding an undeletable file left the old weights in a hidden folder, silently;
    then the line was a bare log line: shown under --quiet, missing from --json's `warnings`."""
    import shutil

    from factories import invoke_cli
    from loramerge_cli import outputs

    assert invoke_cli(["merge", "--adapters", *sources, "--out", tmp_path / "m"]).exit_code == 0
    remove = shutil.rmtree
    monkeypatch.setattr(outputs.shutil, "rmtree", lambda path, ignore_errors=False: None if str(path).endswith(
        ".tmp") or str(path).endswith(".old") else remove(path, ignore_errors=ignore_errors))  # (as chattr +i does)
    merge = ["merge", "--adapters", *sources, "--out", tmp_path / "m", "--force"]
    result = invoke_cli([*merge, "--lambda", "0.3"])
    assert result.exit_code == 0, result.stderr
    left = [path for path in tmp_path.iterdir() if path.name != "m"]
    line = f"{tmp_path / 'm'} was replaced, but its old content could not be removed completely: what is left is in"
    assert len(left) == 1 and f"warning: {line} {left[0]}" in " ".join(result.stderr.split())
    quiet = invoke_cli([*merge, "--lambda", "0.4", "--quiet"])
    assert quiet.exit_code == 0 and "could not be removed" not in quiet.stderr, quiet.stderr
    as_json = invoke_cli([*merge, "--lambda", "0.5", "--json"])
    assert as_json.exit_code == 0 and as_json.stderr == "", as_json.stderr
    assert [w for w in json.loads(as_json.stdout)["warnings"] if w.startswith(line)]
