"""Defects found by the reviews of 2026-12-07 (ninth session), each test failing on the code before its fix."""

import pytest
from test_review25 import _engine


def test_a_spec_naming_other_tasks_is_refused_before_the_adapters_load(text_setting, tmp_path, monkeypatch):
    """`merge --tasks` whose tasks do not match the adapters was found after torch and the adapters loaded."""
    from factories import invoke_cli
    from loramerge_cli import api

    def no_loading(*args, **kwargs):
        raise AssertionError("adapters loaded before the spec was checked")

    monkeypatch.setattr(api, "load_adapters", no_loading)
    two = [text_setting.adapters[name] for name in ("alpha", "beta")]
    result = invoke_cli(["merge", "--adapters", *two, "--lambda", "auto", "--tasks", text_setting.tasks_file,
                         "--out", tmp_path / "m", "--threads", "1"])
    assert result.exit_code == 1 and "no adapter named 'gamma'" in result.stderr, result.stderr
    assert not (tmp_path / "m").exists()


def test_tasks_no_merge_reads_is_a_usage_error_whatever_the_spec(text_setting, tmp_path):
    """`--tasks` with a merger that reads nothing: exit 2 when the spec matched the adapters, exit 1 (a spec
    error) when it did not."""
    from factories import invoke_cli

    for names in (("alpha", "beta", "gamma"), ("alpha", "beta")):
        adapters = [text_setting.adapters[name] for name in names]
        result = invoke_cli(["merge", "--adapters", *adapters, "--merger", "ties", "--tasks", text_setting.tasks_file,
                             "--out", tmp_path / "m"])
        assert result.exit_code == 2 and "--tasks does nothing here" in result.stderr, (names, result.stderr)
    assert not (tmp_path / "m").exists()


def test_the_library_names_an_unknown_merger_a_merger(folders):
    """`MergeConfig(merger="average")` was called an unknown *method*; the CLI's flag is --merger."""
    from loramerge_cli import api
    from loramerge_cli.errors import UsageError
    from loramerge_cli.merging.config import MergeConfig

    adapters = api.load_adapters([str(folders[name]) for name in "abc"])
    with pytest.raises(UsageError, match=r"unknown merger 'average' \(known: .*knots"):
        api.merge(adapters, MergeConfig(merger="average"))
    with pytest.raises(UsageError, match=r"unknown method 'average' \(known: "):
        api.merge(adapters, MergeConfig(merger="knots", method="average"))


def test_eval_of_experts_alone_shows_no_merged_stage(text_setting):
    """`eval` without --merged drew an empty `merged × tasks` stage."""
    from loramerge_cli import api
    from loramerge_cli.evaluation.engine import EvalSettings

    experts = api.load_adapters([str(text_setting.adapters[name]) for name in ("alpha", "beta", "gamma")])
    stages = []
    report = api.evaluate(text_setting.tasks_file, experts, settings=EvalSettings(val_limit=4),
                          report=lambda kind, data: stages.append(data["stage"]) if kind == "stage_start" else None)
    assert [row["kind"] for row in report["rows"]] == ["base", "experts"]
    assert "merged × tasks" not in stages and stages, stages


@pytest.mark.parametrize("flags, message", [
    (["--strategy", "enmp", "--sigma0", "1e300"], "--sigma0 must be a number in (0, 1e+06] (got 1e+300)"),
    (["--strategy", "screened", "--threshold", "-1e300"], "--threshold must be a number in [-1e+06, 1e+06]"),
    (["--strategy", "screened", "--addscale"], "--addscale does nothing with --strategy screened (it is read by "
                                               "--strategy enmp)"),
    (["--strategy", "surrogate", "--addscale"], "--addscale does nothing with --strategy surrogate (it is read by "
                                                "--strategy enmp)"),
    (["--strategy", "greedy", "--seed", "5"], "--seed does nothing with --strategy greedy and method ta: neither "
                                              "draws anything"),
])
def test_search_settings_that_cannot_act_are_refused(text_setting, tmp_path, flags, message):
    """A σ0 or θ of 1e300 ran, pycma's overflow warnings on stderr under --json; --addscale was listed by
    `--strategy screened -h` and named screened as its reader; greedy recorded a seed no part of it read."""
    from factories import invoke_cli
    from test_hostile_inputs import one_line

    adapters = [text_setting.adapters[name] for name in ("alpha", "beta", "gamma")]
    result = invoke_cli(["search-mask", "--adapters", *adapters, "--tasks", text_setting.tasks_file, *flags,
                         "--out", tmp_path / "t.json", "--json"])
    one_line(result, message, code=2)
    assert not (tmp_path / "t.json").exists()


