"""A seventh hostile review (of main at 534a233): run directories of strategies without a state, result files
that appear while a command runs, foreign `scores.json` files, what the library accepts that the CLI refuses,
and settings a strategy never reads. One test per defect, each failing on that commit; each docstring says what
the user did, what happened and what should happen."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from eval_fixtures import build_text_setting
from factories import invoke_cli

from loramerge_cli import api
from loramerge_cli.errors import LoramergeError, UsageError
from loramerge_cli.evaluation.engine import EvalSettings
from loramerge_cli.merging.merge import MergeConfig
from loramerge_cli.search.enmp import EnmpSettings
from loramerge_cli.search.nsc_settings import NscSettings
from loramerge_cli.search.plan import SearchRequest, plan_search


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    return build_text_setting(tmp_path_factory.mktemp("review7"))


def _search(setting, *extra):
    budget = [] if "--budget" in extra else ["--popsize", "4", "--generations", "2"]  # (greedy's, random's budget)
    seed = [] if "greedy" in extra else ["--seed", "3"]  # (greedy draws nothing: --seed is refused)
    return ["search-mask", "--strategy", "screened",
            "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file, "--merger", "ties",
            *budget, "--max-prune", "0.5", "--threads", "1", *seed, *extra]


def _request(setting, **changes) -> SearchRequest:
    if changes.get("strategy") == "nsc":  # it reads none of the mask strategies' settings, nor a merger's
        changes.setdefault("enmp", EnmpSettings())
        changes.setdefault("merge", MergeConfig(merger="ta"))
    if changes.get("strategy") in ("greedy", "random"):
        seed = 3 if changes["strategy"] == "random" else EnmpSettings.seed  # (greedy and ties draw nothing)
        sized = {} if changes.get("budget") is not None else {"popsize": 4, "generations": 2}  # (or the budget)
        changes.setdefault("enmp", EnmpSettings(max_prune=0.5, seed=seed, **sized))
    return replace(SearchRequest(strategy="screened", adapters=setting.adapter_args(), merge=MergeConfig(merger="ties"),
                                 tasks=setting.tasks_file, eval=EvalSettings(threads=1, batch_size=8),
                                 enmp=EnmpSettings(popsize=4, generations=2, max_prune=0.5, seed=3)), **changes)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _search_while_the_user_writes(setting, monkeypatch, out: Path, text: str) -> Path:
    """A search whose --out the user writes `text` to as the search ends; returns where the result was kept."""
    from loramerge_cli.search import runner

    run_search = runner.run_search

    def user_writes_meanwhile(request, on_event):
        result = run_search(request, on_event)
        out.write_text(text)
        return result

    monkeypatch.setattr(runner, "run_search", user_writes_meanwhile)
    with pytest.raises(LoramergeError, match="appeared while the command ran.*the result is in") as error:
        api.search(plan_search(_request(setting, strategy="enmp"), out=out))
    return Path(str(error.value).rsplit(" ", 1)[1])


# --- users' files -------------------------------------------------------------------------------------------

def test_a_finished_greedy_run_dir_is_not_taken_over_by_the_next_search(setting, tmp_path):
    """`search-mask --strategy greedy --run-dir runs/g`, then `--strategy random --run-dir runs/g`: both exited 0
    and the second replaced the first's best.json and config.json (greedy and random save no strategy state,
    and only a state marked a folder as holding a search). The second should be refused in one line."""
    run_dir = tmp_path / "runs"
    first = invoke_cli(_search(setting, "--strategy", "greedy", "--budget", "3", "--run-dir", run_dir,
                               "--out", tmp_path / "g1.json"))
    assert first.exit_code == 0, first.stderr
    before = {name: _digest(run_dir / name) for name in ("best.json", "config.json")}
    second = invoke_cli(_search(setting, "--strategy", "random", "--budget", "3", "--run-dir", run_dir,
                                "--out", tmp_path / "g2.json"))
    assert second.exit_code == 1 and "already holds a finished search" in second.stderr
    assert {name: _digest(run_dir / name) for name in before} == before


def test_force_does_not_replace_a_run_directory_s_best_table(setting, tmp_path):
    """`search-mask … --run-dir runs/r1`, then another search with `--out runs/r1/best.json --force`: exit 0,
    and the first run's best.json was replaced (it is a mask file, and --force replaces mask files). A file of
    a run directory should be refused even with --force."""
    run_dir = tmp_path / "r1"
    first = invoke_cli(_search(setting, "--strategy", "enmp", "--run-dir", run_dir, "--out", tmp_path / "m1.json"))
    assert first.exit_code == 0, first.stderr
    best = run_dir / "best.json"
    before = _digest(best)
    result = invoke_cli(_search(setting, "--strategy", "enmp", "--seed", "7", "--out", best, "--force"))
    assert result.exit_code == 1 and "part of the search run directory" in result.stderr
    assert _digest(best) == before


def test_out_onto_this_run_s_own_file_is_named_as_such(setting, tmp_path):
    """`--run-dir r --out r/best.json` was refused as "the input r/best.json": it is the run's own file."""
    run_dir = tmp_path / "r"
    for name in ("best.json", "surrogate_state.json", ".lock"):
        result = invoke_cli(_search(setting, "--run-dir", run_dir, "--out", run_dir / name))
        assert result.exit_code == 1 and "the run-directory file" in result.stderr, result.stderr
        assert "input" not in result.stderr and not run_dir.exists()


