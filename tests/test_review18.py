"""Review of session 18: each test failed before its fix."""

from pathlib import Path

import pytest
from factories import invoke_cli
from test_hostile_inputs import one_line

from loramerge_cli import api
from loramerge_cli.errors import LoramergeError


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    from eval_fixtures import build_text_setting

    return build_text_setting(tmp_path_factory.mktemp("review18"))


def test_a_token_cap_above_the_model_s_positions_is_refused_by_every_plan(setting, tmp_path):
    """`--max-length 100000` on a 64-position model was refused once the engine read the base's config (after
    torch, the adapters and, for search-mask, the whole plan and its run directory). The base's config.json is
    read by the plans now: eval, merge (--lambda auto / RegMean), search-mask and the library's plans."""
    import json

    from loramerge_cli.search.plan import SearchRequest

    positions = json.loads((setting.base / "config.json").read_text())["max_position_embeddings"]
    adapters = setting.adapter_args()
    settings = api.EvalSettings(max_length=positions + 1, threads=1)
    words = f"--max-length {positions + 1} is more than the model's {positions} positions"
    with pytest.raises(LoramergeError, match=words):
        api.plan_eval(setting.tasks_file, adapters, settings=settings)
    with pytest.raises(LoramergeError, match=words):
        api.plan_search(SearchRequest(strategy="greedy", adapters=adapters, merge=api.MergeConfig(merger="ta"),
                                      tasks=setting.tasks_file, eval=settings), out=tmp_path / "mask.json")
    loaded = api.load_adapters(adapters)
    with pytest.raises(LoramergeError, match=words):
        api.plan_merge(loaded, api.MergeConfig(merger="ta", lam="auto"), out=tmp_path / "merged",
                       tuning=api.TaskData(setting.tasks_file, max_length=positions + 1))
    with pytest.raises(LoramergeError, match=words):
        api.evaluate(setting.tasks_file, loaded, settings=settings)
    for command in (["eval"], ["merge", "--lambda", "auto", "--out", tmp_path / "m"],
                    ["search-mask", "--out", tmp_path / "t.json"]):
        one_line(invoke_cli([*command, "--tasks", setting.tasks_file, "--adapters", *adapters, "--max-length",
                             str(positions + 1)]), "positions")
    content = setting.tasks_file.read_text().replace("num_labels: 3\n",
                                                     f"num_labels: 3\n  max_length: {positions * 2}\n", 1)
    spec = tmp_path / "capped.yaml"
    spec.write_text(content)
    one_line(invoke_cli(["eval", "--tasks", spec, "--adapters", *adapters]), f"its max_length {positions * 2}")
    api.plan_eval(setting.tasks_file, adapters, settings=api.EvalSettings(max_length=positions))  # the limit itself


def test_a_spec_of_another_model_type_than_the_adapters_is_refused_before_the_model_loads(setting, tmp_path):
    """A causal-LM spec scored with sequence-classification adapters failed after the base loaded, on the head
    ("score.weight is not a parameter of the base model"); the adapters' PEFT task_type says it first."""
    import yaml

    content = yaml.safe_load(setting.tasks_file.read_text())
    content["model_type"] = "causal-lm"
    for task in content["tasks"]:
        for key in ("head", "num_labels", "masked_labels"):
            task.pop(key, None)
        task["prompt"] = task.pop("text")[0]
        task["choices"] = ["yes", "maybe", "no"]
    spec = tmp_path / "causal.yaml"
    spec.write_text(yaml.safe_dump(content))
    with pytest.raises(LoramergeError, match="model_type causal-lm, but adapter 'alpha' was trained for SEQ_CLS"):
        api.plan_eval(spec, setting.adapter_args())
    one_line(invoke_cli(["eval", "--tasks", spec, "--adapters", *setting.adapter_args()]), "trained for SEQ_CLS")


def _one_module_adapter(name: str, B, A):
    from dataclasses import replace

    from factories import random_adapter

    from loramerge_cli.adapters.model import LoraModule

    adapter = random_adapter(name, {PATH: (B.shape[0], A.shape[1])}, rank=B.shape[1], seed=1)
    return replace(adapter, modules={PATH: LoraModule(PATH, A, B, scale=1.0, alpha=float(B.shape[1]))})


PATH = "model.layers.0.self_attn.q_proj"


def _update(result):
    module = result.modules[PATH]
    return module.lora_B @ module.lora_A


@pytest.mark.parametrize("merger,space", [("knots", "knots"), ("ties", "knots"), ("tsv", "knots"), ("ties", "core"),
                                          ("ties", "full"), ("tsv", "full")])
