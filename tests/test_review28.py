"""Defects found by the reviews of 2026-12-07 (tenth session), each test failing on the code before its fix."""

import torch


def test_energy_one_does_not_call_a_full_rank_factorisation_capped():
    """`--energy 1.0` on a module whose every singular value fits under the cap: Σσ² a rounding hair below
    ‖X‖² left the target "not reached", so the module was called capped (and counted in the warning)."""
    from loramerge_cli.merging.lowrank import truncate_dense

    for seed in range(8):
        X = torch.randn(16, 32, generator=torch.Generator().manual_seed(seed))
        factors, error, capped = truncate_dense(X, None, 1.0, 16)
        assert factors.left.shape[1] == 16 and error < 1e-5 and not capped, (seed, error)
    _, _, capped = truncate_dense(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)), None, 1.0, 16)
    assert capped  # rank 32 needed, 16 allowed: the cap binds


def test_an_interrupted_greedy_run_restarts_with_the_same_command(tmp_path):
    """Greedy interrupted once it had saved its clock: the hint said scores.json "the same command reuses them",
    the same command was refused ("a finished greedy or random search"), and --resume was refused too."""
    from dataclasses import replace

    import pytest
    from eval_fixtures import build_text_setting
    from loramerge_cli import interrupts
    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.evaluation.engine import EvalSettings
    from loramerge_cli.merging.merge import MergeConfig
    from loramerge_cli.search.enmp import EnmpSettings
    from loramerge_cli.search.runner import SearchRequest, run_search

    setting = build_text_setting(tmp_path / "setting")
    request = SearchRequest(strategy="greedy", adapters=setting.adapter_args(), merge=MergeConfig(merger="ties"),
                            tasks=setting.tasks_file, eval=EvalSettings(threads=1, batch_size=8),
                            enmp=EnmpSettings(max_prune=0.5), budget=6, run_dir=tmp_path / "run")
    plain, _ = run_search(replace(request, run_dir=None))

    def interrupt(kind, data):
        if (tmp_path / "run" / "elapsed.json").exists():
            raise KeyboardInterrupt

    interrupts.reset()
    with pytest.raises(KeyboardInterrupt):
        run_search(request, on_event=interrupt)
    assert "keeps no state to resume: rerun the command" in interrupts.hint()
    assert not (tmp_path / "run" / "finished.json").exists()
    with pytest.raises(LoramergeError, match="unfinished search with other settings"):
        run_search(replace(request, budget=5))
    (tmp_path / "run" / "elapsed.json").unlink()
    (tmp_path / "run" / "elapsed.json").mkdir()  # (a restart removed it: IsADirectoryError, "internal error")
    with pytest.raises(LoramergeError, match="elapsed.json is not a file"):
        run_search(request)
    (tmp_path / "run" / "elapsed.json").rmdir()
    again, _ = run_search(request)
    assert again.weights == plain.weights
    # a Ctrl-C between the finished run and its --out names --resume, which gives the table (not "rerun")
    assert "the search had finished" in interrupts.hint() and "--resume" in interrupts.hint()
    with pytest.raises(LoramergeError, match="already holds a finished search: pass --resume"):
        run_search(request)