def test_a_user_s_scores_json_in_the_run_dir_is_refused_before_any_model_loads(setting, tmp_path):
    """`mkdir results; echo '{"first_kind": 0.91}' > results/scores.json; search-mask … --run-dir results`: exit
    0, and the user's file gained four hash keys (the score cache wrote into it); `eval --run-dir` on a folder
    holding eval's own report said "unreadable score cache; delete it", after loading the model. Both should be
    refused in one line before any work, the file untouched."""
    results = tmp_path / "results"
    results.mkdir()
    users = results / "scores.json"
    users.write_text('{"first_kind": 0.91, "last_kind": 0.88}')
    before = _digest(users)
    searched = invoke_cli(_search(setting, "--strategy", "enmp", "--run-dir", results, "--out", tmp_path / "m.json"))
    assert searched.exit_code == 1 and "not a score cache loramerge wrote" in searched.stderr
    assert _digest(users) == before
    report = tmp_path / "report"
    report.mkdir()
    (report / "scores.json").write_text(json.dumps({"format": "loramerge.eval/v1", "rows": []}))
    evaluated = invoke_cli(["eval", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                            "--threads", "1", "--run-dir", report])
    assert evaluated.exit_code == 1 and "not a score cache loramerge wrote" in evaluated.stderr
    assert len(evaluated.stderr.strip().splitlines()) == 1


def test_a_file_that_appears_at_out_during_a_search_is_not_replaced(setting, tmp_path, monkeypatch):
    """`search-mask --out race.json &`, then `echo "my precious notes" > race.json` while it runs: exit 0 and
    the notes were gone (the table was renamed over them; `merge` re-checks its --out, `search-mask` and `eval`
    did not). The file should be kept, and the finished table not lost either."""
    out = tmp_path / "race.json"
    kept = _search_while_the_user_writes(setting, monkeypatch, out, "my precious notes")
    assert out.read_text() == "my precious notes"
    assert kept.parent == tmp_path and api.load_table(kept).tasks == ["alpha", "beta", "gamma"]


# --- the library refuses what the CLI refuses ---------------------------------------------------------------

def test_the_library_s_eval_refuses_what_the_cli_refuses(setting, tmp_path):
    """`api.evaluate(…, run_dir=<an input adapter's folder>)` wrote scores.json into the adapter's folder;
    a merged adapter named "base" gave two rows named base; `EvalSettings(val_limit=-3)` scored 253 of 256
    examples (a Python slice) and `val_limit=0` raised a torch error. Each should be one usage or data error,
    before any model loads."""
    experts = api.load_adapters(setting.adapter_args())
    folder = setting.adapters["alpha"]
    with pytest.raises(LoramergeError, match="--run-dir .* the input"):
        api.evaluate(setting.tasks_file, experts, [], EvalSettings(threads=1), run_dir=folder)
    assert not (Path(folder) / "scores.json").exists()
    named_base = api.load_adapters([f"base={folder}"])
    with pytest.raises(UsageError, match="name rows of the report"):
        api.evaluate(setting.tasks_file, experts, named_base, EvalSettings(threads=1))
    for limit in (-3, 0, 2.5):
        with pytest.raises(UsageError, match="--val-limit must be an integer >= 1"):
            api.evaluate(setting.tasks_file, experts, [], EvalSettings(threads=1, val_limit=limit))


