"""Defects found or left open by the review round of 2026-12-07 (night); each test fails on the code before its
fix."""
from __future__ import annotations

import multiprocessing
from pathlib import Path


def _put_many(run_dir: str, worker: int, count: int) -> None:
    from loramerge_cli.evaluation.cache import ScoreCache

    cache = ScoreCache(run_dir)
    for index in range(count):
        cache.put({f"{worker:02x}{index:062x}": 0.5})


def test_two_commands_sharing_a_score_cache_lose_no_score(tmp_path):
    # two processes re-read and replace scores.json: without a lock, one's rename drops what the other just wrote
    from loramerge_cli.evaluation.cache import read_cache

    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_put_many, args=(str(tmp_path), worker, 150)) for worker in range(3)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(120)
        assert process.exitcode == 0
    assert len(read_cache(Path(tmp_path) / "scores.json")) == 3 * 150


def test_inspect_lists_compatible_pairs_in_one_line_past_a_few_adapters():
    # 128 adapters printed 8,128 "a / b: compatible" lines; incompatible pairs keep a line each
    from loramerge_cli.cli.render import compatibility_lines

    def summary(count, bad=()):
        names = [f"t{i}" for i in range(count)]
        pairs = [{"adapters": [a, b], "compatible": (a, b) not in bad, "problems": ["rank differs"]}
                 for i, a in enumerate(names) for b in names[i + 1:]]
        return {"adapters": [{"name": name} for name in names], "pairs": pairs, "merge_refusals": []}

    lines = [line.plain for line in compatibility_lines(summary(128))]
    assert lines == ["all 8128 pairs: compatible", "merge would refuse: nothing known before merging"]
    lines = [line.plain for line in compatibility_lines(summary(5, bad={("t0", "t3")}))]
    assert lines[:2] == ["t0 / t3: rank differs", "the other 9 pairs: compatible"]
    lines = [line.plain for line in compatibility_lines(summary(3))]
    assert lines[:3] == ["t0 / t1: compatible", "t0 / t2: compatible", "t1 / t2: compatible"]


def test_nsc_says_when_no_coefficient_moved_from_init(tmp_path):
    # --lr too small to change a float32 coefficient wrote a table of --init everywhere without a word
    from eval_fixtures import build_text_setting
    from factories import invoke_cli

    from loramerge_cli.masks import load_table

    setting = build_text_setting(tmp_path / "setting")
    common = ["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file, "--strategy",
              "nsc", "--steps", "2", "--batch-size", "4", "--threads", "1"]
    still = invoke_cli([*common, "--lr", "1e-12", "--out", tmp_path / "still.json"])
    assert still.exit_code == 0, still.stderr
    assert "no coefficient moved from --init 0.4 in 2 steps" in " ".join(still.stderr.split())
    assert any("no coefficient moved" in line for line in load_table(tmp_path / "still.json").provenance["warnings"])
    moved = invoke_cli([*common, "--out", tmp_path / "moved.json"])
    assert moved.exit_code == 0 and "no coefficient moved" not in moved.stderr, moved.stderr