def test_a_recipe_seed_is_dropped_by_a_search_that_draws_nothing(tmp_path):
    """A shared recipe with `seed: 7` (for a dare merge) and `search-mask --strategy greedy --merger ties`: exit 2
    ("--seed does nothing"), while merge drops such a seed with a warning. Typed on the command line it stays a
    usage error."""
    from eval_fixtures import build_text_setting
    from factories import invoke_cli

    setting = build_text_setting(tmp_path / "setting")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merger: dare\nseed: 7\n")
    command = ["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
               "--strategy", "greedy", "--merger", "ties", "--budget", "1", "--val-limit", "4", "--threads", "1"]
    result = invoke_cli([*command, "--config", recipe, "--out", tmp_path / "a.json"])
    assert result.exit_code == 0, result.stderr
    assert "the recipe's seed dropped: --strategy greedy and ties draw nothing" in result.stderr
    typed = invoke_cli([*command, "--seed", "7", "--out", tmp_path / "b.json"])
    assert typed.exit_code == 2 and "--seed does nothing" in typed.stderr
    # with a run dir, the same command resumes ("--seed is 7 but the saved run used 1"), also with the recipe alone
    run = [*command, "--config", recipe, "--run-dir", tmp_path / "run", "--out", tmp_path / "c.json"]
    assert invoke_cli(run).exit_code == 0
    resumed = invoke_cli([*run, "--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    ties_recipe = tmp_path / "ties.yaml"
    ties_recipe.write_text("merger: ties\nseed: 7\n")
    alone = invoke_cli(["search-mask", "--run-dir", tmp_path / "run", "--resume", "--config", ties_recipe])
    assert alone.exit_code == 0, alone.stderr


def test_a_cached_hub_base_commit_asks_nothing_and_an_unreachable_hub_is_named(tmp_path):
    """With the Hub unreachable (not HF_HUB_OFFLINE): `--base org/base@<commit>` held in the cache was looked up
    again (snapshot_download lists the tree even for a commit: five "Retrying" lines, ~23 s); and a cached repo
    whose snapshot lacks config.json was called "the repository has no config.json" though the Hub was never
    asked."""
    import socket
    import subprocess
    import sys
    import textwrap

    from test_hostile_inputs import REPO

    cache = tmp_path / "cache"
    for repo, commit, name in (("base", "a" * 40, "config.json"), ("nocfg", "b" * 40, "README.md")):
        snapshot = cache / f"models--org--{repo}" / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (snapshot / name).write_text("{}")
        (cache / f"models--org--{repo}" / "refs").mkdir()
        (cache / f"models--org--{repo}" / "refs" / "main").write_text(commit)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = textwrap.dedent(f"""
        from loramerge_cli.adapters.sources import pinned_base
        from loramerge_cli.errors import LoramergeError
        print(pinned_base("org/base@{'a' * 40}"))
        try:
            pinned_base("org/nocfg")
        except LoramergeError as error:
            print(error)
    """)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": REPO, "HF_HUB_CACHE": str(cache),
           "HF_HOME": str(tmp_path / "home"), "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    lines = process.stdout.splitlines()
    assert lines[0] == f"org/base@{'a' * 40}", (process.stdout, process.stderr)
    assert lines[1].startswith("org/nocfg: config.json is not in the local cache"), lines
    assert "could not be reached" in lines[1]
    assert "Retrying" not in process.stderr, process.stderr


def test_a_dumb_terminal_gets_the_plain_progress_lines():
    """`TERM=dumb` (a terminal on which rich draws no bar): nothing was shown until the result, neither a bar nor
    the plain lines a log gets."""
    import io

    from loramerge_cli.cli.progress import ProgressDisplay
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, _environ={"TERM": "dumb"})
    with ProgressDisplay(console=console) as display:
        assert not display.live
        display("stage_start", {"stage": "experts", "total": 2})
        display("stage_step", {"stage": "experts"})
        display("stage_step", {"stage": "experts"})
    assert "experts: 2 steps" in out.getvalue() and "experts: 2/2" in out.getvalue()


def test_a_bar_drawn_after_its_first_steps_counts_from_the_search_start():
    """The search's evaluations bar began at its first event, after the first 8 tables were scored: it said
    0:00:00 elapsed and a frozen `eta 0:00:01` while the line above said 23 s."""
    import io
    import re
    import time

    from loramerge_cli.cli.progress import ProgressDisplay
    from loramerge_cli.cli.render import search_progress
    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, width=200, _environ={"TERM": "xterm"})
    with ProgressDisplay(console=console) as display:
        on_event = search_progress(display, 5)
        on_event("start", {"reference": 50.0, "lambda": 0.5, "units": 8, "tasks": 2})
        time.sleep(0.4)  # the first 8 tables
        on_event("screen", {"full_evaluations": 8, "total": 40, "new_evaluations": 8, "best_fitness": 1.0, "tables": [],
                            "scores": [],
                            "seconds_per_evaluation": 0.05, "forward_examples": 64})
        task = display._progress.tasks[0]
        elapsed = task.elapsed
        text = str(display._progress.columns[4].render(task))
    assert elapsed >= 0.4
    assert re.fullmatch(r"eta \d+s", text), text