def test_the_library_refuses_a_table_with_a_nan_weight_or_a_short_row(setting):
    """A WeightTable built in code with a NaN weight passed `api.check_table` and `api.merge` returned a merge
    full of NaN; a row shorter than the units raised IndexError. `load_table` refuses both in a file: the
    library should refuse them the same way."""
    adapters = api.load_adapters(setting.adapter_args())
    ones = api.ones_table(adapters)
    nan = replace(ones, weights=[[math.nan, *row[1:]] for row in ones.weights])
    short = replace(ones, weights=[row[:-1] for row in ones.weights])
    for table, problem in ((nan, "not a finite number"), (short, "needs 2 numbers")):
        with pytest.raises(LoramergeError, match=problem):
            api.check_table(table, adapters)
        with pytest.raises(LoramergeError, match=problem):
            api.merge(adapters, MergeConfig(merger="ta"), table)


@pytest.mark.parametrize("changes, message", [
    ({"strategy": "enmp", "options": {"eta": 5}}, "--strategy enmp has no setting eta"),
    ({"strategy": "greedy", "options": {"bogus": 5}}, "--strategy greedy has no setting bogus"),
    ({"options": {"eta": 2.5}}, "--eta must be int"),
    ({"options": {"screen": "no"}}, "--screen must be bool"),
    ({"options": {"greedy_pool": True}}, "--greedy-pool must be int"),
    ({"enmp": EnmpSettings(popsize=2.5)}, "--popsize must be an integer >= 2"),
    ({"budget": 2.5}, "--budget must be an integer >= 1"),
    ({"eval": EvalSettings(dtype="float8")}, "--dtype must be one of"),
    ({"strategy": "greedy", "enmp": EnmpSettings(addscale=True)}, "--addscale does nothing with --strategy greedy"),
    ({"strategy": "enmp", "budget": 2}, "--budget does nothing with --strategy enmp"),
    ({"strategy": "enmp", "sparsity": 0.1}, "--sparsity does nothing with --strategy enmp"),
    ({"strategy": "greedy", "enmp": EnmpSettings(threshold=0.3)}, "--threshold does nothing with --strategy greedy"),
    ({"strategy": "enmp", "nsc": NscSettings(steps=5)}, "--steps does nothing with --strategy enmp"),
    ({"strategy": "nsc", "enmp": EnmpSettings(popsize=4)}, "--popsize does nothing with --strategy nsc"),
    ({"strategy": "nsc", "budget": 3}, "--budget does nothing with --strategy nsc"),
    ({"strategy": "random", "sparsity": 0.4, "enmp": EnmpSettings(max_prune=0.1)}, "--sparsity must be in"),
])
def test_plan_search_refuses_settings_the_cli_would_refuse(setting, changes, message):
    """`api.plan_search` accepted each of these (and the search ran, or failed after the model loaded): an
    option of another strategy, a value of the wrong type, a shared setting the strategy never reads, a random
    sparsity above the ρ cap (the table then pruned 13 of 32 units under `--max-prune 0.1`)."""
    with pytest.raises(UsageError, match=message):
        plan_search(_request(setting, **changes))


def test_the_cli_refuses_a_setting_the_strategy_never_reads(setting, tmp_path):
    """`search-mask --strategy enmp --budget 2` exited 0 after 15 evaluations (ENMP has no budget), as did
    `--strategy greedy --threshold 0.3`; `--eta 2` with enmp was refused. Each should be a usage error."""
    for flags, name in ((["--strategy", "enmp", "--budget", "2"], "--budget"),
                        (["--strategy", "greedy", "--threshold", "0.3"], "--threshold"),
                        (["--strategy", "random", "--sparsity", "0.9"], "--sparsity")):
        result = invoke_cli(_search(setting, *flags, "--out", tmp_path / "m.json"))
        assert result.exit_code == 2 and name in result.stderr, result.stderr
        assert not (tmp_path / "m.json").exists()