def test_the_model_card_names_the_command_the_rebuild_flags_and_the_data_lambda_was_tuned_on(tmp_path):
    # the card's rebuild line left out the --threads a regmean rebuild needs, the card had no command line (the
    # spec's "exact command line"), and a λ tuned on --val-limit examples read as tuned on the whole split
    from eval_fixtures import build_text_setting
    from factories import invoke_cli

    setting = build_text_setting(tmp_path / "setting")
    result = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--merger", "regmean", "--tasks",
                         setting.tasks_file, "--val-limit", "4", "--threads", "1", "--out", tmp_path / "m"])
    assert result.exit_code == 0, result.stderr
    card = (tmp_path / "m" / "README.md").read_text()
    assert "loramerge merge --config loramerge.yaml --out rebuilt/ --threads 1\n" in card
    command = card.split("## Command", 1)[1].split("```bash\n", 1)[1].split("\n", 1)[0]
    assert command.startswith("loramerge merge ") and "--merger regmean" in command and "--val-limit 4" in command
    tuned = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--lambda", "auto", "--tasks",
                        setting.tasks_file, "--val-limit", "4", "--threads", "1", "--out", tmp_path / "t", "--json"])
    assert tuned.exit_code == 0, tuned.stderr
    assert "λ tuned on the validation split (4 examples per task)" in (tmp_path / "t" / "README.md").read_text()
    import json

    tuning = json.loads((tmp_path / "t" / "loramerge.json").read_text())["lambda_tuning"]
    assert (tuning["split"], tuning["val_limit"], tuning["sample_seed"]) == ("validation", 4, 0)
    assert set(tuning["examples"].values()) == {4}
    whole = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--lambda", "auto", "--tasks",
                        setting.tasks_file, "--val-limit", "1000", "--threads", "1", "--out", tmp_path / "w"])
    assert whole.exit_code == 0, whole.stderr  # (a limit above the rows: the card says what was scored)
    counts = json.loads((tmp_path / "w" / "loramerge.json").read_text())["lambda_tuning"]["examples"]
    assert max(counts.values()) < 1000 and "1000 examples" not in (tmp_path / "w" / "README.md").read_text()


def test_a_base_named_by_a_file_and_read_from_a_folder_here_is_recorded_as_that_folder(tmp_path, monkeypatch):
    # an adapter config or a spec naming `org/tbase` read a folder org/tbase of the working folder (as the model
    # loaders do, and as PEFT records a base trained from that folder), and every record named the Hub repository
    from types import SimpleNamespace

    from loramerge_cli.evaluation.engine import resolve_base
    from loramerge_cli.evaluation.specs import _base_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "tbase").mkdir(parents=True)
    adapters = [SimpleNamespace(base_model="org/tbase", config={}) for _ in range(2)]
    spec = SimpleNamespace(base_model=None, path=tmp_path / "tasks.yaml")
    assert resolve_base(spec, adapters, None) == "./org/tbase"
    assert resolve_base(SimpleNamespace(base_model="org/tbase", path=spec.path), adapters, None) == "./org/tbase"
    assert resolve_base(spec, adapters, "./org/tbase") == "./org/tbase"
    assert resolve_base(spec, adapters, "org/tbase") == "org/tbase"  # typed: a folder here wins, as documented
    # a spec's base found in the spec's folder is a path, whatever its spelling
    (tmp_path / "specs" / "base").mkdir(parents=True)
    assert _base_model("base", tmp_path / "specs") == str(tmp_path / "specs" / "base")
    assert _base_model("base", __import__("pathlib").Path("specs")) == "./specs/base"
    assert resolve_base(SimpleNamespace(base_model="./specs/base", path=spec.path), adapters, None) == "./specs/base"


def test_a_table_records_the_commit_of_a_hub_adapter(hub_cache):
    # adapters[].source was the id as typed (`org/name@v2`, `org/name`): after the branch moved, a table could not
    # say which commit it was made for
    from hub_cache import MAIN_COMMIT, V2_COMMIT

    from loramerge_cli.adapters.peft_reader import load_adapters
    from loramerge_cli.masks import adapter_records, load_table, ones_table

    adapters = load_adapters(["a=org/name", "b=org/name@v2"])
    records = adapter_records(adapters)
    assert [(r["source"], r["repo_id"], r["revision"]) for r in records] == [
        ("org/name", "org/name", MAIN_COMMIT), ("org/name@v2", "org/name", V2_COMMIT)]
    table = ones_table(adapters)
    table.save(hub_cache.parent / "t.json")
    assert load_table(hub_cache.parent / "t.json").adapters[1]["revision"] == V2_COMMIT  # (the schema takes it)


def test_an_adapter_naming_revision_main_is_of_the_same_base_as_one_naming_none():
    # huggingface_hub reads `main` where no revision is given: both adapters load the same base files
    from types import SimpleNamespace

    from loramerge_cli.adapters.compat import revision_problem

    def adapter(name, revision):
        return SimpleNamespace(name=name, config={"revision": revision} if revision is not None else {})

    assert revision_problem([adapter("a", "main"), adapter("b", None), adapter("c", "")]) is None
    assert "a: v1, b: the default branch" in revision_problem([adapter("a", "v1"), adapter("b", None)])