def test_narrow_terminals_cut_no_merge_value_nor_coefficient(llama_task_dirs, tmp_path, monkeypatch):
    """On a 28-column terminal merge's result table cut its values (`density=0.…`), and the NSC coefficient table
    cut its numbers to `0.…` at 60 columns: they fold, or become `name: value` lines, as inspect's and eval's do."""
    import io
    import sys

    from factories import invoke_cli
    from loramerge_cli.cli import merge_cmd
    from loramerge_cli.cli.render_nsc import nsc_summary
    from loramerge_cli.masks import WeightTable
    from rich.console import Console

    monkeypatch.setattr(merge_cmd, "result_console", lambda: Console(file=sys.stdout, width=28, markup=False))
    result = invoke_cli(["merge", "--adapters", *llama_task_dirs.values(), "--merger", "ties",
                         "--out", tmp_path / "m", "--threads", "1"])
    assert result.exit_code == 0 and "…" not in result.stdout and "density=0.8" in result.stdout, result.stdout
    units = [f"base_model.model.model.layers.{i}.self_attn.v_proj" for i in range(2)]
    table = WeightTable(tasks=["majority_kind", "first_kind"], units=units, weights=[[0.8125, 1.0625], [0.5, 0.75]])
    provenance = {"loss": {"first": 1.0, "last": 0.5}, "history": [{}, {}], "seconds": 1.0, "objective": "nsc",
                  "task_losses": {"tasks": table.tasks, "start": [1.0, 1.0], "end": [0.5, 0.5]}}
    out = io.StringIO()
    Console(file=out, width=60).print(nsc_summary(table, provenance))
    assert "…" not in out.getvalue() and all(f"{v:.4f}" in out.getvalue() for v in (0.8125, 1.0625, 0.5, 0.75))


def test_a_symlinked_adapter_keeps_its_name_in_the_run_and_the_resume_line_keeps_force(tmp_path):
    """`--adapters a/ b/` (symlinks to other names) saved the targets' paths bare, so `--resume` named the tasks
    after the targets ("no task for adapter(s) first_kind, …"); and "resume with: …" left out --force, so the
    line printed failed with "--out … already exists; pass --force"."""
    from loramerge_cli.search.rundir import normal_adapter
    from loramerge_cli.search.runner import SearchRequest, resume_command

    target = tmp_path / "adapters" / "first_kind"
    target.mkdir(parents=True)
    (tmp_path / "a").symlink_to(target)
    assert normal_adapter(str(tmp_path / "a") + "/") == f"a={target}"
    assert normal_adapter(str(target)) == str(target)  # (a plain folder: saved as before)
    assert normal_adapter(f"b={tmp_path / 'a'}") == f"b={target}"
    from loramerge_cli.evaluation.engine import EvalSettings
    from loramerge_cli.merging.merge import MergeConfig

    request = SearchRequest(adapters=[], merge=MergeConfig(), tasks="t.yaml", eval=EvalSettings(),
                            run_dir=tmp_path / "run", flags={"force": True})
    assert resume_command(request).endswith("--resume --force")


def test_two_owners_of_one_option_name_are_named_as_the_command_line_is_built(monkeypatch):
    """Two strategies each declaring a setting `k` (or a method parameter named `budget`) crashed every command at
    start with `ValueError: duplicate parameter name: 'k'`, from inspect, naming no owner."""
    from dataclasses import replace

    import pytest
    from loramerge_cli.cli import options
    from loramerge_cli.cli.search_cmd import strategy_options
    from loramerge_cli.search import strategies
    from loramerge_cli.search.parameters import StrategyParameter

    k = StrategyParameter("k", int, 2, "units pruned")
    for name in ("first_toy", "second_toy"):
        toy = replace(strategies.STRATEGIES["greedy"], name=name, parameters=(k,))
        monkeypatch.setitem(strategies.STRATEGIES, name, toy)
    with pytest.raises(TypeError, match="strategies 'first_toy' and 'second_toy' both declare a setting named 'k'"):
        strategy_options()
    budget = options.option("budget", int, 1, help="x")
    with pytest.raises(TypeError, match="two options of one command are named --budget"):
        options.signature([budget], [budget])