def test_random_masks_respect_the_prune_cap(setting):
    """`--strategy random --sparsity 0.45 --max-prune 0.45` on 2 blocks × 3 tasks: the ρ cap is ⌊0.45·6⌋ = 2
    units, but the masks pruned round(0.45·6) = 3."""
    table, _ = api.search(plan_search(_request(setting, strategy="random", sparsity=0.45, budget=3,
                                               enmp=EnmpSettings(max_prune=0.45, seed=3))))
    assert sum(weight == 0 for row in table.weights for weight in row) == 2


def test_search_threads_must_be_positive(setting, tmp_path):
    """`search-mask --threads -2`: "internal error: RuntimeError: set_num_threads expects a positive integer";
    `--threads 0` silently ran with the default. Every other command refuses both (exit 2)."""
    for threads in ("-2", "0"):
        args = _search(setting, "--out", tmp_path / "m.json")
        args[args.index("--threads") + 1] = threads
        result = invoke_cli(args)
        assert result.exit_code == 2 and "--threads" in result.stderr


def test_a_huge_integer_in_a_mask_is_a_data_error(setting, tmp_path):
    """A mask whose weight (or scale, or recorded λ) is a 400-digit integer: "internal error: OverflowError: int
    too large to convert to float". It should be one line naming the file, exit 1."""
    adapters = api.load_adapters(setting.adapter_args())
    data = api.ones_table(adapters).to_json()
    huge = int("9" * 400)
    for change in ({"weights": [[huge, *row[1:]] for row in data["weights"]]}, {"scale": huge},
                   {"merger": {"method": "ta", "lambda": huge}}):
        mask = tmp_path / "mask.json"
        mask.write_text(json.dumps({**data, **change}))
        result = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--mask", mask,
                             "--out", tmp_path / "merged"])
        assert result.exit_code == 1 and "internal error" not in result.stderr, result.stderr
        assert str(mask) in result.stderr


def test_a_search_refuses_a_merge_whose_evaluated_weights_are_not_finite(setting, tmp_path):
    """`search-mask --lambda 1e6 --eval-dtype float16`: exit 0, every table scoring chance ("25.00 -> 25.00"),
    while `merge --lambda 1e6 --dtype float16` refuses the same merge. The model's weights overflow float16:
    the search should refuse in one line instead of optimising noise."""
    result = invoke_cli(_search(setting, "--strategy", "enmp", "--lambda", "1e6", "--eval-dtype", "float16",
                                "--out", tmp_path / "m.json"))
    assert result.exit_code == 1 and "NaN or Inf values in float16" in result.stderr, result.stderr
    assert not (tmp_path / "m.json").exists()


# --- a newcomer's findings ------------------------------------------------------------------------------------

def test_greedy_pool_0_is_off_with_no_screen_too():
    """`search-mask --no-screen --greedy-pool 0`: "--greedy-pool does nothing with --no-screen", although the
    help says 0 (or 1) switches the greedy phase off, which --no-screen does too. Turning it off is no conflict."""
    from loramerge_cli.search.strategies import SCREENED, check_needs

    for pool in (0, 1):
        check_needs(SCREENED, {"screen": False, "greedy_pool": pool})
    with pytest.raises(UsageError, match="--greedy-pool does nothing with --no-screen"):
        check_needs(SCREENED, {"screen": False, "greedy_pool": 4})


def test_result_tables_are_not_cut_when_stdout_is_a_file(capsys):
    """`loramerge eval … > scores.txt` wrote headers like `majority_k…`, and the NSC table cut every module to
    `model.layers.6.self…`: a console that is not a terminal is 80 columns wide. A result written to a file or
    a pipe should hold every name whole."""
    from rich.table import Table

    from loramerge_cli.cli.common import result_console

    table = Table("module", *(f"task_with_a_long_name_{index}" for index in range(6)))
    table.add_row("model.layers.6.self_attn.k_proj", *["0.4000"] * 6)
    result_console().print(table)
    printed = capsys.readouterr().out
    assert "model.layers.6.self_attn.k_proj" in printed and "task_with_a_long_name_5" in printed