def test_an_adapter_in_a_snapshot_subfolder_is_named_where_it_is(hub_cache, llama_task_dirs):
    # offline, the error said the weights were not in the cache and to download them: they were, in sub/
    import pytest
    from hub_cache import add_snapshot, set_ref

    from loramerge_cli.adapters.peft_reader import load_adapter
    from loramerge_cli.errors import LoramergeError

    commit = "5" * 40
    add_snapshot(hub_cache, commit, llama_task_dirs["rte"], symlinks=False)
    snapshot = hub_cache / "snapshots" / commit
    (snapshot / "sub").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (snapshot / name).rename(snapshot / "sub" / name)
    (snapshot / "adapter_config.json").write_text((snapshot / "sub" / "adapter_config.json").read_text())
    set_ref(hub_cache, "nested", commit)
    with pytest.raises(LoramergeError, match=r"not at the repository's top level but in sub/") as caught:
        load_adapter("org/name@nested")
    assert "unset HF_HUB_OFFLINE" not in str(caught.value) and "allow-pickle" not in str(caught.value)
    assert load_adapter(str(snapshot / "sub")).name == "sub"  # the folder the error names


def test_a_non_ascii_name_is_no_hub_id(tmp_path, monkeypatch):
    # `org/rté` was taken for a Hub id (\w is Unicode) and, offline, failed as "cannot download from the Hub"
    import pytest

    from loramerge_cli.adapters.peft_reader import load_adapter
    from loramerge_cli.errors import LoramergeError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoramergeError, match=r"^org/rté: no such file or folder \(a Hub id looks like"):
        load_adapter("org/rté")


def test_a_stale_ref_does_not_hide_what_the_cache_holds(hub_cache):
    # huggingface_hub's scan_cache_dir drops a repository with one ref whose snapshot is gone: the refusal of a
    # missing revision lost its list of the cached ones
    import pytest
    from hub_cache import MAIN_COMMIT, V2_COMMIT, set_ref

    from loramerge_cli.adapters.peft_reader import load_adapter
    from loramerge_cli.errors import LoramergeError

    set_ref(hub_cache, "ghost", "9" * 40)
    with pytest.raises(LoramergeError) as caught:
        load_adapter("org/name@nope")
    assert f"the cache holds org/name at {MAIN_COMMIT}, {V2_COMMIT}, main, v2" in str(caught.value)
    assert "ghost" not in str(caught.value)


def test_flags_that_do_nothing_are_usage_errors_as_everywhere_else(tmp_path):
    # merge refuses every flag that does nothing here; these three were taken without a word
    from factories import invoke_cli, write_task_folders

    folders = write_task_folders(tmp_path / "inputs", names=("a", "b"))
    sources = [str(folders["a"]), str(folders["b"])]
    merged = invoke_cli(["merge", "--adapters", *sources, "--override", "--out", tmp_path / "m"])
    assert merged.exit_code == 2 and "--override does nothing without --mask" in merged.stderr, merged.stderr
    assert not (tmp_path / "m").exists()
    shown = invoke_cli(["inspect", *sources, "--heatmap", "--json"])
    assert shown.exit_code == 2 and "--heatmap does nothing with --json" in shown.stderr and not shown.stdout
    scored = invoke_cli(["eval", "--adapters", *sources, "--tasks", tmp_path / "tasks.yaml", "--force"])
    assert scored.exit_code == 2 and "--force does nothing without --out" in scored.stderr, scored.stderr


def test_greedy_history_says_the_best_so_far_never_a_rejected_round():
    # the last round's best addition (rejected: it lowered the fitness) was recorded as `best_fitness` with its
    # table, so the plot's "best so far" fell and the history ended on a table the search did not return
    from loramerge_cli.search.baselines import greedy_search

    gains = {0: 1.0, 1: 0.5, 2: -2.0}

    def fitness(candidates):  # additive gains: 0 then 1 help, 2 hurts
        return [sum(gains[i] for i in pruned) for pruned, _ in candidates]

    rounds = []
    ledger = greedy_search(fitness, 3, 3, 100, rounds.append)
    assert ledger.best().pruned == (0, 1)
    assert [(r["best_fitness"], r["pruned"]) for r in rounds] == [(1.0, [0]), (1.5, [0, 1]), (1.5, [0, 1])]
    assert (rounds[-1]["round_best_fitness"], rounds[-1]["round_best_pruned"]) == (-0.5, [0, 1, 2])