def test_the_library_refuses_the_wrong_kind_of_object_in_one_short_line(llama_task_dirs, tmp_path):
    """Loaded adapters given to plan_eval passed the plan and were refused by execute_eval in a 177,000-character
    message; type errors printed the whole object (100,000 characters for two adapters); a plan of the wrong kind,
    a path for a table or an adapter, or None for a path, failed deep inside with AttributeError or TypeError."""
    import numpy as np
    import pytest
    from loramerge_cli import api
    from loramerge_cli.errors import UsageError

    adapters = api.load_adapters(list(llama_task_dirs.values()))
    table = api.ones_table(adapters)
    paths = [str(path) for path in llama_task_dirs.values()]
    module = next(iter(adapters[0].modules.values()))
    merge_plan = api.plan_merge(adapters, api.MergeConfig(merger="ta"), out=tmp_path / "m")
    calls = [lambda: api.plan_eval(str(tmp_path / "tasks.yaml"), adapters, []),
             lambda: api.load_adapters(adapters), lambda: api.merge(adapters, adapters[0]),
             lambda: api.write_merged_adapter(adapters, adapters, tmp_path / "w"),
             lambda: api.search(merge_plan), lambda: api.execute_eval(merge_plan), lambda: api.write(merge_plan, None),
             lambda: api.check_table("mask.json", adapters), lambda: api.check_table(table, paths),
             lambda: api.apply_table(paths[0], table, 0), lambda: api.module_norm(adapters[0]),
             lambda: api.norm_grid(paths), lambda: api.load_table(None)]
    for call in calls:
        with pytest.raises(UsageError) as error:
            call()
        assert len(str(error.value)) < 400 and "\n" not in str(error.value), str(error.value)[:400]
    assert api.apply_table(adapters[0], table, np.int64(0)).name == adapters[0].name  # numpy's integers are integers
    assert api.module_norm(module) > 0
    api.check_table(table, adapters)


def test_a_numpy_seed_is_a_seed():
    """`EnmpSettings(seed=np.int64(1))`: "--seed must be an integer from 1 to 4294967295"."""
    import numpy as np
    from loramerge_cli.errors import check_seed

    check_seed(np.int64(1))
    check_seed(np.uint32(2**32 - 1))