def test_the_resume_hint_repeats_how_the_run_ran(setting, tmp_path):
    """Ctrl-C printed `resume with: loramerge search-mask --run-dir runs/ta2 --resume`, dropping `--threads 1`
    (threads are not saved in the run): resumed as printed, the rest ran with another thread count (slower
    here, and not the bit-for-bit comparison the README asks for)."""
    from loramerge_cli.search.runner import resume_command

    request = _request(setting, run_dir=tmp_path / "my run", flags={"threads": 1, "workers": None, "device": "cpu"})
    assert resume_command(request) == f"loramerge search-mask --run-dir '{tmp_path / 'my run'}' --resume --threads 1"


def test_resume_without_a_run_dir_names_the_missing_flag(tmp_path):
    """`search-mask --resume` alone: "Invalid value for '--adapters': missing (needed unless --run-dir DIR
    --resume continues a saved search)", which blames a flag a resume need not give."""
    result = invoke_cli(["search-mask", "--strategy", "screened", "--resume", "--out", tmp_path / "m.json"])
    assert result.exit_code == 2 and "--resume needs --run-dir" in result.stderr


def test_the_eta_after_a_resume_counts_only_this_process_s_generations(monkeypatch):
    """Resumed at generation 22 of 30, the line said "gen 22/30 … eta 2s" though 8 generations of seconds each
    were left: the pace was this process's seconds over all 22 generations, 21 of them done before it started."""
    import io

    from rich.console import Console

    from loramerge_cli.cli import render

    now = {"t": 100.0}
    monkeypatch.setattr("time.monotonic", lambda: now["t"])
    console = Console(file=io.StringIO(), width=200)
    on_event = render.search_progress(console, 30)
    record = {"best_fitness": 1.0, "mean_fitness": 0.0, "mean_sparsity": 0.1, "distinct_evaluated": 5,
              "cache_hits": 0, "seconds_per_evaluation": 1.0}
    now["t"] = 110.0  # the resumed process's first generation took 10 s
    on_event("generation", {**record, "generation": 22})
    assert "eta 1m20s" in console.file.getvalue(), console.file.getvalue()


def test_a_failed_output_leaves_no_folder_it_made(tmp_path):
    """`merge --out intr/m0.3` interrupted by Ctrl-C said "nothing was written" and left an empty `intr/`: the
    parent folders made for the output stay behind when the output does not."""
    from loramerge_cli.outputs import staged_folder

    out = tmp_path / "intr" / "deeper" / "m"
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(out) as staging:
            (staging / "adapter_model.safetensors").write_bytes(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "mine"
    kept.mkdir()
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(kept / "new" / "m"):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == [kept] and list(kept.iterdir()) == []


def test_ray_errors_name_loramerge_s_flag():
    """`--backend ray --ray-address auto` with no cluster: "…Please specify the one to connect to by setting
    '--address' flag…", Ray's own CLI flag; loramerge's is --ray-address."""
    from loramerge_cli.search.ray_backend import _first_line

    message = _first_line(ConnectionError("Found multiple active Ray instances. Please specify the one to connect "
                                          "to by setting '--address' flag or `RAY_ADDRESS`\nmore"))
    assert "--ray-address" in message and "'--address'" not in message and "more" not in message


def test_truncation_flags_on_an_exact_merge_are_a_usage_error(setting, tmp_path):
    """`merge --merger ta --energy 0.9 --out-rank 4` exited 0 and wrote rank-28 factors: ta is exact in the LoRA
    factors and never truncates, so the flags did nothing (as `--density` with ta, which is refused)."""
    for flags in (["--out-rank", "4"], ["--energy", "0.9"]):
        result = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--merger", "ta", *flags,
                             "--out", tmp_path / "m"])
        assert result.exit_code == 2 and "truncates dense merges" in result.stderr, result.stderr
    dense = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--merger", "ties", "--out-rank", "4",
                        "--out", tmp_path / "ties", "--quiet"])
    assert dense.exit_code == 0, dense.stderr