def test_an_adapter_whose_update_is_zero_leaves_the_module_as_a_weight_of_zero_does(merger, space):
    """An adapter with lora_B = 0 in a module (an untrained module) changed the merge of the others: in the knots
    space its V_t block is rounding noise (1e-16) that TIES counted as votes (halving the disjoint mean: 0.38
    off) and TSV as a direction (0.8 off); in the core space its lora_A turned the basis; a full-space dense
    result's rank cap counted its rank. It now leaves as a weight of 0 does."""
    import torch

    from dense_reference import reference_merge

    generator = torch.Generator().manual_seed(5)
    A_a, A_b = (torch.randn(2, 6, generator=generator, dtype=torch.float64) for _ in range(2))
    B_b = torch.randn(8, 2, generator=generator, dtype=torch.float64)
    zero = _one_module_adapter("a", torch.zeros(8, 2, dtype=torch.float64), A_a)
    other = _one_module_adapter("b", B_b, A_b)
    config = api.MergeConfig(merger=merger, space=space, lam=1.0)
    with_zero = _update(api.merge([zero, other], config))
    alone = _update(api.merge([zero, other], api.MergeConfig(merger=merger, space=space, lam=1.0, weights=[0, 1])))
    assert torch.allclose(with_zero, alone, rtol=0, atol=1e-12)
    if space != "full":  # (the full space's dense result is truncated by the writer's rule, not the reference's)
        method = "ties" if merger == "knots" else merger
        density = 0.9 if merger == "knots" else 0.8 if merger == "ties" else 1.0
        reference = reference_merge([zero, other], method, space, density=density)[PATH]
        assert torch.allclose(with_zero, reference, rtol=0, atol=1e-10)


def test_tsv_depends_on_the_updates_only_not_on_how_their_factors_are_written():
    """TSV cut each task's singular directions at k_t when they overflow the space; in the unscaled knots space
    the singular values of V_t tie at 1 for every direction only task t spans, and a cut through tied values
    kept whichever directions the SVD returned: writing the same ΔW_t as (B Q)(Qᵀ A) moved the merge by 15 to
    45 %. The cut now keeps tied values together."""
    import torch

    from dense_reference import reference_merge

    generator = torch.Generator().manual_seed(3)
    basis = torch.eye(8, dtype=torch.float64)
    spans = [basis[:, :3], basis[:, 3:6], torch.stack([basis[:, 3] + basis[:, 6], basis[:, 7], basis[:, 6]], 1)]
    factors = [(span @ torch.randn(3, 3, generator=generator, dtype=torch.float64),
                torch.randn(3, 10, generator=generator, dtype=torch.float64)) for span in spans]
    config = api.MergeConfig(merger="tsv", space="knots", lam=1.0)

    def merged(rotation_seed):
        adapters = []
        for name, (B, A) in zip("abc", factors):
            if rotation_seed is not None:
                rotation = torch.Generator().manual_seed(rotation_seed + ord(name))
                Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=rotation, dtype=torch.float64))
                B, A = B @ Q, Q.T @ A
            adapters.append(_one_module_adapter(name, B, A))
        return adapters, _update(api.merge(adapters, config))

    adapters, written = merged(None)
    for seed in range(4):
        assert torch.allclose(merged(seed)[1], written, rtol=0, atol=1e-12)
    reference = reference_merge(adapters, "tsv", "knots")[PATH]
    assert torch.allclose(written, reference, rtol=0, atol=1e-10)


@pytest.mark.parametrize("merger,options", [("cart", {"rank_fraction": 0.1, "cart_scale": 0.4}),
                                            ("iso_cts", {"common_fraction": 0.3})])
def test_cart_and_iso_cts_cut_no_tied_singular_values(merger, options):
    """CART keeps k leading directions of each X_t − mean, Iso-CTS k of Σ_t X_t: with tasks of orthonormal
    factors on orthogonal subspaces those singular values tie, and the cut kept whichever the SVD of the
    factors returned (the merge moved with a rotation Q of the factors, (B Q)(Qᵀ A)). Tied values are kept
    together now."""
    import torch

    from dense_reference import reference_merge

    generator = torch.Generator().manual_seed(11)
    left, _ = torch.linalg.qr(torch.randn(12, 9, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(12, 9, generator=generator, dtype=torch.float64))
    config = api.MergeConfig(merger=merger, lam=1.0, params=options)

    def merged(rotation_seed):
        adapters = []
        for index, name in enumerate("abc"):
            B, A = left[:, 3 * index:3 * index + 3], right[:, 3 * index:3 * index + 3].T
            if rotation_seed is not None:
                rotation = torch.Generator().manual_seed(rotation_seed + index)
                Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=rotation, dtype=torch.float64))
                B, A = B @ Q, Q.T @ A
            adapters.append(_one_module_adapter(name, B.contiguous(), A.contiguous()))
        return adapters, _update(api.merge(adapters, config))

    adapters, written = merged(None)
    for seed in range(4):
        assert torch.allclose(merged(seed)[1], written, rtol=0, atol=1e-12)
    assert torch.allclose(written, reference_merge(adapters, merger, **options)[PATH], rtol=0, atol=1e-10)