def test_greedy_and_random_write_their_trajectory_to_the_run_dir(tmp_path):
    # --run-dir's help promises trajectory.jsonl after every step; greedy and random wrote none
    import json

    from eval_fixtures import build_text_setting
    from factories import invoke_cli

    from loramerge_cli.masks import load_table

    setting = build_text_setting(tmp_path / "setting")
    common = ["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file, "--val-limit", "4",
              "--threads", "1"]
    for strategy in ("greedy", "random"):
        run_dir, out = tmp_path / f"run-{strategy}", tmp_path / f"{strategy}.json"
        result = invoke_cli([*common, "--strategy", strategy, "--budget", "6", "--run-dir", run_dir, "--out", out])
        assert result.exit_code == 0, result.stderr
        lines = [json.loads(line) for line in (run_dir / "trajectory.jsonl").read_text().splitlines()]
        assert lines and lines == load_table(out).provenance["history"]


def test_a_screened_search_that_saw_every_table_says_why_it_stopped():
    # with halving, a search stopped at generation 4 of 60 (every table the cap allows scored, some on a subset
    # only) and said nothing of why
    from test_screened_search import GAINS, table_ladder

    from loramerge_cli.search.screened import ScreenedSettings, run_screened

    settings = ScreenedSettings(popsize=6, generations=60, seed=1, max_prune=0.17)  # at most 2 of 12: 79 tables
    best, spent = run_screened(settings, table_ladder(GAINS), 4, 3)
    assert spent["every_table_seen"] and spent["full_evaluations"] < 78 and len(spent["history"]) < 60
    best, spent = run_screened(ScreenedSettings(popsize=6, generations=5, seed=1, max_prune=0.25),
                               table_ladder(GAINS), 4, 3)
    assert not spent["every_table_seen"]
    from rich.console import Console

    from loramerge_cli.cli.render import search_summary
    from loramerge_cli.masks import WeightTable

    table = WeightTable(tasks=["a", "b", "c"], units=["u0", "u1", "u2", "u3"], weights=[[1.0] * 4] * 3)
    provenance = {"validation": {"unpruned_mean_normalized_accuracy": 90.0, "best_mean_normalized_accuracy": 91.0,
                                 "fitness": 1.0}, "evaluations": 40, "forward_examples": 4000, "seconds": 1.0,
                  "every_allowed_table_scored": False, "every_allowed_table_seen": True}
    console = Console(width=400, record=True)
    console.print(search_summary(table, provenance))
    assert "it stopped there: every table the --max-prune cap allows was scored, some on a validation subset" in \
        console.export_text()