def test_an_unreadable_config_is_one_line_and_exit_1(tmp_path):
    """`merge --config nope.yaml`: Click's usage block and "Invalid value for '--config': cannot read nope.yaml"
    with exit 2, while a missing --tasks or --mask file is one line and exit 1 (bad input, not bad usage)."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("merger: [ta\n")
    for config, words in ((tmp_path / "nope.yaml", "cannot read it"), (broken, "is not valid YAML")):
        result = invoke_cli(["merge", "--config", config, "--out", tmp_path / "m"])
        assert result.exit_code == 1 and words in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1


# --- a review of the fixes above ------------------------------------------------------------------------------

def test_a_run_saved_with_a_setting_its_strategy_never_reads_still_resumes(setting, tmp_path):
    """An ENMP run started before the unused-settings check, with `--budget 50` (which ENMP never read): its
    `--resume` was refused ("--budget does nothing with --strategy enmp") and no flag could change that, since a
    resume must keep the saved settings. A saved run resumes as it was saved."""
    import json as json_module

    from loramerge_cli.search import rundir
    from loramerge_cli.search.plan import run_config

    saved = _request(setting, strategy="enmp", budget=50, run_dir=tmp_path / "run")
    (tmp_path / "run").mkdir()
    rundir.write_config(tmp_path / "run", json_module.loads(json_module.dumps(run_config(saved))), {},
                        rundir.input_digests(saved))
    plan_search(replace(saved, resume=True))  # no error
    with pytest.raises(UsageError, match="--budget does nothing"):
        plan_search(replace(saved, run_dir=tmp_path / "new"))


def test_the_kept_result_finds_a_free_name(setting, tmp_path, monkeypatch):
    """The result kept beside an --out that appeared was named by the pid alone; pids repeat across runs (in a
    container the command is often pid 1), and a leftover of that name gave "internal error: FileExistsError" and
    lost the finished table."""
    import os

    leftover = tmp_path / f"o.loramerge-{os.getpid()}-1.json"
    leftover.write_text("an earlier run's kept table")
    kept = _search_while_the_user_writes(setting, monkeypatch, tmp_path / "o.json", "{}")
    assert kept != leftover and api.load_table(kept).tasks == ["alpha", "beta", "gamma"]
    assert leftover.read_text() == "an earlier run's kept table"


def test_only_a_run_directory_s_own_files_are_protected_under_force(setting, tmp_path):
    """A folder holding any `state.json` counted as a run directory, so `--out proj/mask.json --force` was refused;
    in a real run directory `eval --out R/report.json --force` could not replace its own report, and a search
    with `--run-dir R --out R/mask.json --force` said the file "changed while the command ran". Only the files
    a run directory keeps (its config, state, trajectory, best table, score cache) are protected."""
    from loramerge_cli.evaluation import REPORT_FORMAT
    from loramerge_cli.outputs import guard_output

    adapters = api.load_adapters(setting.adapter_args())
    project = tmp_path / "proj"
    project.mkdir()
    (project / "state.json").write_text('{"step": 3}')
    api.ones_table(adapters).save(project / "mask.json")
    guard_output(project / "mask.json", force=True, kind="file")  # no error
    run = tmp_path / "run"
    first = invoke_cli(_search(setting, "--strategy", "enmp", "--run-dir", run, "--out", run / "mask.json"))
    assert first.exit_code == 0, first.stderr
    (run / "report.json").write_text(json.dumps({"format": REPORT_FORMAT}))
    guard_output(run / "report.json", force=True, kind="file", formats=(REPORT_FORMAT,))  # no error
    again = invoke_cli(_search(setting, "--strategy", "enmp", "--run-dir", tmp_path / "run2", "--out",
                               run / "mask.json", "--force"))
    assert again.exit_code == 0, again.stderr
    with pytest.raises(LoramergeError, match="part of the search run directory"):
        guard_output(run / "best.json", force=True, kind="file")


def test_tables_built_with_numpy_or_tuples_are_accepted(setting):
    """`api.merge(adapters, table=…)` with weights of numpy float32 or int64, an ndarray, or tuple rows: refused
    ("not a finite number", "is not of type 'array'") by the new structure check; they merged before."""
    import numpy as np

    adapters = api.load_adapters(setting.adapter_args())
    ones = api.ones_table(adapters)
    shape = (len(ones.tasks), len(ones.units))
    for weights in ([[np.float32(1)] * shape[1]] * shape[0],
                    [[np.int64(1)] * shape[1]] * shape[0], np.ones(shape), [tuple([1.0] * shape[1])] * shape[0]):
        api.check_table(replace(ones, weights=weights), adapters)
        assert api.merge(adapters, MergeConfig(merger="ta"), replace(ones, weights=weights)) is not None


def test_eval_refuses_a_merge_named_base_before_its_workers_load(setting, tmp_path, monkeypatch):
    """`eval --merged base=… m=… --workers 2`: the worker processes loaded the model (3.7 s here, N copies of the
    base on GPUs) before the usage error, which came from the library's check inside the evaluation."""
    from loramerge_cli.search import backends

    def no_pool(*args, **kwargs):
        raise AssertionError("the workers started before the names were checked")

    monkeypatch.setattr(backends, "worker_pool", no_pool)
    folder = setting.adapters["alpha"]
    result = invoke_cli(["eval", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                         "--merged", f"base={folder}", f"m={folder}", "--workers", "2", "--threads", "1"])
    assert result.exit_code == 2 and "name rows of the report" in result.stderr, result.stderr


