"""Review of session 21 (a library user, the Hub cache): each test failed before its fix."""

import shutil
import threading
from pathlib import Path

import pytest
import torch

from loramerge_cli import api
from loramerge_cli.errors import LoramergeError, NonFiniteError, UsageError


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    from eval_fixtures import build_text_setting

    return build_text_setting(tmp_path_factory.mktemp("review21"))


def test_an_input_read_by_a_relative_path_is_refused_as_an_output_after_a_chdir(setting, tmp_path, monkeypatch):
    """`load_adapters(["prev"])` kept the relative path: after a chdir the writer no longer knew `prev` as an
    input, and `force=True` replaced a merge the caller was merging again."""
    shutil.copytree(setting.adapters["alpha"], tmp_path / "prev")
    (tmp_path / "prev" / "mask.json").write_text("{}")  # as loramerge's own outputs hold: replaceable with force
    monkeypatch.chdir(tmp_path)
    adapters = api.load_adapters(["prev", str(setting.adapters["beta"])])
    result = api.merge(adapters)
    monkeypatch.chdir(setting.root)
    before = (tmp_path / "prev" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(LoramergeError, match="refusing to write over an input"):
        api.write_merged_adapter(result, adapters, tmp_path / "prev", force=True)
    assert (tmp_path / "prev" / "adapter_model.safetensors").read_bytes() == before
    assert Path(adapters[0].source.weights_file).is_absolute()


@pytest.mark.parametrize("merger", ["ta", "ties", "tsv"])
def test_an_adapter_made_non_finite_in_memory_is_refused_in_one_line(setting, merger):
    """ta returned a MergeResult of NaN factors; ties and tsv died in torch.linalg.svd (an internal error)."""
    adapters = api.load_adapters(setting.adapter_args())
    path, module = next(iter(adapters[1].modules.items()))
    module.lora_A[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=f"^adapter beta: module {path} lora_A has NaN or Inf values$"):
        api.merge(adapters, api.MergeConfig(merger=merger))


def test_an_adapter_a_table_prunes_whole_merges_and_is_inspected(setting):
    """Adapter.dtype read the first module: a row pruning every unit left none, and merge and inspect died
    with a bare StopIteration."""
    adapters = api.load_adapters(setting.adapter_args())
    units = len(api.ones_table(adapters).units)
    table = api.from_pruned_indices(adapters, [unit * 3 for unit in range(units)])  # every unit of task 0
    emptied = api.apply_table(adapters[0], table, 0)
    assert not emptied.modules and emptied.dtype is None
    summary = api.inspect_adapters([emptied, *adapters[1:]])
    assert summary["adapters"][0]["dtype"] is None and summary["adapters"][0]["modules"] == 0
    merged = api.merge([emptied, *adapters[1:]], api.MergeConfig(merger="ta", lam=0.5))
    alone = api.merge(adapters[1:], api.MergeConfig(merger="ta", lam=0.5))
    assert merged.modules.keys() == alone.modules.keys()
    for path, module in alone.modules.items():  # the emptied task adds nothing
        delta = (module.lora_B.double() @ module.lora_A.double())
        other = merged.modules[path].lora_B.double() @ merged.modules[path].lora_A.double()
        assert torch.allclose(other, delta, rtol=0, atol=1e-6 * float(delta.abs().max()))


@pytest.mark.parametrize("call", [
    lambda adapters: api.inspect_adapters(["x"]),
    lambda adapters: api.inspect_adapters([]),
    lambda adapters: api.write_merged_adapter("x", adapters, "out"),
    lambda adapters: api.write_adapters(["x"], "out"),
    lambda adapters: api.load_adapter(42),
    lambda adapters: api.EnmpSettings(max_prune="0.3").check(),
    lambda adapters: api.EnmpSettings(sigma0="0.3").check(),
    lambda adapters: api.NscSettings(steps=2.5).check(),
    lambda adapters: api.NscSettings(lr="0.1").check(),
])
def test_wrong_types_are_usage_errors(setting, call):
    """Each raised a bare AttributeError or TypeError (an internal error) instead of one line."""
    adapters = api.load_adapters(setting.adapter_args())
    with pytest.raises(UsageError):
        call(adapters)


@pytest.mark.parametrize("field, value", [("merge", {"merger": "ta"}), ("eval", None), ("enmp", {}), ("nsc", 1)])
def test_a_search_request_of_wrong_settings_types_is_a_usage_error(setting, field, value):
    """`SearchRequest(merge={"merger": "ta"})`: AttributeError: 'dict' object has no attribute 'method'."""
    from dataclasses import replace

    request = api.SearchRequest(adapters=setting.adapter_args(), merge=api.MergeConfig(merger="ta"),
                                tasks=setting.tasks_file, eval=api.EvalSettings(threads=1))
    with pytest.raises(UsageError, match=f"^SearchRequest.{field} must be a "):
        api.plan_search(replace(request, **{field: value}))


def test_load_adapter_takes_a_path_as_load_adapters_does(setting):
    """`api.load_adapter(Path(...))`: AttributeError: 'PosixPath' object has no attribute 'partition'."""
    assert api.load_adapter(setting.adapters["alpha"]).name == "alpha"


def test_searches_in_two_threads_leave_the_caller_s_numpy_state_as_it_was():
    """Each search saved numpy's global state as "the caller's" and put it back after: two at once each saved
    the other's, and the caller's generator was left moved."""
    import sys

    import numpy as np

    from loramerge_cli.search.enmp import EnmpSearch, EnmpSettings

    def fitness(candidates):
        return [float(-len(pruned) + (sum(pruned) % 7) / 10) for pruned, _ in candidates]

    def search(seed):
        EnmpSearch(EnmpSettings(seed=seed, popsize=8, generations=30, max_prune=0.5), 6, 4, fitness).run()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        np.random.seed(12345)
        before = np.random.get_state()[1].copy()
        for _ in range(3):
            threads = [threading.Thread(target=search, args=(seed,)) for seed in (1, 2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert np.array_equal(np.random.get_state()[1], before)
    finally:
        sys.setswitchinterval(interval)


def _cache_folder(cache: Path, repo: str, folder: Path, commit: str) -> None:
    """`folder`'s files as the main revision of `repo` in a Hub cache (plain files, as a copy may leave them)."""
    from hub_cache import set_ref

    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    set_ref(root, "main", commit)


def test_no_evaluation_output_goes_into_a_cached_hub_input_or_hub_base(setting, hub_cache, tmp_path):
    """`eval` / `search-mask` wrote --out and --run-dir into the cached repository of a Hub adapter (its refs/:
    huggingface_hub then dropped the repository from the cache) and of a Hub base model (not protected at all);
    only `merge` protected the whole repository."""
    import yaml

    from factories import invoke_cli

    cache = hub_cache.parent
    _cache_folder(cache, "org/base", setting.base, "c" * 40)
    _cache_folder(cache, "org/alpha", setting.adapters["alpha"], "d" * 40)
    spec = yaml.safe_load(setting.tasks_file.read_text())
    spec["base_model"] = "org/base"
    for task in spec["tasks"]:
        for split, path in task["data"].items():
            task["data"][split] = str(path)
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump(spec))
    adapters = ["alpha=org/alpha", f"beta={setting.adapters['beta']}", f"gamma={setting.adapters['gamma']}"]
    for out in (cache / "models--org--alpha" / "refs" / "report.json",
                cache / "models--org--base" / "snapshots" / ("c" * 40) / "report.json",
                cache / "models--org--base" / "refs" / "report.json"):
        result = invoke_cli(["eval", "--adapters", *adapters, "--tasks", tasks, "--threads", "1", "--out", out])
        assert result.exit_code == 1 and "refusing to write over an input" in result.stderr, result.stderr
        assert not out.exists()
    run_dir = cache / "models--org--alpha" / "snapshots" / "ffff" / "run"
    result = invoke_cli(["search-mask", "--adapters", *adapters, "--tasks", tasks, "--merger", "ta", "--strategy",
                         "greedy", "--budget", "2", "--threads", "1", "--run-dir", run_dir,
                         "--out", tmp_path / "m.json"])
    assert result.exit_code == 1 and "refusing to write over an input" in result.stderr, result.stderr
    assert not run_dir.exists()



def test_a_key_given_twice_in_a_table_file_is_refused(setting, tmp_path):
    """json kept the last of two `weights` (or `scale`) without a word: a table whose first, all-zero `weights`
    was meant merged as if it held the second."""
    adapters = api.load_adapters(setting.adapter_args())
    table = tmp_path / "mask.json"
    api.from_pruned_indices(adapters, [0]).save(table)
    text = table.read_text()
    table.write_text(text.replace('"weights":', '"scale": 0.5, "scale": 2.0, "weights":', 1))
    with pytest.raises(LoramergeError, match=r"not a readable JSON mask \(key 'scale' appears twice in one object\)"):
        api.load_table(table)
    table.write_text(text)
    assert api.load_table(table).weights[0][0] == 0.0


def test_a_table_s_recorded_tensor_digest_is_checked_when_its_file_digest_is_blank(setting, tmp_path):
    """An empty recorded `sha256` switched the identity check off, `content_sha256` beside it unread: the table
    was applied to an adapter it was not made for."""
    import json

    adapters = api.load_adapters(setting.adapter_args())
    table = tmp_path / "mask.json"
    api.from_pruned_indices(adapters, [0]).save(table)
    data = json.loads(table.read_text())
    data["adapters"][0].update(sha256="", content_sha256="f" * 64)
    table.write_text(json.dumps(data))
    with pytest.raises(LoramergeError, match="adapter 'alpha' differs from the one the table was made for"):
        api.check_table(api.load_table(table), adapters)
    data["adapters"][0]["content_sha256"] = ""  # nothing recorded: a table written by hand
    table.write_text(json.dumps(data))
    api.check_table(api.load_table(table), adapters)


def _merge_cli(*args):
    from factories import invoke_cli

    result = invoke_cli(["merge", *args, "--threads", "1"])
    assert result.exit_code == 0, result.stderr
    return result


def test_a_recipe_s_per_adapter_densities_follow_the_adapters_by_name(setting, tmp_path):
    """The recipe wrote `density: 0.3,0.9,0.5` as one flag: rebuilt with `--adapters` in another order, the
    densities went by position to the wrong adapters (exit 0, another merge)."""
    a = setting.adapters
    _merge_cli("--adapters", a["alpha"], a["beta"], a["gamma"], "--merger", "ties", "--density", "0.3,0.9,0.5",
               "--out", tmp_path / "first")
    _merge_cli("--config", tmp_path / "first" / "loramerge.yaml", "--adapters", f"gamma={a['gamma']}",
               f"alpha={a['alpha']}", f"beta={a['beta']}", "--out", tmp_path / "again")
    _merge_cli("--adapters", a["gamma"], a["alpha"], a["beta"], "--merger", "ties", "--density", "0.5,0.3,0.9",
               "--out", tmp_path / "expected")
    weights = "adapter_model.safetensors"
    assert (tmp_path / "again" / weights).read_bytes() == (tmp_path / "expected" / weights).read_bytes()


def test_a_recipe_written_through_a_symbolic_link_rebuilds_its_merge(setting, tmp_path, monkeypatch):
    """`--out link/m`, `link` a symbolic link to a folder elsewhere: the recipe's `../` paths were computed
    through the link's name, the system climbs from its target, and the rebuild found no adapters."""
    (tmp_path / "deep" / "a" / "b").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "link").symlink_to(tmp_path / "deep" / "a" / "b")
    monkeypatch.chdir(tmp_path / "work")
    _merge_cli("--adapters", setting.adapters["alpha"], setting.adapters["beta"], "--out", "link/m")
    _merge_cli("--config", "link/m/loramerge.yaml", "--out", "rebuilt")
    weights = "adapter_model.safetensors"
    assert (tmp_path / "work" / "rebuilt" / weights).read_bytes() == (tmp_path / "deep/a/b/m" / weights).read_bytes()


def _nsc_state(path, *, step=2, history=None, groups=None, drop=()):
    import json

    from safetensors.torch import save_file

    tensors = {"coefficients": torch.full((3, 4), 0.4), "adamw.step": torch.tensor(float(step)),
               "adamw.exp_avg": torch.zeros(3, 4), "adamw.exp_avg_sq": torch.zeros(3, 4)}
    history = history if history is not None else [{"step": k, "loss": 1.0 / k} for k in range(1, step + 1)]
    groups = groups if groups is not None else [{"params": [0], "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                                 "weight_decay": 0.01}]
    save_file({key: value for key, value in tensors.items() if key not in drop}, str(path),
              metadata={"step": str(step), "param_groups": json.dumps(groups), "history": history
                        if isinstance(history, str) else json.dumps(history)})
    return path


@pytest.mark.parametrize("damage, reason", [
    ({"drop": ("adamw.exp_avg",)}, "it holds adamw.exp_avg_sq, adamw.step, coefficients, not the coefficients"),
    ({"groups": [{"lr": "x"}]}, "param_groups is not AdamW's one group"),
    ({"history": '[{"step": 1, "loss": NaN}, {"step": 2, "loss": 0.5}]'}, "NaN is not a finite number"),
    ({"history": [{"step": 1, "loss": 1.0}]}, "its history is not one record per step up to its step 2"),
])
def test_a_damaged_nsc_state_is_one_line_before_any_model_loads(tmp_path, damage, reason):
    """A state without AdamW's first moment, or param groups without "params", resumed into an internal
    KeyError after the model loaded; a NaN loss in its history was written into the table (no JSON then); a step
    its history does not reach was taken at its word."""
    from loramerge_cli.search.nsc import read_state

    read_state(_nsc_state(tmp_path / "good.safetensors"))
    with pytest.raises(LoramergeError, match=f"is not a readable NSC state \\({reason}"):
        read_state(_nsc_state(tmp_path / "nsc_state.safetensors", **damage))


def test_an_nsc_state_saved_past_the_run_s_steps_is_refused(tmp_path):
    """A state whose step is past --steps was written, as it was, as the finished run's table."""
    from types import SimpleNamespace

    from loramerge_cli.search.strategies import STRATEGIES

    path = _nsc_state(tmp_path / "nsc_state.safetensors", step=5)
    check = STRATEGIES["nsc"].check_state
    check(SimpleNamespace(nsc=api.NscSettings(steps=5)), path, None)
    with pytest.raises(LoramergeError, match="was saved at step 5, past this run's 4 steps"):
        check(SimpleNamespace(nsc=api.NscSettings(steps=4)), path, None)


@pytest.mark.parametrize("text, reason", [
    ('{"format": "loramerge.run/v1", "settings": {}, "inputs": [1]}', '"inputs" is not an object'),
    ('{"format": "loramerge.run/v1", "settings": {}, "flags": "x"}', '"flags" is not an object'),
    ('{"format": "loramerge.run/v1", "settings": {}, "inputs": {"a": 1}}', '"inputs" maps a path to something'),
    ('{"format": "loramerge.run/v1", "settings": {"x": Infinity}}', "Infinity is not a finite number"),
])
def test_a_damaged_run_configuration_is_one_line(tmp_path, text, reason):
    """`"inputs": [1]` in config.json: internal error (AttributeError: 'list' object has no attribute 'items')."""
    from loramerge_cli.search.rundir import read_config

    (tmp_path / "config.json").write_text(text)
    with pytest.raises(LoramergeError, match=f"not a readable run configuration \\({reason}"):
        read_config(tmp_path)


def test_a_non_finite_time_saved_in_a_run_directory_is_not_carried_on(tmp_path):
    """`"seconds": Infinity` in elapsed.json became the table's `"seconds": Infinity` (no JSON) and "in inf s"."""
    import json
    import math

    from loramerge_cli.search.state_io import ELAPSED_FORMAT, ELAPSED_NAME, RunClock

    (tmp_path / "config.json").write_text(json.dumps({"format": "loramerge.run/v1", "settings": {}, "run_id": "r"}))
    for seconds in ("Infinity", "1e999", "NaN"):
        (tmp_path / ELAPSED_NAME).write_text(f'{{"format": "{ELAPSED_FORMAT}", "seconds": {seconds}, '
                                             '"run_id": "r"}')
        clock = RunClock(tmp_path, resume=True)
        assert clock.before == 0.0 and math.isfinite(clock.seconds())
    (tmp_path / ELAPSED_NAME).write_text(f'{{"format": "{ELAPSED_FORMAT}", "seconds": 12.5, "run_id": "r"}}')
    assert RunClock(tmp_path, resume=True).before == 12.5


def test_a_nan_in_a_saved_enmp_history_is_refused(tmp_path):
    """`"mean_fitness": NaN` in a history record of ENMP's state.json was written into the table."""
    from loramerge_cli.search.enmp import STATE_FORMAT, read_state

    path = tmp_path / "state.json"
    path.write_text(f'{{"format": "{STATE_FORMAT}", "generation": 1, "history": [{{"mean_fitness": NaN}}], '
                    '"memo": [[[], null, 0.0, 0]]}')
    with pytest.raises(LoramergeError, match="not a readable search state \\(NaN is not a finite number"):
        read_state(path)


@pytest.mark.parametrize("flags, message", [
    (["--fitness", "nsc", "--block-cache-mb", "0"], "--block-cache-mb does nothing with --fitness nsc"),
    (["--strategy", "nsc", "--block-cache-mb", "0"], "--block-cache-mb does nothing with --strategy nsc"),
    (["--strategy", "greedy", "--popsize", "4", "--budget", "5"],
     "--popsize does nothing with --strategy greedy --budget (it only sets the default budget)"),
    (["--strategy", "random", "--generations", "4", "--budget", "5"],
     "--generations does nothing with --strategy random --budget (it only sets the default budget)"),
    (["--strategy", "screened", "--fitness", "nsc", "--halving"],
     "--halving does nothing with --fitness nsc (successive halving scores labelled accuracy only)"),
])
def test_a_search_option_nothing_reads_is_refused(setting, tmp_path, flags, message):
    """Each ran with exit 0 and changed nothing: the block cache with a label-free fitness, greedy's and
    random's popsize × generations (their default budget) beside --budget, an explicit --halving with
    --fitness nsc (--eta was refused there already)."""
    from factories import invoke_cli

    result = invoke_cli(["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                         *flags, "--threads", "1", "--out", tmp_path / "mask.json"])
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {message}", result.stderr


def test_nsc_s_help_leaves_out_what_it_refuses():
    """`search-mask --strategy nsc -h` listed --workers, --devices, --backend, --ray-address and --plot, which
    it refuses, and --block-cache-mb, which it never reads."""
    from factories import invoke_cli

    def listed(arguments) -> set[str]:  # the flags that open a line of the option list (two spaces in)
        lines = invoke_cli(["search-mask", *arguments, "-h"]).stdout.splitlines()
        return {line.split()[0].strip(",") for line in lines if line.startswith("  --")}

    options = listed(["--strategy", "nsc"])
    assert not options & {"--workers", "--devices", "--backend", "--ray-address", "--plot", "--block-cache-mb"}
    assert {"--steps", "--lr", "--device", "--run-dir"} <= options
    assert {"--workers", "--plot", "--block-cache-mb"} <= listed([])


def test_a_recipe_s_one_density_for_all_is_a_number(setting, tmp_path):
    """`--density 0.5` was written as `density: '0.5'` (the command line's text), not as a number."""
    import yaml

    _merge_cli("--adapters", setting.adapters["alpha"], setting.adapters["beta"], "--merger", "ties", "--density",
               "0.5", "--out", tmp_path / "m")
    assert yaml.safe_load((tmp_path / "m" / "loramerge.yaml").read_text())["density"] == 0.5


def test_a_shared_search_setting_refused_names_the_strategies_that_read_it(setting, tmp_path):
    """`--popsize 4 --generations 2` with the default strategy said only "does nothing with --strategy
    surrogate", not which strategy the user may have meant."""
    from factories import invoke_cli

    result = invoke_cli(["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                         "--generations", "2", "--out", tmp_path / "m.json"])
    assert result.exit_code == 2 and result.stderr.strip() == (
        "error: --generations does nothing with --strategy surrogate (it is read by --strategy screened, enmp, "
        "greedy, random)"), result.stderr


def test_a_label_free_screened_run_saved_with_no_halving_still_plans(setting):
    """A run started (before the refusal of --halving with --fitness nsc) with `--no-halving` recorded
    halving false: its --resume, and the give-back of its finished table, were refused with no way out."""
    from dataclasses import replace

    request = api.SearchRequest(adapters=setting.adapter_args(), merge=api.MergeConfig(merger="ta"),
                                tasks=setting.tasks_file, eval=api.EvalSettings(threads=1), strategy="screened",
                                fitness="nsc", options={"halving": False})
    api.plan_search(request)
    with pytest.raises(UsageError, match="--eta does nothing with --fitness nsc"):
        api.plan_search(replace(request, options={"halving": True, "eta": 2}))


def test_a_recipe_of_equal_per_adapter_densities_rebuilds_the_same_recipe(setting, tmp_path):
    """`--density 0.5,0.5`: the recipe gave each adapter 0.5, and its rebuild folded them into one `density:
    0.5` (another recipe, and `parameters.density` 0.5 instead of [0.5, 0.5] in loramerge.json)."""
    a = setting.adapters
    _merge_cli("--adapters", a["alpha"], a["beta"], "--merger", "ties", "--density", "0.5,0.5", "--out",
               tmp_path / "first")
    _merge_cli("--config", tmp_path / "first" / "loramerge.yaml", "--out", tmp_path / "again")
    for name in ("loramerge.yaml", "adapter_model.safetensors"):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_a_recipe_path_through_a_link_then_up_names_the_same_file(tmp_path, monkeypatch):
    """`adlink/../adapters/x` with `adlink` a link: the path was collapsed before the link was followed, and the
    recipe named a folder that does not exist."""
    from loramerge_cli.adapters.card import relative_path

    (tmp_path / "data" / "adapters" / "x").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "adlink").symlink_to(tmp_path / "data" / "adapters")
    monkeypatch.chdir(tmp_path / "work")
    written = relative_path("adlink/../adapters/x", "out")
    assert (tmp_path / "work" / "out" / written).resolve() == (tmp_path / "data" / "adapters" / "x")
    assert relative_path("adlink/x", "out") == "../adlink/x"  # spelled as given where that names the file


def test_an_adapter_read_error_names_the_path_as_given(setting, tmp_path, monkeypatch):
    """Recording absolute paths for loaded adapters made their read errors name the absolute path."""
    (tmp_path / "bad").mkdir()
    shutil.copy(setting.adapters["alpha"] / "adapter_model.safetensors", tmp_path / "bad")
    (tmp_path / "bad" / "adapter_config.json").write_text("{bad")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoramergeError, match="^bad/adapter_config.json: "):
        api.load_adapters(["bad"])


def test_a_merge_written_after_a_chdir_names_its_inputs_from_its_folder(setting, tmp_path, monkeypatch):
    """Adapters loaded by a relative path, the caller's chdir, then the write: loramerge.json named each input by
    the path as given, made relative to the output folder from the new working folder (a folder that does not
    exist)."""
    import json

    shutil.copytree(setting.adapters["alpha"], tmp_path / "here" / "alpha")
    shutil.copytree(setting.adapters["beta"], tmp_path / "here" / "beta")
    (tmp_path / "elsewhere" / "deeper").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "here")
    adapters = api.load_adapters(["alpha", "beta"])
    result = api.merge(adapters)
    monkeypatch.chdir(tmp_path / "elsewhere" / "deeper")
    out = api.write_merged_adapter(result, adapters, tmp_path / "out")
    inputs = json.loads((out / "loramerge.json").read_text())["inputs"]
    assert [(out / record["source"]).resolve() for record in inputs] == [tmp_path / "here" / "alpha",
                                                                         tmp_path / "here" / "beta"]