def test_plot_pictures_are_protected_as_outputs_and_drawn_for_this_search(tmp_path):
    # --force replaced a user's fitness.png and wrote through a symbolic link (a dangling one even without --force);
    # a finished run resumed with a folder of another search's pictures kept them, even with --force
    import pytest

    pytest.importorskip("matplotlib")
    from eval_fixtures import build_text_setting
    from factories import invoke_cli

    from loramerge_cli.search.plots import drawn_digest

    setting = build_text_setting(tmp_path / "setting")

    def search(run, plots, *extra, strategy="greedy"):
        return invoke_cli(["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                           "--val-limit", "4", "--threads", "1", "--strategy", strategy, "--budget", "4",
                           "--run-dir", tmp_path / run, "--out", tmp_path / f"{run}.json", "--plot", tmp_path / plots,
                           *extra])

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "fitness.png").write_bytes(b"my notes")
    refused = search("r0", "mine", "--force")
    assert refused.exit_code == 1 and "not a picture loramerge drew" in refused.stderr, refused.stderr
    assert (mine / "fitness.png").read_bytes() == b"my notes"
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "mask.png").symlink_to(tmp_path / "nowhere.txt")
    refused = search("r1", "linked")
    assert refused.exit_code == 1 and "symbolic link" in refused.stderr and not (tmp_path / "nowhere.txt").exists()

    assert search("a", "plots_a").exit_code == 0
    picture = tmp_path / "plots_a" / "fitness.png"
    assert drawn_digest(picture)  # marked as ours, with what it shows
    drawn = picture.read_bytes()
    again = invoke_cli(["search-mask", "--run-dir", tmp_path / "a", "--resume", "--threads", "1",
                        "--plot", tmp_path / "plots_a"])
    assert again.exit_code == 0 and picture.read_bytes() == drawn, again.stderr  # this run's: left as they are
    assert search("b", "plots_b", strategy="random").exit_code == 0
    other = ["search-mask", "--run-dir", tmp_path / "a", "--resume", "--threads", "1", "--plot", tmp_path / "plots_b"]
    refused = invoke_cli(other)
    assert refused.exit_code == 1 and "of another search; pass --force" in refused.stderr, refused.stderr
    assert invoke_cli([*other, "--force"]).exit_code == 0
    assert (tmp_path / "plots_b" / "fitness.png").read_bytes() == drawn


def test_plots_name_the_strategy_and_the_fitness_and_tick_whole_steps():
    # one record gave ticks -0.045 … 0.045 on an integer axis; --fitness nsc was labelled as points of accuracy;
    # the titles did not say which strategy searched
    import pytest

    pytest.importorskip("matplotlib")
    from loramerge_cli.masks import WeightTable
    from loramerge_cli.search.plots import fitness_figure, search_title

    figure = fitness_figure([{"round": 1, "best_fitness": 2.0}], "t")
    axis = figure.axes[0]
    assert all(float(tick).is_integer() for tick in axis.get_xticks())
    assert "points over the unpruned merge" in axis.get_ylabel()
    label = fitness_figure([{"generation": 0, "best_fitness": 2.0}], "t", "nsc").axes[0].get_ylabel()
    assert "label-free loss" in label
    table = WeightTable(tasks=["a"], units=["u"], weights=[[1.0]], merger={"merger": "ta"},
                        provenance={"strategy": "surrogate", "seed": 1})
    assert search_title(table) == "surrogate search, ta, seed 1"


def test_the_score_cache_lock_never_costs_the_scores(tmp_path, monkeypatch):
    # a .scores.lock folder or link failed with an internal error once the scores were computed; a lock held by
    # another process (or another user's lock file) failed the whole command and lost its report
    import pytest
    from filelock import FileLock

    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.evaluation import cache

    for odd in ("folder", "link"):
        run_dir = tmp_path / odd
        run_dir.mkdir()
        lock = run_dir / ".scores.lock"
        lock.mkdir() if odd == "folder" else lock.symlink_to(tmp_path / "victim.txt")
        with pytest.raises(LoramergeError, match=r"\.scores\.lock is not a file loramerge wrote"):
            cache.check_run_dir(run_dir, [])
    monkeypatch.setattr(cache, "CACHE_LOCK_SECONDS", 0.2)
    held = FileLock(str(tmp_path / ".scores.lock"))
    held.acquire()
    try:
        cache.ScoreCache(tmp_path).put({"a" * 64: 0.5})  # saved unlocked once the wait is over
    finally:
        held.release()
    assert cache.read_cache(tmp_path / "scores.json") == {"a" * 64: 0.5}

    def refused(self, *args, **kwargs):  # another user's lock file in a shared run dir
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(FileLock, "acquire", refused)
    cache.ScoreCache(tmp_path).put({"b" * 64: 0.25})
    assert len(cache.read_cache(tmp_path / "scores.json")) == 2


