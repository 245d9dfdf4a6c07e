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
    again, _ = run_search(request)
    assert again.weights == plain.weights
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
    assert lines[1].startswith("org/nocfg: config.json is not in the local cache") and "could not be reached" in lines[1]
    assert "Retrying" not in process.stderr, process.stderr
