"""Defects found by the reviews of 2026-12-07 (eleventh session), each test failing on the code before its fix."""

import json


def test_search_json_carries_the_dropped_recipe_seed_warning(tmp_path):
    """`search-mask --config recipe.yaml --json` with a recipe's seed that the search does not use: the seed was
    dropped with a warning on stderr only, which --json silences, so the document did not say it."""
    from eval_fixtures import build_text_setting
    from factories import invoke_cli

    setting = build_text_setting(tmp_path / "setting")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merger: dare\nseed: 7\n")
    result = invoke_cli(["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                         "--strategy", "greedy", "--merger", "ties", "--budget", "1", "--val-limit", "4",
                         "--threads", "1", "--config", recipe, "--out", tmp_path / "a.json", "--json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert any("the recipe's seed dropped" in line for line in document["warnings"]), document.get("warnings")
    assert "warnings" not in json.loads((tmp_path / "a.json").read_text())  # the table written: no such key


def test_random_prunes_round_of_the_decimal_product(tmp_path):
    """`--strategy random --sparsity 0.7` on 45 (block, task) units pruned 31 (0.7·45 in floating point is
    31.4999…), where the documented rule, Python's round halving to even, gives 32."""
    from eval_fixtures import build_text_setting
    from loramerge_cli.evaluation.engine import EvalSettings
    from loramerge_cli.merging.merge import MergeConfig
    from loramerge_cli.search.enmp import EnmpSettings
    from loramerge_cli.search.runner import SearchRequest, run_search

    setting = build_text_setting(tmp_path / "setting", rows=4, layers=15)
    request = SearchRequest(strategy="random", adapters=setting.adapter_args(), merge=MergeConfig(),
                            tasks=setting.tasks_file, eval=EvalSettings(threads=1, batch_size=8),
                            enmp=EnmpSettings(max_prune=1.0), budget=1, sparsity=0.7)
    _, provenance = run_search(request)
    assert provenance["search"]["pruned"] == 32, provenance["search"]


LAUNCHER = '''
import os, signal, sys
fired = []
def profile(frame, event, arg):
    if event == "call" and not fired and {condition}:
        fired.append(1)
        {action}
sys.setprofile(profile)
sys.argv = ["loramerge", *sys.argv[1:]]
from loramerge_cli.cli import main
main()
'''


def _launch(tmp_path, condition: str, action: str, arguments: list):
    import os
    import subprocess
    import sys

    from test_hostile_inputs import REPO

    launcher = tmp_path / "launcher.txt"
    launcher.write_text(LAUNCHER.format(condition=condition, action=action))
    return subprocess.run([sys.executable, str(launcher), *map(str, arguments)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO}, timeout=300)


def test_ctrl_c_while_an_option_builds_a_dataclass_is_exit_130(tmp_path):
    """Ctrl-C while --mask was parsed (its parser imports loramerge_cli.masks, whose dataclass WeightTable was
    being built): Python 3.11 turns a KeyboardInterrupt inside Field.__set_name__ into a RuntimeError, which
    nothing caught for the command: exit 1 and a 65-line traceback instead of one line and exit 130."""
    from factories import write_task_folders

    folders = write_task_folders(tmp_path / "in", names=("a", "b"), blocks=1)
    done = _launch(tmp_path, 'frame.f_code.co_name == "__set_name__" and getattr(frame.f_locals.get("owner"), '
                   '"__name__", "") == "WeightTable"', "os.kill(os.getpid(), signal.SIGINT)",
                   ["apply-mask", "--adapters", *folders.values(), "--mask", tmp_path / "m.json", "--out",
                    tmp_path / "out"])
    assert done.returncode == 130 and done.stderr.strip().splitlines() == ["interrupted; nothing was written"], \
        (done.returncode, done.stderr[-3000:])
    assert not (tmp_path / "out").exists()


def test_ctrl_c_inside_a_finalizer_prints_one_line(tmp_path):
    """Ctrl-C while Python ran a `__del__` (regex's, during apply-mask): exit 130, but stderr first held
    "Exception ignored in: <function …__del__>" and the KeyboardInterrupt's traceback."""
    from factories import write_task_folders

    folders = write_task_folders(tmp_path / "in", names=("a", "b"), blocks=1)
    action = ('class Finalized:\n            def __del__(self):\n                os.kill(os.getpid(), signal.SIGINT)'
              '\n                sum(range(10000))\n        Finalized()')
    done = _launch(tmp_path, 'frame.f_code.co_name == "check_output_dir"', action,
                   ["apply-mask", "--adapters", *folders.values(), "--indices", "[0]", "--out", tmp_path / "out"])
    assert done.returncode == 130 and done.stderr.strip().splitlines() == ["interrupted; nothing was written"], \
        (done.returncode, done.stderr[-3000:])
    assert not (tmp_path / "out").exists()