def test_a_recorded_command_has_no_absolute_path_after_a_named_flag_value(tmp_path):
    # `--adapters=alpha=/abs/path` was split at its first `=` only: the model card's command kept the absolute path
    from loramerge_cli.adapters.card import portable_command

    folder = tmp_path / "out"
    command = f"loramerge merge --adapters=alpha={tmp_path}/a beta={tmp_path}/b --base={tmp_path}/base --out={folder}"
    assert portable_command(command, folder) == \
        "loramerge merge --adapters=alpha=../a beta=../b --base=../base --out=."
    assert portable_command(f"loramerge merge --adapters {tmp_path}/d=/a", folder) == \
        "loramerge merge --adapters ../d=/a"  # (a path with `=/` in it is one path)


def test_pictures_that_appear_during_a_search_are_not_written_over(tmp_path):
    # the check before the search was the only one: a user's file put in the --plot folder while the search ran,
    # or a second search's pictures, were replaced without --force (two searches left a mixed pair)
    import pytest

    pytest.importorskip("matplotlib")
    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.masks import WeightTable
    from loramerge_cli.search.plots import drawn_digest, write_plots

    def table(strategy):
        return WeightTable(tasks=["a", "b"], units=["u0", "u1"], weights=[[1.0, 0.0], [1.0, 1.0]],
                           merger={"merger": "ta"}, provenance={"strategy": strategy, "seed": 1})

    history = [{"round": 1, "best_fitness": 1.0}]
    folder = tmp_path / "plots"
    folder.mkdir()
    (folder / "fitness.png").write_bytes(b"my notes")  # appeared during the search
    with pytest.raises(LoramergeError, match=r"fitness.png appeared or changed while the search ran; not "
                                             r"replaced, this search's picture is in .*fitness\.loramerge-"):
        write_plots(table("greedy"), history, folder, force=True)
    assert (folder / "fitness.png").read_bytes() == b"my notes" and drawn_digest(folder / "mask.png")
    other = tmp_path / "other"
    write_plots(table("greedy"), history, other)
    first = drawn_digest(other / "fitness.png")
    with pytest.raises(LoramergeError, match="fitness.png and mask.png appeared or changed .* pictures are in "):
        write_plots(table("random"), history, other)  # a second search, without --force: both named
    assert drawn_digest(other / "fitness.png") == drawn_digest(other / "mask.png") == first  # no mixed pair
    write_plots(table("random"), history, other, force=True)  # with it: replaced, both
    assert drawn_digest(other / "fitness.png") == drawn_digest(other / "mask.png") != first


def test_only_loramerge_s_own_mark_counts(tmp_path):
    # any Software text starting with "loramerge" counted: another tool's "loramergeX" picture was replaced
    import pytest

    pytest.importorskip("matplotlib")
    from PIL import Image, PngImagePlugin

    from loramerge_cli.search.plots import drawn_digest

    for software, expected in (("loramergeX tool", None), ("loramerge 0.1.0", "d"), ("loramerge", "d")):
        info = PngImagePlugin.PngInfo()
        info.add_text("Software", software)
        info.add_text("Description", "d")
        Image.new("RGB", (2, 2)).save(tmp_path / "p.png", pnginfo=info)
        assert drawn_digest(tmp_path / "p.png") == expected, software


def test_an_interrupt_after_a_picture_was_written_says_so(tmp_path):
    # a Ctrl-C between the two pictures said "interrupted; nothing was written" with fitness.png replaced
    import pytest

    pytest.importorskip("matplotlib")
    from loramerge_cli import interrupts
    from loramerge_cli.masks import WeightTable
    from loramerge_cli.search.plots import write_plots

    interrupts.reset()
    try:
        table = WeightTable(tasks=["a"], units=["u"], weights=[[1.0]], merger={"merger": "ta"})
        write_plots(table, [{"round": 1, "best_fitness": 1.0}], tmp_path)
        assert "fitness.png and " in interrupts.hint() and "mask.png were drawn whole before it" in interrupts.hint()
    finally:
        interrupts.reset()