def test_greedy_takes_a_seed_for_a_randomized_merger_and_screened_lists_no_addscale(text_setting, tmp_path):
    from factories import invoke_cli

    adapters = [text_setting.adapters[name] for name in ("alpha", "beta", "gamma")]
    result = invoke_cli(["search-mask", "--adapters", *adapters, "--tasks", text_setting.tasks_file, "--strategy",
                         "greedy", "--merger", "dare", "--seed", "5", "--budget", "1", "--val-limit", "4",
                         "--threads", "1", "--out", tmp_path / "t.json"])
    assert result.exit_code == 0, result.stderr
    assert "--addscale" not in invoke_cli(["search-mask", "--strategy", "screened", "-h"]).stdout
    assert "--addscale" in invoke_cli(["search-mask", "--strategy", "enmp", "-h"]).stdout


def test_ctrl_c_while_torch_is_imported_waits_for_the_import(tmp_path):
    """A Ctrl-C about 1 s into a command, as torch registers its autograd functions (C++ calling Python), aborted
    the process (SIGABRT, "terminate called after throwing an instance of 'pybind11::error_already_set'"): the
    KeyboardInterrupt cannot pass through the C++. It is now raised once the import is over. A stand-in `torch`
    signals itself in the middle of its import."""
    import subprocess
    import sys
    import textwrap

    from test_hostile_inputs import REPO

    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(textwrap.dedent("""
        import os, signal, time
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(30):
            time.sleep(0.01)  # (the handler runs between these)
        WHOLE = True
    """))
    script = textwrap.dedent("""
        import sys, time
        from loramerge_cli import interrupts
        interrupts.install()
        try:
            import torch
            time.sleep(5)
            print("never interrupted")
        except KeyboardInterrupt:
            print("interrupted;", "torch imported whole:", getattr(sys.modules.get("torch"), "WHOLE", False))
    """)
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                             env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{tmp_path}:{REPO}"})
    assert process.stdout.strip() == "interrupted; torch imported whole: True", (process.stdout, process.stderr)


def test_a_huge_image_beside_small_ones_is_refused_without_processing_a_blank_one(fixed_size_vit, tmp_path,
                                                                                  monkeypatch):
    """With a processor that does not resize, a 12000×12000 image among 8×8 ones was refused after the processor
    ran on a blank image of its size (6.4 GB and minutes); the sizes alone tell."""
    from PIL import Image

    from loramerge_cli.errors import LoramergeError

    drawn = []
    new = Image.new
    monkeypatch.setattr(Image, "new", lambda mode, size, *rest: drawn.append(tuple(size)) or new(mode, size, *rest))
    with pytest.raises(LoramergeError, match=r"^task shapes: the images differ in size \(8×8, 2000×2000\)"):
        _engine(fixed_size_vit, tmp_path, monkeypatch, [(8, 8), (8, 8), (2000, 2000)])
    assert (2000, 2000) not in drawn[3:], drawn  # (the first three made the images)


def test_lambda_auto_scores_the_default_and_the_tables_lambda_exactly():
    """The grid held 0.3333 for a default of 1/3 (and a table's λ rounded to 4 digits): on a tie `--lambda auto`
    wrote another adapter than the default merge, and the table's own merge was never scored."""
    from loramerge_cli.evaluation.tuning import grid_search

    assert grid_search(lambda lam, stage: 50.0, 1 / 3)[0] == 1 / 3
    table_lambda = 0.123456789
    assert grid_search(lambda lam, stage: 60.0 if lam == table_lambda else 50.0, 1 / 3,
                       also=(table_lambda,))[0] == table_lambda


def test_a_hub_base_with_the_hub_unreachable_fails_at_once_in_one_line(tmp_path):
    """`--base org/name` with the Hub unreachable (and not HF_HUB_OFFLINE): huggingface_hub's hf_hub_download
    retried five times with back-off (about 50 s, a "Retrying in …" line each, under --json too), and waited 60 s
    per try on a Hub that accepts connections and never answers."""
    import socket
    import subprocess
    import sys
    import textwrap

    from test_hostile_inputs import REPO

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = textwrap.dedent("""
        from loramerge_cli.adapters.sources import pinned_base
        from loramerge_cli.errors import LoramergeError
        try:
            pinned_base("org/nobase")
        except LoramergeError as error:
            print(error)
    """)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": REPO, "HF_HUB_CACHE": str(tmp_path / "cache"),
           "HF_HOME": str(tmp_path / "home"), "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert process.stdout.startswith("org/nobase: ") and "not in the local Hugging Face cache and the Hub cannot be " \
        "reached" in process.stdout, (process.stdout, process.stderr)
    assert "Retrying" not in process.stderr, process.stderr