def test_the_nsc_eta_after_a_resume_counts_only_this_process_s_steps(monkeypatch):
    """Resumed at step 460 of 3000: "step 470/3000 … eta 0s" with 2,500 steps left."""
    import io

    from rich.console import Console

    from loramerge_cli.cli.render_nsc import nsc_progress

    now = {"t": 100.0}
    monkeypatch.setattr("time.monotonic", lambda: now["t"])
    console = Console(file=io.StringIO(), width=200)
    on_event = nsc_progress(console, 3000)
    for step in range(461, 471):
        now["t"] += 1.0
        on_event("step", {"step": step, "loss": 0.5, "seconds": 1.0})
    assert "step  470/3000" in console.file.getvalue() and "eta 42m10s" in console.file.getvalue()


def test_a_finished_greedy_run_dir_offers_its_table(setting, tmp_path):
    """Rerun in a finished greedy run dir: refused, naming --resume, which gives the finished table back (it said
    "cannot be resumed" while --resume did give the table)."""
    run = tmp_path / "g"
    assert invoke_cli(_search(setting, "--strategy", "greedy", "--budget", "2", "--run-dir", run, "--out",
                              tmp_path / "a.json")).exit_code == 0
    again = invoke_cli(_search(setting, "--strategy", "greedy", "--budget", "2", "--run-dir", run, "--out",
                               tmp_path / "b.json"))
    assert again.exit_code == 1 and "finished search: pass --resume to get its table" in again.stderr
    resumed = invoke_cli(_search(setting, "--strategy", "greedy", "--budget", "2", "--run-dir", run, "--out",
                                 tmp_path / "b.json", "--resume"))
    assert resumed.exit_code == 0, resumed.stderr
    assert (tmp_path / "b.json").read_bytes() == (tmp_path / "a.json").read_bytes()


# --- a review of merge, apply-mask and the library's merge API -------------------------------------------------