def test_a_merge_tuned_on_a_base_read_from_a_folder_here_records_that_folder(tmp_path, monkeypatch):
    # the adapters name `org/tbase`, a folder of the working folder: λ was tuned on it, and nothing recorded that
    import json
    import shutil

    import yaml
    from eval_fixtures import build_text_setting
    from factories import invoke_cli

    setting = build_text_setting(tmp_path / "setting")
    work = tmp_path / "work"
    shutil.copytree(setting.base, work / "org" / "tbase")
    for folder in setting.adapters.values():
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/tbase"}))
    spec = yaml.safe_load(setting.tasks_file.read_text())
    del spec["base_model"]
    (setting.root / "tasks_nobase.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--lambda", "auto", "--tasks",
                         setting.root / "tasks_nobase.yaml", "--val-limit", "4", "--threads", "1", "--out", work / "m"])
    assert result.exit_code == 0, result.stderr
    tuning = json.loads((work / "m" / "loramerge.json").read_text())["lambda_tuning"]
    assert tuning["base_model"] == "../org/tbase"  # (relative to the output, as every local path it records)


def _spec_on(tmp_path, data_name: str, **task_fields):
    from eval_fixtures import write_tasks_file

    task = {"name": "rte", "data": {"validation": data_name}, "text": ["premise", "hypothesis"], "label": "label",
            "labels": ["entailment", "not_entailment"], **task_fields}
    return write_tasks_file(tmp_path / "tasks.yaml", {"model_type": "sequence-classification", "tasks": [task]})


def _examples(tasks_file):
    from loramerge_cli.evaluation.data import load_examples
    from loramerge_cli.evaluation.specs import load_task_file

    task_file = load_task_file(tasks_file)
    return load_examples(task_file, task_file.tasks[0], "validation")