def test_merge_into_a_cached_hub_input_writes_nothing_there(hub_cache, llama_task_dirs, tmp_path):
    """`merge --out` inside a Hub input's cached repository created (and removed) a probe file there before the
    refusal: the Hub inputs were not among the inputs checked first."""
    import os

    from factories import invoke_cli

    before = {path: os.stat(path).st_mtime_ns for path in [hub_cache, *hub_cache.rglob("*")]}
    out = hub_cache / "merged"
    created = []
    real_open = os.open

    def watching_open(path, flags, *rest, **kwargs):
        if flags & os.O_CREAT and str(hub_cache) in os.fspath(path):
            created.append(os.fspath(path))
        return real_open(path, flags, *rest, **kwargs)

    os.open = watching_open
    try:
        result = invoke_cli(["merge", "--adapters", "org/name@main", f"mnli={llama_task_dirs['mnli']}", "--out", out])
    finally:
        os.open = real_open
    assert result.exit_code == 1 and "input" in result.stderr, result.stderr
    assert created == [] and not out.exists()
    assert {path: os.stat(path).st_mtime_ns for path in [hub_cache, *hub_cache.rglob("*")]} == before


def test_resuming_with_another_strategys_setting_names_it_so(text_setting, tmp_path):
    """`--resume --eta 2` on a surrogate run said "--eta is 2 but the saved run used 3", as if the run had used it."""
    from factories import invoke_cli

    adapters = [text_setting.adapters[name] for name in ("alpha", "beta", "gamma")]
    run = ["search-mask", "--run-dir", tmp_path / "run", "--threads", "1"]
    first = invoke_cli([*run, "--adapters", *adapters, "--tasks", text_setting.tasks_file, "--val-limit", "4",
                        "--out", tmp_path / "t.json"])
    assert first.exit_code == 0, first.stderr
    resumed = invoke_cli([*run, "--resume", "--eta", "2"])
    assert resumed.exit_code == 2 and "--eta is a setting of --strategy screened, not of surrogate" in resumed.stderr, \
        resumed.stderr


def test_a_truncated_cached_hub_file_is_named_by_its_spec(hub_cache):
    """A corrupt cached blob was named by its path deep in the cache; the other cache errors name the spec."""
    from hub_cache import V2_COMMIT

    from loramerge_cli import api
    from loramerge_cli.errors import LoramergeError

    weights = hub_cache / "snapshots" / V2_COMMIT / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(LoramergeError, match=rf"^org/name@v2: in its snapshot {V2_COMMIT[:12]}: "
                                             r"adapter_model.safetensors: corrupt or truncated safetensors file"):
        api.load_adapters(["org/name@v2"])