def test_a_hand_edit_that_keeps_size_and_mtime_is_seen_in_the_same_process(tmp_path):
    """The digest cache was keyed by path, mtime and size: an edit keeping both (`touch -r`) was not seen by a
    second check in one process, so `--force` replaced a hand-edited output the CLI would have refused."""
    import os

    from loramerge_cli.outputs import output_digest

    path = tmp_path / "README.md"
    path.write_text("aaaa\n")
    before = output_digest(path)
    stat = os.stat(path)
    path.write_text("bbbb\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert output_digest(path) != before


def test_a_search_refused_the_run_dir_lock_leaves_the_holder_s_files(tmp_path, monkeypatch):
    """Two searches started together on a new run dir: the one refused the lock ("in use by another search")
    removed what the other had written since its first look (its config.json and .lock, or the whole folder), so
    the finished search could neither be resumed nor rerun, and a third could lock the folder beside it."""
    import pytest
    from filelock import FileLock
    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.evaluation.engine import EvalSettings
    from loramerge_cli.merging.merge import MergeConfig
    from loramerge_cli.search import rundir
    from loramerge_cli.search.enmp import EnmpSettings
    from loramerge_cli.search.runner import SearchRequest, run_search

    run_dir = tmp_path / "run"
    holder = FileLock(str(run_dir / ".lock"))
    enter = rundir.RunDirLock.__enter__

    def the_other_search_first(self):  # it makes the folder, locks it and saves its configuration meanwhile
        run_dir.mkdir(exist_ok=True)
        holder.acquire()
        (run_dir / "config.json").write_text("{}")
        return enter(self)

    monkeypatch.setattr(rundir.RunDirLock, "__enter__", the_other_search_first)
    request = SearchRequest(strategy="random", adapters=["a"], merge=MergeConfig(merger="ties"), tasks="t.yaml",
                            eval=EvalSettings(), enmp=EnmpSettings(max_prune=0.5), budget=2, run_dir=run_dir)
    with pytest.raises(LoramergeError, match="in use by another search"):
        run_search(request)
    assert (run_dir / "config.json").is_file() and (run_dir / ".lock").exists()
    holder.release()


def test_a_finished_run_gives_its_table_from_a_run_dir_it_cannot_lock(tmp_path, monkeypatch):
    """A finished run dir on a read-only mount: `--resume` refused with "--run-dir R: cannot use it (Read-only
    file system)" (taking the lock opens .lock for writing), though only its table is read."""
    from dataclasses import replace

    from eval_fixtures import build_text_setting
    from loramerge_cli import api
    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.evaluation.engine import EvalSettings
    from loramerge_cli.merging.merge import MergeConfig
    from loramerge_cli.search import rundir
    from loramerge_cli.search.enmp import EnmpSettings
    from loramerge_cli.search.runner import SearchRequest

    setting = build_text_setting(tmp_path / "setting")
    request = SearchRequest(strategy="random", adapters=setting.adapter_args(), merge=MergeConfig(merger="ties"),
                            tasks=setting.tasks_file, eval=EvalSettings(threads=1, batch_size=8),
                            enmp=EnmpSettings(max_prune=0.5), budget=2, run_dir=tmp_path / "run")
    table, _ = api.search(api.plan_search(request))

    def read_only(self):
        raise LoramergeError(f"--run-dir {self.run_dir}: cannot use it (Read-only file system)")

    monkeypatch.setattr(rundir.RunDirLock, "__enter__", read_only)
    again, _ = api.search(api.plan_search(replace(request, resume=True), out=tmp_path / "table.json"))
    assert again.weights == table.weights and (tmp_path / "table.json").is_file()


def test_apply_mask_of_real_weights_says_which_merges_of_the_copies_equal_merge_mask(llama_task_dirs, tmp_path):
    """An NSC table applied with apply-mask: "merge them with --lambda 1 (and the merger you choose) to get what
    merge --mask gives", but `--normalize weight` (and `--elect-on unweighted`) read each task's weight, which the
    copies cannot carry: 0.60 of ΔW apart. The warning now says so; a default TIES merge of the copies is equal."""
    from dataclasses import replace

    import torch
    from factories import invoke_cli
    from loramerge_cli import api
    from safetensors.torch import load_file

    adapters = api.load_adapters(list(llama_task_dirs.values()))
    ones = api.ones_table(adapters)
    weights = [[0.5 + 0.25 * ((task + unit) % 3) for unit in range(len(ones.units))] for task in range(2)]
    mask = tmp_path / "table.json"
    replace(ones, weights=weights, scale=1.0).save(mask)
    applied = invoke_cli(["apply-mask", "--adapters", *llama_task_dirs.values(), "--mask", mask,
                          "--out", tmp_path / "copies", "--threads", "1"])
    assert applied.exit_code == 0 and "except with --normalize weight or --elect-on unweighted" in applied.stderr
    copies = [tmp_path / "copies" / name for name in llama_task_dirs]

    def delta(folder):
        tensors = load_file(folder / "adapter_model.safetensors")
        return {key[: -len(".lora_A.weight")]: tensors[key.replace("lora_A", "lora_B")].double()
                @ tensors[key].double() for key in tensors if key.endswith("lora_A.weight")}

    def merged(*args):
        out = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        result = invoke_cli(["merge", *args, "--merger", "ties", "--out-rank", "64", "--out", out, "--threads", "1"])
        assert result.exit_code == 0, result.stderr
        return delta(out)

    def apart(first, second):
        return max(float(torch.linalg.norm(first[k] - second[k]) / torch.linalg.norm(first[k])) for k in first)

    by_mask = merged("--adapters", *llama_task_dirs.values(), "--mask", mask)
    assert apart(by_mask, merged("--adapters", *copies, "--lambda", "1")) < 1e-5
    by_mask_weight = merged("--adapters", *llama_task_dirs.values(), "--mask", mask, "--normalize", "weight",
                            "--override")
    assert apart(by_mask_weight, merged("--adapters", *copies, "--lambda", "1", "--normalize", "weight")) > 1e-3
    unit_table = replace(ones, scale=1.0)
    unit_table.save(tmp_path / "ones.json")
    plain = invoke_cli(["apply-mask", "--adapters", *llama_task_dirs.values(), "--mask", tmp_path / "ones.json",
                        "--out", tmp_path / "copies1", "--threads", "1"])
    assert plain.exit_code == 0 and "--normalize weight" not in plain.stderr


def test_the_lambda_grid_shows_how_many_points_each_stage_scores(text_setting, tmp_path):
    """`merge --lambda auto`'s grid, the longest part of the merge, had no total (`λ grid 0/?`, no ETA): the coarse
    grid and the refinement now are stages of known size, each with its time left."""
    import re

    from factories import invoke_cli

    result = invoke_cli(["merge", "--adapters", *text_setting.adapter_args(), "--merger", "ties", "--lambda", "auto",
                         "--tasks", text_setting.tasks_file, "--out", tmp_path / "m", "--threads", "1"])
    assert result.exit_code == 0, result.stderr
    assert re.search(r"^λ grid: \d+ steps$", result.stderr, re.M), result.stderr
    assert re.search(r"^λ grid, refined: \d+ steps$", result.stderr, re.M), result.stderr


def test_ray_s_raylet_messages_leave_stdout_to_the_result(capsys, monkeypatch):
    """A Ray worker killed mid-search: the raylet's "A worker died or was killed …" line was printed on stdout by
    Ray's driver (whatever log_to_driver says), before the --json document, which then did not parse."""
    import pytest

    pytest.importorskip("ray")
    from loramerge_cli.search.ray_backend import import_ray, raylet_messages_logged

    import_ray()
    from ray._private import worker as ray_worker

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # (restored after)
    raylet_messages_logged()
    raylet_messages_logged()  # (once per process: a second connect wraps nothing twice)
    ray_worker.print_to_stdstream({"lines": ["A worker died or was killed"], "pid": "raylet", "is_err": False},
                                  ignore_prefix=False)
    assert capsys.readouterr().out == ""


def test_a_ray_client_address_is_checked_before_any_work(monkeypatch):
    """`--ray-address ray://HOST:PORT` passed the probe untested and failed after the models loaded, always, with the
    `ray` extra ("Ray Client requires pip package `ray[client]`")."""
    import importlib.util
    import socket

    import pytest

    pytest.importorskip("ray")
    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.search.ray_backend import probe

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    if importlib.util.find_spec("grpc") is None:
        with pytest.raises(LoramergeError, match=r"needs Ray Client \(pip install 'ray\[client\]'\)"):
            probe(f"ray://127.0.0.1:{port}")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "grpc" else real(name, *a))
    with pytest.raises(LoramergeError, match="cannot connect to the Ray cluster at ray://"):
        probe(f"ray://127.0.0.1:{port}", timeout=2.0)


def test_a_table_without_headers_shows_none_when_it_becomes_lines():
    """merge's result table (no header row) in a 25-column terminal became `what: merger` / `value: ties …`
    lines: its internal column names, never meant to be shown."""
    import io

    from loramerge_cli.cli.render import Fitting
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("merger", "ties (method ties, space full)")
    table.add_row("parameters", "weights=[1.0,1.0,1.0,1.0],density=0.8")  # (one word wider than the terminal)
    out = io.StringIO()
    Console(file=out, width=25).print(Fitting(table))
    assert "what" not in out.getvalue() and "value" not in out.getvalue() and "merger" in out.getvalue()