def _unscorable_spec(setting, tmp_path, tasks) -> Path:
    """The setting's spec with `tasks` validated on rows whose label is a masked class: their experts score 0."""
    import json

    import yaml

    content = yaml.safe_load(setting.tasks_file.read_text())
    for task in content["tasks"]:
        if task["name"] in tasks:
            rows = [json.loads(line) for line in Path(task["data"]["validation"]).read_text().splitlines()]
            masked = tmp_path / f"{task['name']}_masked.jsonl"
            masked.write_text("".join(json.dumps({**row, "label": 1}) + "\n" for row in rows))
            task["data"]["validation"], task["masked_labels"] = str(masked), [1]
    spec = tmp_path / "unscorable.yaml"
    spec.write_text(yaml.safe_dump(content))
    return spec


def test_lambda_and_table_choices_name_the_tasks_they_cannot_score(setting, tmp_path):
    """`merge --lambda auto` and `search-mask` on tasks whose expert scores 0 left those tasks out of the mean
    without a word (`eval` warned), and with every expert at 0 the search ran on a fitness of 0.00 everywhere
    and λ auto kept the default after scoring the whole grid. Now: a warning per such task (in the --json
    output and the table's provenance), and one line, exit 1, when no task can be scored."""
    import json

    spec = _unscorable_spec(setting, tmp_path, {"alpha"})
    adapters = setting.adapter_args()
    tuned = invoke_cli(["merge", "--adapters", *adapters, "--tasks", spec, "--lambda", "auto", "--threads", "1",
                        "--out", tmp_path / "merged", "--json"])
    assert tuned.exit_code == 0, tuned.stderr
    assert any("task alpha: the expert scores 0" in line for line in json.loads(tuned.stdout)["warnings"])
    searched = invoke_cli(["search-mask", "--adapters", *adapters, "--tasks", spec, "--strategy", "random",
                           "--budget", "2", "--threads", "1", "--out", tmp_path / "table.json"])
    assert searched.exit_code == 0, searched.stderr
    assert "task alpha: the expert scores 0" in searched.stderr
    provenance = json.loads((tmp_path / "table.json").read_text())["provenance"]
    assert provenance["warnings"] == ["task alpha: the expert scores 0 on its examples, so its normalized accuracy "
                                      "is undefined: the table is chosen on the other tasks"]
    (tmp_path / "all").mkdir()
    nothing = _unscorable_spec(setting, tmp_path / "all", {"alpha", "beta", "gamma"})
    for command in (["search-mask", "--strategy", "random", "--budget", "2", "--out", tmp_path / "t2.json"],
                    ["merge", "--lambda", "auto", "--out", tmp_path / "m2"]):
        refused = invoke_cli([*command, "--adapters", *adapters, "--tasks", nothing, "--threads", "1"])
        assert refused.exit_code == 1 and "every expert scores 0" in refused.stderr, refused.stderr
        assert not (tmp_path / "t2.json").exists() and not (tmp_path / "m2").exists()