def test_force_keeps_a_user_s_folder_that_merely_holds_a_mask(setting, tmp_path):
    """`apply-mask … --out results --force` on a folder holding the user's own `mask.json` (any content) and
    notes, or `merge … --out exp --force` on a folder holding two merges and the mask they used: both exited 0
    and replaced the folder (any file named mask.json made it look like apply-mask's output). It is apply-mask's
    output only when mask.json is a loramerge table and the folders are one loramerge adapter per its tasks."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "mask.json").write_text('{"my": "notes"}')
    (results / "loramerge.yaml").write_text("# my notes\n")
    applied = invoke_cli(["apply-mask", "--adapters", *setting.adapter_args(), "--indices", "[0]", "--out", results,
                          "--force"])
    assert applied.exit_code == 1 and (results / "mask.json").read_text() == '{"my": "notes"}'
    experiment = tmp_path / "exp"
    experiment.mkdir()
    adapters = api.load_adapters(setting.adapter_args())
    api.ones_table(adapters).save(experiment / "mask.json")
    for name in ("m1", "m2"):
        made = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--mask", experiment / "mask.json",
                           "--out", experiment / name, "--quiet"])
        assert made.exit_code == 0, made.stderr
    merged = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--merger", "ties", "--out", experiment,
                         "--force"])
    assert merged.exit_code == 1 and (experiment / "m1").is_dir() and (experiment / "m2").is_dir()
    own = tmp_path / "applied"
    assert invoke_cli(["apply-mask", "--adapters", *setting.adapter_args(), "--indices", "[0]", "--out", own,
                       "--quiet"]).exit_code == 0
    again = invoke_cli(["apply-mask", "--adapters", *setting.adapter_args(), "--indices", "[1]", "--out", own,
                        "--force", "--quiet"])
    assert again.exit_code == 0, again.stderr  # apply-mask's own output is still replaceable


def test_a_config_without_lora_alpha_gets_peft_s_default(tmp_path):
    """An adapter_config.json without `lora_alpha` was read with α = r (scale 1), while PEFT builds the module
    with its default lora_alpha = 8: loramerge merged a different ΔW from the one PEFT runs."""
    import dataclasses
    import shutil

    from peft import LoraConfig
    from tiny_models import save_lora

    from loramerge_cli.adapters.peft_reader import PEFT_DEFAULT_ALPHA, PEFT_DEFAULT_R

    defaults = {field.name: field.default for field in dataclasses.fields(LoraConfig)}
    assert (PEFT_DEFAULT_R, PEFT_DEFAULT_ALPHA) == (defaults["r"], defaults["lora_alpha"])
    folder = save_lora("llama", tmp_path / "rte", 11, r=4, lora_alpha=8.0, target_modules=["q_proj"],
                       task_type="SEQ_CLS")
    bare = tmp_path / "no_alpha"
    shutil.copytree(folder, bare)
    config = json.loads((bare / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (bare / "adapter_config.json").write_text(json.dumps(config))
    assert {module.scale for module in api.load_adapter(str(bare)).modules.values()} == {8 / 4}


@pytest.mark.parametrize("config, message", [
    (MergeConfig(merger="knots", knots_scaled="false"), "--knots-scaled must be true or false"),
    (MergeConfig(merger="ta", isotropize="false"), "--isotropize must be true or false"),
    (MergeConfig(merger="ties", params={"densty": 0.5}), "no merger has a parameter 'densty'"),
    (MergeConfig(merger="lora_lego", params={"clusters": 1.5}), "--clusters must be an integer"),
    (MergeConfig(merger="ta", compute_dtype="float16"), "compute_dtype must be torch.float32 or torch.float64"),
    (MergeConfig(merger="ta", lam="auto"), "--lambda must be a finite number"),
    (MergeConfig(merger="della", params={"density": 0.1, "epsilon": 0.9}), "DELLA's keep probabilities"),
])
def test_the_library_s_merge_refuses_what_the_cli_refuses(setting, config, message):
    """`api.merge` read "false" as true, ignored a misspelt parameter, truncated 1.5 clusters to 1, and failed
    inside torch on a dtype name or on λ = "auto"; DELLA took a density/epsilon pair whose keep probabilities
    leave [0, 1] (entries that can never be kept, and a rescaling that is no longer unbiased)."""
    with pytest.raises(UsageError, match=message):
        api.merge(api.load_adapters(setting.adapter_args()), config)


def test_merge_refuses_flags_nothing_reads(setting, tmp_path):
    """`merge --merger ta --val-limit 5` (or --batch-size, --eval-dtype, --max-length, --workers, --tasks) and
    `merge --merger ta --seed 5` exited 0: only --lambda auto and regmean read the tasks, only randomized
    methods draw."""
    for flags in (["--val-limit", "5"], ["--tasks", setting.tasks_file], ["--workers", "2"], ["--seed", "5"]):
        result = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--merger", "ta", *flags,
                             "--out", tmp_path / "m"])
        assert result.exit_code == 2 and "does nothing" in result.stderr, (flags, result.stderr)
        assert not (tmp_path / "m").exists()


def test_lambda_0_is_an_empty_merge(setting, tmp_path):
    """`merge --lambda 0` wrote an all-zero adapter with exit 0, while `--weights 0,0,0` is refused with "the
    merge is empty … nothing to write"."""
    result = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--lambda", "0", "--out", tmp_path / "m"])
    assert result.exit_code == 2 and "the merge is empty" in result.stderr and not (tmp_path / "m").exists()