def test_parquet_reads_like_json_lines(tmp_path):
    # an unused nanosecond timestamp column (pandas writes them) refused the whole file; a column named twice was
    # "not a readable parquet file"; a float32 text read as 0.10000000149011612
    import pyarrow
    import pyarrow.parquet as parquet
    import pytest

    from loramerge_cli.errors import LoramergeError

    stamps = pyarrow.array([1700000000123456789, 1700000000123456790, 0], pyarrow.timestamp("ns"))
    table = pyarrow.table({"premise": pyarrow.array([0.1, 2.5, 123456792.0], pyarrow.float32()),
                           "hypothesis": pyarrow.array([0.1, 65504.0, 12352.0], pyarrow.float16()),
                           "label": [0, 1, 0], "created_at": stamps})
    parquet.write_table(table, tmp_path / "rte.parquet")
    examples = _examples(_spec_on(tmp_path, "rte.parquet"))
    assert examples.inputs == [("0.1", "0.1"), ("2.5", "65504.0"), ("123456792.0", "12352.0")]
    assert examples.labels == [0, 1, 0]
    with pytest.raises(LoramergeError, match=r"column 'created_at' holds a value Python cannot read"):
        _examples(_spec_on(tmp_path, "rte.parquet", text=["created_at", "hypothesis"]))
    twice = pyarrow.Table.from_arrays([pyarrow.array(["a"]), pyarrow.array(["b"]), pyarrow.array([0])],
                                      names=["premise", "premise", "label"])
    parquet.write_table(twice, tmp_path / "twice.parquet")
    with pytest.raises(LoramergeError, match=r"twice.parquet: column 'premise' appears twice$"):
        _examples(_spec_on(tmp_path, "twice.parquet"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(LoramergeError, match=r"folder is a folder; this task type reads a file"):
        _examples(_spec_on(tmp_path, "folder"))


def test_a_csv_number_that_names_another_class_is_refused(tmp_path):
    # labels ['1', '0', '2']: a CSV cell 0 was the name '0' (class 1), a JSON 0 the index 0: the same rows scored
    # otherwise by format, without a word. CSV has no types: refused there; JSON's number is the index
    import pytest
    from eval_fixtures import write_jsonl

    from loramerge_cli.errors import LoramergeError

    (tmp_path / "rte.csv").write_text("premise,hypothesis,label\nw1,w2,0\n")
    with pytest.raises(LoramergeError, match=r"label 0 in .* is ambiguous: class 0 is '1', and '0' names class 1"):
        _examples(_spec_on(tmp_path, "rte.csv", labels=["1", "0", "2"]))
    write_jsonl(tmp_path / "rte.jsonl", [{"premise": "w1", "hypothesis": "w2", "label": 0},
                                         {"premise": "w3", "hypothesis": "w4", "label": "0"}])
    assert _examples(_spec_on(tmp_path, "rte.jsonl", labels=["1", "0", "2"])).labels == [0, 1]  # index, name
    assert _examples(_spec_on(tmp_path, "rte.csv", labels=["0", "1", "2"])).labels == [0]  # numbers = indices
    (tmp_path / "minus.csv").write_text("premise,hypothesis,label\nw1,w2,-1\n")
    assert _examples(_spec_on(tmp_path, "minus.csv", labels=["-1", "1"])).labels == [0]  # (no index: a name)


def test_an_interrupt_after_a_search_wrote_its_table_still_says_how_to_get_it_again(tmp_path):
    # writing --out replaced the run dir's hint: a Ctrl-C while the pictures were drawn said only that the table
    # was written, not the --resume that draws them (README: the line says how to resume a search with a run dir)
    from loramerge_cli import interrupts
    from loramerge_cli.outputs import write_result

    interrupts.reset()
    try:
        interrupts.set_hint("the search had finished; its table: loramerge search-mask --run-dir R --resume",
                            resumable=True)
        write_result(tmp_path / "mask.json", "{}", force=False)
        assert interrupts.resume_hint() == ("the search had finished; its table: loramerge search-mask --run-dir R "
                                            f"--resume; {tmp_path / 'mask.json'} was written whole before it")
    finally:
        interrupts.reset()


def test_running_out_of_files_or_memory_is_the_machine_s_one_line(capsys):
    # `ulimit -n 16` with --workers, or `ulimit -v`, ended in "internal error: OSError/MemoryError"
    import errno

    import pytest
    import typer

    from loramerge_cli import interrupts
    from loramerge_cli.cli.common import _run

    def raising(error):
        def function():
            raise error
        return function

    interrupts.reset()
    for error, expected in ((OSError(errno.EMFILE, "Too many open files"), "error: too many open files (Too many "
                             "open files): raise the limit (ulimit -n) or use fewer --workers"),
                            (MemoryError(), "error: out of memory: raise the memory limit (ulimit -v)"),
                            (ImportError("libscipy_openblas.so: failed to map segment from shared object"),
                             "error: out of memory (libscipy_openblas.so: failed to map segment")):
        with pytest.raises(typer.Exit) as caught:
            _run(raising(error), (), {}, debug=False)
        assert caught.value.exit_code == 1
        assert capsys.readouterr().err.startswith(expected)


def test_a_file_of_an_output_folder_that_cannot_be_written_is_named_in_the_output(tmp_path):
    # apply-mask under `ulimit -f` named the hidden staging folder, already removed
    import pytest

    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.outputs import staged_folder

    with pytest.raises(LoramergeError) as caught:
        with staged_folder(tmp_path / "pruned") as staging:
            raise LoramergeError(f"{staging / 'mask.json'}: cannot write it (File too large)")
    assert str(caught.value) == f"{tmp_path / 'pruned'}/mask.json: cannot write it (File too large)"
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_a_search_that_failed_before_saving_names_no_resume(tmp_path, monkeypatch):
    # a worker that failed to start: the run dir was removed, and the line still said "resume with: … --run-dir R"
    from types import SimpleNamespace

    import pytest

    from loramerge_cli import interrupts
    from loramerge_cli.errors import WorkerLost
    from loramerge_cli.search import runner

    run_dir = tmp_path / "run"

    def failing(request, on_event):
        run_dir.mkdir(exist_ok=True)
        (run_dir / "config.json").write_text("{}")
        interrupts.set_hint(f"resume with: loramerge search-mask --run-dir {run_dir} --resume", resumable=True)
        raise WorkerLost("a search worker died (exit code 1)")

    monkeypatch.setattr(runner, "_run_search", failing)
    interrupts.reset()
    try:
        with pytest.raises(WorkerLost):
            runner.run_search(SimpleNamespace(run_dir=run_dir))
        assert not run_dir.exists() and interrupts.resume_hint() is None
    finally:
        interrupts.reset()