def test_an_ascii_locale_or_stdout_neither_breaks_writing_nor_fails_a_finished_job(setting, tmp_path):
    """Under a locale whose encoding is ASCII (LC_ALL=C with Python's UTF-8 mode and locale coercion off, or a
    Latin-1 / cp1252 system), `merge` failed writing the model card ('ascii' codec can't encode 'λ') and
    `merge --mask` reading the bundled table schema; files are read and written as UTF-8 now. With an ASCII
    stdout (PYTHONIOENCODING=ascii), a finished command exited 1 printing its summary: the characters are
    escaped now (`inspect`'s ‖ΔW‖ here)."""
    import os
    import subprocess
    import sys

    adapters = setting.adapter_args()
    environment = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}

    def run(*args, env):
        return subprocess.run([sys.executable, "-m", "loramerge_cli", *map(str, args)], capture_output=True,
                              text=True, encoding="utf-8", errors="replace", env=env, check=False)

    merged = run("merge", "--adapters", *adapters, "--merger", "ties", "--out", tmp_path / "merged", env=environment)
    assert merged.returncode == 0, merged.stderr
    assert "λ" in (tmp_path / "merged" / "README.md").read_text(encoding="utf-8")
    table = api.ones_table(api.load_adapters(adapters))
    table.save(tmp_path / "table.json")
    masked = run("merge", "--adapters", *adapters, "--mask", tmp_path / "table.json", "--out", tmp_path / "masked",
                 env=environment)
    assert masked.returncode == 0, masked.stderr
    ascii_stdout = run("inspect", *setting.adapters.values(), env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert ascii_stdout.returncode == 0 and "\\u2016" in ascii_stdout.stdout, ascii_stdout.stderr  # ‖ΔW‖


def test_inspect_notes_an_update_that_overflows(setting, tmp_path):
    """Factors of 3e38 are finite, their product is not: `inspect` said nothing of it and the merge then
    refused. It is a note on the adapter (not a merge refusal: a small λ can bring a merge back in range)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    big = tmp_path / "big"
    shutil.copytree(setting.adapters["alpha"], big)
    tensors = load_file(str(big / "adapter_model.safetensors"))
    first = sorted(key for key in tensors if "lora_A" in key)[0]
    tensors[first].fill_(3e38)
    tensors[first.replace("lora_A", "lora_B")].fill_(3e38)
    save_file(tensors, str(big / "adapter_model.safetensors"))
    inspected = invoke_cli(["inspect", f"alpha={big}", f"beta={setting.adapters['beta']}", "--json"])
    assert inspected.exit_code == 0, inspected.stderr
    summary = json.loads(inspected.stdout)
    notes = summary["adapters"][0]["notes"]
    assert len(notes) == 1 and "beyond the range of float32: apply-mask's copies are refused" in notes[0]
    assert summary["merge_refusals"] == [] and summary["adapters"][1]["notes"] == []
    merged = invoke_cli(["merge", "--adapters", f"alpha={big}", f"beta={setting.adapters['beta']}", "--out",
                         tmp_path / "merged"])
    assert merged.exit_code == 1 and "beyond the range of float32" in merged.stderr


def test_out_dash_is_refused_rather_than_a_file_named_dash(setting, tmp_path, monkeypatch):
    """`--out -` (stdout to a Unix user) wrote a folder or file named '-' in the working folder."""
    monkeypatch.chdir(tmp_path)
    for command in (["merge", "--adapters", *setting.adapter_args()],
                    ["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file],
                    ["eval", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file]):
        one_line(invoke_cli([*command, "--out", "-"]), "never standard output", code=2)
    assert not (tmp_path / "-").exists()


def test_a_merge_that_scores_as_its_expert_is_exactly_100():
    """100 · a / e gave 99.99999999999999 where the merge scored as the expert (a = e = 1/3)."""
    from loramerge_cli.evaluation.metrics import normalized_accuracy

    assert normalized_accuracy({"t": 1 / 3, "u": 0.7}, {"t": 1 / 3, "u": 0.7})[0] == {"t": 100.0, "u": 100.0}


def test_every_json_document_names_its_layout(setting, tmp_path):
    """Only `eval` (and search-mask's table) named its --json layout; inspect, merge and apply-mask had no format
    key and no documentation (docs/json.md now)."""
    import json

    adapters = setting.adapter_args()
    table = tmp_path / "table.json"
    api.ones_table(api.load_adapters(adapters)).save(table)
    for command, kind in ((["inspect", *adapters], "inspect"),
                          (["merge", "--adapters", *adapters, "--out", tmp_path / "merged"], "merge"),
                          (["apply-mask", "--adapters", *adapters, "--mask", table, "--out", tmp_path / "pruned"],
                           "apply-mask")):
        result = invoke_cli([*command, "--json"])
        assert result.exit_code == 0, result.stderr
        assert next(iter(json.loads(result.stdout).items())) == ("format", f"loramerge.{kind}/v1")
        assert f"loramerge.{kind}/v1" in (Path(__file__).parent.parent / "docs" / "json.md").read_text()


def test_plot_and_run_dir_that_cannot_be_written_are_refused_before_the_search(setting, tmp_path, monkeypatch):
    """`--plot afile/sub` (under a file) ran the whole search, wrote --out, then failed with an internal
    NotADirectoryError; a --plot folder or a resumed --run-dir that cannot be written failed after the search
    or after the models loaded. All three are one line before any work now."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    args = ["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file, "--strategy",
            "random", "--budget", "2", "--threads", "1", "--out", tmp_path / "table.json"]
    one_line(invoke_cli([*args, "--plot", "afile/sub"]), "--plot afile/sub: cannot write the plots there")
    assert not (tmp_path / "table.json").exists()
    from loramerge_cli import outputs

    writable = outputs.tempfile.mkstemp

    def unwritable(*args, dir=None, **kwargs):  # (root writes anywhere: as an immutable folder would)
        if Path(dir).name == "blocked":
            raise PermissionError(1, "Operation not permitted")
        return writable(*args, dir=dir, **kwargs)

    monkeypatch.setattr(outputs.tempfile, "mkstemp", unwritable)
    (tmp_path / "blocked").mkdir()
    one_line(invoke_cli([*args, "--plot", "blocked"]), "blocked is not writable (Operation not permitted)")
    one_line(invoke_cli([*args, "--run-dir", "blocked"]), "--run-dir blocked: cannot write in it")
    assert not (tmp_path / "table.json").exists()


def test_a_seed_numpy_cannot_take_is_a_usage_error_for_every_strategy(setting, tmp_path):
    """`--seed 4294967296` passed the checks and, for enmp and screened, failed after the models loaded
    ("internal error: Seed must be between 0 and 2**32 - 1"); surrogate and random took it. One rule now."""
    for strategy in ("enmp", "screened", "surrogate", "random"):
        one_line(invoke_cli(["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                             "--strategy", strategy, "--seed", str(2**32), "--out", tmp_path / "t.json"]),
                 "--seed must be an integer from 1 to 4294967295", code=2)


def test_a_search_that_cannot_resume_does_not_say_resume_with(setting, tmp_path, monkeypatch):
    """Greedy and random stopped with "interrupted; resume with: loramerge search-mask --run-dir … --resume",
    a command then refused ("--strategy greedy cannot resume a run")."""
    from dataclasses import replace

    from test_hostile_inputs import search_request

    from loramerge_cli import interrupts
    from loramerge_cli.search import runner
    from loramerge_cli.search.enmp_settings import EnmpSettings

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(runner.FITNESSES, "accuracy", stopped)  # stopped once the run dir holds the run
    for strategy, resumable in (("greedy", False), ("random", False), ("surrogate", True)):
        interrupts.reset()
        with pytest.raises(KeyboardInterrupt):
            runner.run_search(replace(search_request(setting), strategy=strategy, run_dir=tmp_path / strategy,
                                      enmp=EnmpSettings(max_prune=0.5, seed=1 if strategy == "greedy" else 3)))
        assert (interrupts.resume_hint() is not None) == resumable
        assert ("resume with" in interrupts.message()) == resumable
        assert resumable or "keeps no state to resume: rerun the command" in interrupts.message()
    interrupts.reset()


def test_a_state_copied_from_another_run_directory_is_refused(setting, tmp_path):
    """A `ties` search's surrogate_state.json copied into an interrupted `ta` run: the resume went on from it and
    wrote a table recording the ties run's units and its +4.69 as the ta merge's (its ta score was below the
    unpruned merge's). States carry their run's id now."""
    import shutil

    args = ["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file, "--threads", "1",
            "--budget", "12"]
    for merger in ("ta", "ties"):
        done = invoke_cli([*args, "--merger", merger, "--run-dir", tmp_path / merger, "--out",
                           tmp_path / f"{merger}.json"])
        assert done.exit_code == 0, done.stderr
    for name in ("finished.json", "best.json"):  # the ta run as if stopped before its end
        (tmp_path / "ta" / name).unlink()
    resumed = invoke_cli(["search-mask", "--run-dir", tmp_path / "ta", "--resume", "--threads", "1", "--out",
                          tmp_path / "again.json"])
    assert resumed.exit_code == 0, resumed.stderr  # its own state resumes
    for name in ("finished.json", "best.json"):
        (tmp_path / "ta" / name).unlink()
    shutil.copy(tmp_path / "ties" / "surrogate_state.json", tmp_path / "ta" / "surrogate_state.json")
    one_line(invoke_cli(["search-mask", "--run-dir", tmp_path / "ta", "--resume", "--threads", "1", "--out",
                         tmp_path / "swapped.json"]), "was saved by another search")


def test_a_resumed_search_s_table_names_the_command_that_started_it(setting, tmp_path, monkeypatch):
    """A resumed run's table recorded only `search-mask --run-dir R --resume` as its command: what was searched
    (adapters, tasks, merger, strategy settings) was not in the table. It records the starting command, and the
    resuming one beside it."""
    import json

    from loramerge_cli.search import runner

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setitem(runner.FITNESSES, "accuracy", stopped)
        first = invoke_cli(["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                            "--budget", "12", "--threads", "1", "--run-dir", tmp_path / "run", "--out",
                            tmp_path / "table.json"])
    assert first.exit_code == 130, first.stderr
    resumed = invoke_cli(["search-mask", "--run-dir", tmp_path / "run", "--resume", "--threads", "1"])
    assert resumed.exit_code == 0, resumed.stderr
    provenance = json.loads((tmp_path / "table.json").read_text())["provenance"]
    assert "--adapters" in provenance["command"] and "--budget 12" in provenance["command"]
    assert "--resume" in provenance["resumed_with"] and "--adapters" not in provenance["resumed_with"]


def test_matplotlib_s_warnings_about_its_config_folder_do_not_reach_a_quiet_run(setting, tmp_path):
    """With a HOME matplotlib cannot write in (read-only in CI), `search-mask --plot --quiet` printed matplotlib's
    "mkdir -p failed …" and "Matplotlib created a temporary cache directory …" on stderr."""
    import os
    import subprocess
    import sys

    home = tmp_path / "home-is-a-file"
    home.write_text("")
    environment = {key: value for key, value in os.environ.items() if key not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME",
                                                                                  "XDG_CACHE_HOME")}
    finished = subprocess.run(
        [sys.executable, "-m", "loramerge_cli", "search-mask", "--adapters", *setting.adapter_args(), "--tasks",
         str(setting.tasks_file), "--strategy", "random", "--budget", "2", "--threads", "1", "--quiet", "--out",
         str(tmp_path / "table.json"), "--plot", str(tmp_path / "plots")],
        capture_output=True, text=True, env={**environment, "HOME": str(home)}, check=False)
    assert finished.returncode == 0, finished.stderr
    assert "matplotlib" not in finished.stderr.lower(), finished.stderr
    assert (tmp_path / "plots" / "fitness.png").is_file()


def test_a_file_that_cannot_be_written_is_not_called_standard_output(tmp_path):
    """`--install-completion` with a HOME it cannot write in said "cannot write to standard output: Read-only
    file system" (stdout was fine): the file is named now."""
    import os
    import subprocess
    import sys

    home = tmp_path / "home-is-a-file"
    home.write_text("")
    finished = subprocess.run([sys.executable, "-m", "loramerge_cli", "--install-completion"], capture_output=True,
                              text=True, env={**os.environ, "HOME": str(home), "SHELL": "/bin/bash"}, check=False)
    assert finished.returncode == 1 and "standard output" not in finished.stderr, finished.stderr
    assert finished.stderr.startswith(f"error: {home}") and finished.stderr.count("\n") == 1, finished.stderr


def test_a_position_limit_is_read_only_where_the_config_names_one(setting, tmp_path):
    """The plans read `n_positions` as the position limit of any config: a T5 base (relative positions; its
    n_positions is no limit) was refused `--max-length 32` that the engine accepts. It is read where
    transformers maps max_position_embeddings to it (GPT-2 and kin)."""
    import json
    import re

    from loramerge_cli.evaluation.model_fit import check_model_fit
    from loramerge_cli.evaluation.specs import load_task_file

    task_file = load_task_file(setting.tasks_file)
    for model_type, refused in (("t5", False), ("gpt2", True)):
        base = tmp_path / model_type
        base.mkdir()
        (base / "config.json").write_text(json.dumps({"model_type": model_type, "n_positions": 16}))
        if refused:
            with pytest.raises(LoramergeError, match=re.escape(f"16 positions (n_positions of {base})")):
                check_model_fit(task_file, setting.adapter_args(), str(base), 32)
        else:
            check_model_fit(task_file, setting.adapter_args(), str(base), 32)


def test_a_finished_table_copied_from_another_run_is_refused(setting, tmp_path):
    """`best.json` and `finished.json` of a finished `ties` run copied into a `ta` run directory: `--resume` gave
    back the ties table as the ta search's. finished.json carries the run's id too now."""
    import shutil

    args = ["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file, "--threads", "1",
            "--strategy", "random", "--budget", "2"]
    for merger in ("ta", "ties"):
        done = invoke_cli([*args, "--merger", merger, "--run-dir", tmp_path / merger, "--out",
                           tmp_path / f"{merger}.json"])
        assert done.exit_code == 0, done.stderr
    again = invoke_cli([*args, "--run-dir", tmp_path / "ta", "--resume", "--out", tmp_path / "again.json"])
    assert again.exit_code == 0, again.stderr
    for name in ("best.json", "finished.json"):
        shutil.copy(tmp_path / "ties" / name, tmp_path / "ta" / name)
    one_line(invoke_cli([*args, "--run-dir", tmp_path / "ta", "--resume", "--out", tmp_path / "swapped.json"]),
             "finished.json was written by another search")


def test_a_finished_run_s_plots_folder_need_not_be_writable(setting, tmp_path, monkeypatch):
    """Resuming a finished run draws nothing: a read-only --plot folder holding its pictures was refused once
    folders were probed (it was not before)."""
    from loramerge_cli import outputs

    args = ["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file, "--threads", "1",
            "--strategy", "random", "--budget", "2", "--run-dir", tmp_path / "run", "--plot", tmp_path / "plots"]
    done = invoke_cli([*args, "--out", tmp_path / "table.json"])
    assert done.exit_code == 0, done.stderr
    writable = outputs.tempfile.mkstemp

    def unwritable(*args, dir=None, **kwargs):
        if Path(dir).name == "plots":
            raise PermissionError(1, "Operation not permitted")
        return writable(*args, dir=dir, **kwargs)

    monkeypatch.setattr(outputs.tempfile, "mkstemp", unwritable)
    again = invoke_cli([*args, "--resume", "--out", tmp_path / "again.json"])
    assert again.exit_code == 0, again.stderr


def test_a_tie_is_within_epsilon_of_the_kth_value_not_a_chain_of_near_ties():
    """past_ties compared each value with the one before it, so a slowly decaying spectrum (steps of 0.9e-6)
    carried the cut along all of it."""
    import torch

    from loramerge_cli.merging.lowrank import past_ties

    decaying = torch.tensor([1 - index * 0.9e-6 for index in range(50)] + [0.5], dtype=torch.float64)
    assert past_ties(decaying, 1) == 2
    assert past_ties(torch.tensor([3.0, 1.0, 1.0, 1.0, 0.5], dtype=torch.float64), 2) == 4
    assert past_ties(torch.tensor([3.0, 1.0], dtype=torch.float64), 2) == 2


def test_plot_and_run_dir_dash_are_refused(setting, tmp_path, monkeypatch):
    """`--plot -` and `--run-dir -` made a folder named '-' (`--out -` is refused)."""
    monkeypatch.chdir(tmp_path)
    args = ["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file, "--out", "t.json"]
    one_line(invoke_cli([*args, "--plot", "-"]), "--plot -: give a folder's path", code=2)
    one_line(invoke_cli([*args, "--run-dir", "-"]), "--run-dir -: give a folder's path", code=2)
    assert not (tmp_path / "-").exists()


def test_an_output_s_copy_of_its_table_names_no_absolute_path(setting, tmp_path):
    """`merge --mask` and `apply-mask` copied the table verbatim into the output (mask.json, loramerge.json's
    weight_table): the adapters' absolute sources and the search's command line with absolute paths were
    uploaded by --push-to-hub, where loramerge.json's own records are relative to the folder."""
    import json
    import os

    adapters = [str(folder.resolve()) for folder in setting.adapters.values()]
    table = tmp_path / "table.json"
    searched = invoke_cli(["search-mask", "--adapters", *[f"{n}={a}" for n, a in zip(setting.adapters, adapters)],
                           "--tasks", setting.tasks_file.resolve(), "--strategy", "random", "--budget", "2",
                           "--threads", "1", "--out", table.resolve()])
    assert searched.exit_code == 0, searched.stderr
    named = [f"{n}={a}" for n, a in zip(setting.adapters, adapters)]
    merged = invoke_cli(["merge", "--adapters", *named, "--mask", table, "--out", tmp_path / "merged"])
    pruned = invoke_cli(["apply-mask", "--adapters", *named, "--mask", table, "--out", tmp_path / "pruned"])
    assert merged.exit_code == 0 and pruned.exit_code == 0, merged.stderr + pruned.stderr
    for written in (tmp_path / "merged" / "mask.json", tmp_path / "merged" / "loramerge.json",
                    tmp_path / "pruned" / "mask.json"):
        assert str(setting.root.resolve()) not in written.read_text(), written
    copy = json.loads((tmp_path / "merged" / "mask.json").read_text())
    assert copy["adapters"][0]["source"] == os.path.relpath(adapters[0], tmp_path / "merged")
    assert json.loads(table.read_text())["adapters"][0]["source"] == adapters[0]  # the user's own file: as it was
    relative = tmp_path / "relative.json"  # a search given relative paths, in another working folder
    data = json.loads(table.read_text())
    data["adapters"] = [{**record, "source": f"adapters/{task}"} for task, record in zip(data["tasks"],
                                                                                         data["adapters"])]
    relative.write_text(json.dumps(data))
    again = invoke_cli(["merge", "--adapters", *named, "--mask", relative, "--out", tmp_path / "sub" / "merged"])
    assert again.exit_code == 0, again.stderr
    copy = json.loads((tmp_path / "sub" / "merged" / "mask.json").read_text())
    assert copy["adapters"][0]["source"] == os.path.relpath(adapters[0], tmp_path / "sub" / "merged")


def test_heads_files_take_the_dtype_asked_for(setting, tmp_path):
    """`merge --dtype bfloat16` wrote the factors and the served head in bfloat16 and every heads/<task>.safetensors
    in float32 (the CHANGELOG promised the output's dtype); without --dtype they keep their own."""
    import torch
    from safetensors.torch import load_file

    for dtype, expected in (("bfloat16", torch.bfloat16), (None, torch.float32)):
        out = tmp_path / f"merged_{dtype}"
        result = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--out", out]
                            + (["--dtype", dtype] if dtype else []))
        assert result.exit_code == 0, result.stderr
        for heads in (out / "heads").glob("*.safetensors"):
            assert {tensor.dtype for tensor in load_file(str(heads)).values()} == {expected}, heads


def test_the_model_card_says_exact_names_its_pipeline_and_a_disagreement_on_the_base(setting, tmp_path):
    """The card said "Truncated: 8 dense modules written at reduced rank" for factorisations exact to 6e-15, had
    no pipeline_tag (the Hub infers one from the base's architecture: a classifier on a causal-LM base reads
    text-generation), printed `out_rank=None`, and said "Base model: not recorded by the inputs" for inputs that
    name two different bases."""
    import json
    import shutil

    out = tmp_path / "exact"
    result = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--merger", "ties", "--out-rank", "64",
                         "--out", out])
    assert result.exit_code == 0, result.stderr
    card = (out / "README.md").read_text()
    assert "Truncated" not in card and "- Exact:" in card and "pipeline_tag: text-classification" in card
    lossy = tmp_path / "lossy"
    lossy_merge = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--merger", "ties", "--out", lossy])
    assert lossy_merge.exit_code == 0, lossy_merge.stderr
    assert "=None" not in (lossy / "README.md").read_text()
    other = tmp_path / "other_base"
    shutil.copytree(setting.adapters["beta"], other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/elsewhere/base"}))
    mixed = invoke_cli(["merge", "--adapters", f"alpha={setting.adapters['alpha']}", f"beta={other}",
                        "--allow-base-mismatch", "--out", tmp_path / "mixed"])
    assert mixed.exit_code == 0, mixed.stderr
    assert "the inputs name 2 different bases" in (tmp_path / "mixed" / "README.md").read_text()


def test_force_does_not_replace_a_file_edited_since_loramerge_wrote_it(setting, tmp_path):
    """A hand-written section added to a merge's model card (or an edited adapter_config.json of apply-mask's
    task folder) was dropped without a word by `--force`: only the folder's file names were checked.
    loramerge.json records the sha256 of what the command wrote; an edited file is refused."""
    import json

    args = ["merge", "--adapters", *setting.adapter_args(), "--out", tmp_path / "merged"]
    assert invoke_cli(args).exit_code == 0
    assert "README.md" in json.loads((tmp_path / "merged" / "loramerge.json").read_text())["files"]
    again = invoke_cli([*args, "--merger", "ties", "--force"])  # untouched: replaced
    assert again.exit_code == 0, again.stderr
    with (tmp_path / "merged" / "README.md").open("a") as card:
        card.write("\n## Intended use\nWritten by hand.\n")
    one_line(invoke_cli([*args, "--force"]), "merged/README.md changed or added since loramerge wrote")
    assert "Written by hand." in (tmp_path / "merged" / "README.md").read_text()

    table = tmp_path / "table.json"
    api.ones_table(api.load_adapters(setting.adapter_args())).save(table)
    pruned = ["apply-mask", "--adapters", *setting.adapter_args(), "--mask", table, "--out", tmp_path / "pruned"]
    assert invoke_cli(pruned).exit_code == 0
    config = tmp_path / "pruned" / "alpha" / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_dropout": 0.0', '"lora_dropout": 0.1'))
    one_line(invoke_cli([*pruned, "--force"]), "pruned/alpha/adapter_config.json changed or added since")



def test_the_force_guard_lets_a_recipe_be_rebuilt_and_reads_line_ends_as_text(setting, tmp_path):
    """The guard's review: editing an output's own loramerge.yaml and rebuilding it in place (the documented
    way to change a merge) was refused as an edit; a checkout with CRLF line ends (git's autocrlf) read as an
    edit of every text file; a mask.json put into a merge folder that had none was deleted by --force; a table
    whose provenance command is no shell line (an unclosed quote) failed `merge --mask` with an internal error."""
    import json

    out = tmp_path / "merged"
    assert invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--merger", "ties", "--out", out]).exit_code == 0
    recipe = out / "loramerge.yaml"
    recipe.write_text(recipe.read_text().replace("merger: ties", "merger: ta"))
    rebuilt = invoke_cli(["merge", "--config", recipe, "--out", out, "--force"])
    assert rebuilt.exit_code == 0, rebuilt.stderr
    assert "merger: ta" in recipe.read_text()
    for name in ("README.md", "adapter_config.json"):
        (out / name).write_bytes((out / name).read_bytes().replace(b"\n", b"\r\n"))
    again = invoke_cli(["merge", "--config", recipe, "--out", out, "--force"])
    assert again.exit_code == 0, again.stderr
    table = json.loads(api.ones_table(api.load_adapters(setting.adapter_args())).text())
    (out / "mask.json").write_text(json.dumps(table))
    one_line(invoke_cli(["merge", "--config", recipe, "--out", out, "--force"]), "merged/mask.json changed or added")
    table["provenance"] = {"command": "python make_table.py --note \"it's mine"}
    (tmp_path / "odd.json").write_text(json.dumps(table))
    masked = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--mask", tmp_path / "odd.json", "--out",
                         tmp_path / "masked"])
    assert masked.exit_code == 0, masked.stderr