def _nested_alias_list() -> str:
    """A YAML list of 9⁸ × 9 strings of 20 characters through aliases (600 bytes; its repr: about 9 GB)."""
    inner = ['&a0 ["' + "x" * 20 + '"' + (',"' + "x" * 20 + '"') * 8 + "]"] + [
        f"&a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "[" + ", ".join(inner) + "]"


@pytest.mark.parametrize("recipe, message", [
    (lambda: f"adapters:\n  rte: {{path: x, weight: {_nested_alias_list()}}}\n",
     "adapter 'rte': weight must be a number (got [['xxxxxxxxxxxxxxxxxxxx', "),
    (lambda: f"adapters:\n  rte: {_nested_alias_list()}\n", "adapter 'rte': [['xxxxxxxxxxxxxxxxxxxx', "),
    (lambda: 'merger: [&s "%s", %s]\n' % ("a" * 400_000, ",".join(["*s"] * 150_000)),
     "merger: its 150,001 values come to over 1 MiB of text"),
    (lambda: 'adapters: [&s "%s", %s]\n' % ("a" * 400_000, ",".join(["*s"] * 150_000)),
     "adapters: its 150,001 values come to over 1 MiB of text"),
])
def test_recipes_of_aliased_values_are_refused_in_one_short_line(tmp_path, recipe, message):
    """A 600-byte recipe whose wrong-typed value was printed whole (about 9 GB of text: MemoryError traceback), or
    an 850 KB one whose list of one aliased string was joined with commas (60 GB)."""
    import resource
    import subprocess
    import sys

    from test_hostile_inputs import REPO

    (tmp_path / "r.yaml").write_text(recipe())
    limit = 2 << 30  # (the old code asked for gigabytes: a MemoryError, not the machine's memory)
    process = subprocess.run(
        [sys.executable, "-m", "loramerge_cli", "merge", "--config", "r.yaml", "--out", "o", "--threads", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": REPO},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert process.returncode == 2 and message in process.stderr, process.stderr[-2000:]
    assert len(process.stderr) < 1000 and "Traceback" not in process.stderr


def _mocked_hub(monkeypatch, existing_private=None):
    """HfApi's calls recorded (nothing leaves the machine); `existing_private`: the repository exists with that
    visibility (None: it does not, until create_repo)."""
    from types import SimpleNamespace

    import huggingface_hub
    import huggingface_hub.constants
    from huggingface_hub.errors import RepositoryNotFoundError

    calls = []
    state = {"private": existing_private}

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", kwargs))
        if state["private"] is None:
            state["private"] = bool(kwargs.get("private"))  # (None: the organisation's default, here public)

    def repo_info(self, repo_id, **kwargs):
        if state["private"] is None:
            raise RepositoryNotFoundError("404", response=SimpleNamespace(status_code=404, headers={}, request=None))
        return SimpleNamespace(private=state["private"])

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs))
        return SimpleNamespace(commit_url="https://hub/commit/1")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_a_push_leaves_visibility_to_the_hub_and_removes_an_earlier_pushs_leftovers(tmp_path, monkeypatch):
    """create_repo got private=False without --private (an organisation's private default overridden); an
    earlier push's heads/ and mask.json stayed on the Hub beside a card that no longer lists them."""
    from loramerge_cli import api

    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "adapter_config.json").write_text("{}")
    calls = _mocked_hub(monkeypatch)
    report = api.push_folder(tmp_path / "merged", "me/merged")
    (_, created), (_, uploaded) = calls
    assert created["private"] is None and report["private"] is False
    assert {"heads/*", "mask.json"} <= set(uploaded["delete_patterns"])


def test_private_to_an_existing_public_repository_is_refused(tmp_path, monkeypatch):
    """create_repo ignores `private` for a repository that exists: `--private` uploaded publicly and reported
    "private": true."""
    from loramerge_cli import api
    from loramerge_cli.errors import LoramergeError

    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "adapter_config.json").write_text("{}")
    calls = _mocked_hub(monkeypatch, existing_private=False)
    with pytest.raises(LoramergeError, match="the repository exists and is public"):
        api.push_folder(tmp_path / "merged", "me/merged", private=True)
    assert calls == []
    calls = _mocked_hub(monkeypatch)  # a new one: made private
    assert api.push_folder(tmp_path / "merged", "me/merged", private=True)["private"] is True
    assert calls[0][1]["private"] is True


@pytest.mark.parametrize("revision", ["a/.b", "a/b.lock/c", "HEAD", "x/.hidden/y"])
def test_revisions_git_refuses_are_refused(revision):
    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.hub import check_repo_id

    with pytest.raises(LoramergeError, match="not a branch name"):
        check_repo_id("me/merged", dry_run=True, revision=revision)
    check_repo_id("me/merged", dry_run=True, revision="release/v1.2-rc_3")


def test_a_card_names_a_local_input_with_a_pipe_in_one_cell(folders, tmp_path):
    """A folder named `v1|v2` split the card's inputs row (the sha256 dropped, the revision column wrong)."""
    import shutil

    from factories import invoke_cli

    shutil.copytree(folders["a"], tmp_path / "v1|v2")
    result = invoke_cli(["merge", "--adapters", f"fk={tmp_path / 'v1|v2'}", str(folders["b"]), "--out",
                         tmp_path / "m"])
    assert result.exit_code == 0, result.stderr
    row = next(line for line in (tmp_path / "m" / "README.md").read_text().splitlines() if line.startswith("| fk |"))
    cells = [cell for cell in row.replace("\\|", "").split("|")[1:-1]]
    assert len(cells) == 4 and "`v1\\|v2`" in row and cells[3].strip().startswith("`"), row
