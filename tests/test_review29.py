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


def _written_update(folder, path):
    """B·A of `path` as written in `folder`, in float64, times the scale its config gives."""
    from loramerge_cli.adapters.peft_reader import load_adapter

    adapter = load_adapter(str(folder))
    module = adapter.modules[path]
    return module.scale * module.lora_B.double() @ module.lora_A.double()


def _reference(folders, path, lam):
    """Σ_t λ·s_t·B_t A_t in float64 (task arithmetic) from the folders as read."""
    from loramerge_cli.adapters.peft_reader import load_adapter

    total = 0
    for folder in folders:
        module = load_adapter(str(folder)).modules[path]
        total = total + lam * module.scale * module.lora_B.double() @ module.lora_A.double()
    return total


def test_a_tiny_update_is_written_exactly_or_as_zero_with_a_warning(tmp_path, caplog):
    """`merge --lambda 1e-50` wrote every lora_B as 0 with exit 0 and no warning (λ = 0 is refused as empty): the
    update's whole magnitude sat in B, which float32 cannot hold; TSV and friends did the same on adapters of
    1e-30-sized factors (the SVD's S in B). An update that no balancing of B and A can hold is written as zero
    with a warning naming the module."""
    import torch
    from factories import attention_shapes, invoke_cli, random_adapter, write_peft_folder

    shapes = attention_shapes(blocks=1, m=12, n=10)
    folders = [write_peft_folder(tmp_path / name, random_adapter(name, shapes, rank=2, seed=index,
                                                                 dtype=torch.float32))
               for index, name in enumerate(("a", "b"))]
    path = next(iter(shapes))
    result = invoke_cli(["merge", "--adapters", *folders, "--lambda", "1e-50", "--out", tmp_path / "tiny"])
    assert result.exit_code == 0, result.stderr
    written, expected = _written_update(tmp_path / "tiny", path), _reference(folders, path, 1e-50)
    assert float((written - expected).norm() / expected.norm()) < 1e-6
    small = []
    for index, name in enumerate(("c", "d", "e")):
        adapter = random_adapter(name, shapes, rank=2, seed=10 + index, dtype=torch.float32)
        for module in adapter.modules.values():
            module.lora_A.mul_(1e-30)
            module.lora_B.mul_(1e-30)
        small.append(write_peft_folder(tmp_path / name, adapter))
    result = invoke_cli(["merge", "--adapters", *small, "--merger", "tsv", "--out", tmp_path / "tsv"])
    assert result.exit_code == 0, result.stderr
    assert float(_written_update(tmp_path / "tsv", path).abs().max()) > 0  # (was 0 exactly)
    gone = invoke_cli(["merge", "--adapters", *folders, "--lambda", "1e-200", "--out", tmp_path / "gone"])
    assert gone.exit_code == 0 and "is below the range of float32: written as zero" in gone.stderr, gone.stderr
    # (a cancelling merge's rounding noise is written as zero too, with the same warning, not refused); the
    # library's writer says it once, through the loramerge_cli logger
    import logging

    from loramerge_cli import api
    from loramerge_cli.api import MergeConfig

    adapters = api.load_adapters([str(folder) for folder in folders])
    with caplog.at_level(logging.WARNING, logger="loramerge_cli"):
        api.write_merged_adapter(api.merge(adapters, MergeConfig(lam=1e-200)), adapters, tmp_path / "library")
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and "2 modules" in lines[0] and "written as zero" in lines[0], lines


def test_float16_task_arithmetic_balances_each_component(tmp_path):
    """Two float16 adapters, one with large B and small A (α = 200), the other the reverse: their task arithmetic
    (largest entry 288) fits float16, but one power of two for the whole module put B·λ·s = 3e6 and A = 6e4 out of
    range together: "NaN or Inf values (beyond the range of float16?)", nothing written."""
    import torch
    from factories import attention_shapes, invoke_cli, random_adapter, write_peft_folder

    shapes = attention_shapes(blocks=1, m=16, n=12)
    path = next(iter(shapes))
    p = random_adapter("p", shapes, rank=2, alpha=200.0, seed=1, dtype=torch.float32)
    q = random_adapter("q", shapes, rank=2, alpha=2.0, seed=2, dtype=torch.float32)
    for module in p.modules.values():
        module.lora_B.mul_(6e4 / float(module.lora_B.abs().max()))
        module.lora_A.mul_(1e-4 / float(module.lora_A.abs().max()))
    for module in q.modules.values():
        module.lora_B.mul_(1e-3 / float(module.lora_B.abs().max()))
        module.lora_A.mul_(6e4 / float(module.lora_A.abs().max()))
    folders = []
    for name, adapter in (("p", p), ("q", q)):
        for module in adapter.modules.values():
            module.lora_A, module.lora_B = module.lora_A.half(), module.lora_B.half()
        folders.append(write_peft_folder(tmp_path / name, adapter))
    result = invoke_cli(["merge", "--adapters", *folders, "--out", tmp_path / "merged"])
    assert result.exit_code == 0, result.stderr
    written, expected = _written_update(tmp_path / "merged", path), _reference(folders, path, 0.5)
    assert float(expected.abs().max()) < 65504
    assert float((written - expected).norm() / expected.norm()) < 2e-3  # float16 rounding


def test_inspect_tells_tiny_scales_apart_and_notes_an_update_past_float64(tmp_path):
    """inspect rounded scales to 8 decimals: α = 1e-12 at r = 3 showed scale 0 (beside a norm of 4e-12); and an
    update whose scale·B overflows float64 (α = 1e307) got no "beyond the range" note (the check scaled B first,
    then skipped the module as non-finite)."""
    import torch
    from factories import attention_shapes, random_adapter, write_peft_folder
    from loramerge_cli import api

    shapes = attention_shapes(blocks=1, m=6, n=5)
    tiny = random_adapter("tiny", shapes, rank=3, alpha=1e-12, dtype=torch.float32)
    huge = random_adapter("huge", shapes, rank=1, alpha=1e307, dtype=torch.float32)
    for module in huge.modules.values():
        module.lora_B.fill_(1e3)
        module.lora_A.fill_(1e-10)
    report = api.inspect_adapters(api.load_adapters([str(write_peft_folder(tmp_path / "tiny", tiny)),
                                                     str(write_peft_folder(tmp_path / "huge", huge))]))
    tiny_row, huge_row = report["adapters"]
    assert list(tiny_row["scales"]) == ["3.3333333e-13"], tiny_row["scales"]
    assert any("beyond the range of float32" in note for note in huge_row["notes"]), huge_row["notes"]


def test_hints_naming_a_path_with_a_newline_stay_one_line_and_exact(tmp_path):
    """A folder whose name holds a newline: the hint `NAME='…'` became `NAME='…/new line'` once the message was
    made one line (the newline a space), naming no such folder; the same for a resume command's run dir."""
    import subprocess

    import pytest
    from factories import attention_shapes, random_adapter, write_peft_folder
    from loramerge_cli.adapters.sources import default_name
    from loramerge_cli.errors import UsageError
    from loramerge_cli.evaluation.engine import EvalSettings
    from loramerge_cli.merging.merge import MergeConfig
    from loramerge_cli.search.runner import SearchRequest, resume_command

    folder = write_peft_folder(tmp_path / "new\nline", random_adapter("x", attention_shapes(blocks=1, m=6, n=5)))
    with pytest.raises(UsageError) as error:
        default_name(str(folder))
    hint = str(error.value).split("NAME=", 1)[1]
    assert "\n" not in hint
    echoed = subprocess.run(["bash", "-c", f"printf %s {hint}"], capture_output=True, text=True).stdout
    assert echoed == str(folder), (hint, echoed)
    line = resume_command(SearchRequest(adapters=[], tasks=None, merge=MergeConfig(), eval=EvalSettings(),
                                        run_dir=tmp_path / "run\nhere"))
    assert "\n" not in line and "$'" in line


def test_search_refuses_an_empty_merge_and_nsc_an_all_zero_table(tmp_path):
    """`search-mask --lambda 0` (or --weights 0,0,0) searched merges that are all empty, scored every table the
    same and wrote one that merge --mask refuses ("the merge is empty"); NSC with --init 0 and a step too small to
    move a float32 coefficient wrote an all-zero table, refused the same way; --fitness with --strategy nsc did
    nothing and was taken."""
    from eval_fixtures import build_text_setting
    from factories import invoke_cli

    setting = build_text_setting(tmp_path / "setting")
    common = ["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
              "--val-limit", "4", "--threads", "1"]
    for empty in (["--lambda", "0"], ["--weights", "0,0,0"]):
        result = invoke_cli([*common, "--strategy", "greedy", "--budget", "2", *empty, "--out", tmp_path / "e.json"])
        assert result.exit_code == 2 and "every merge is empty" in result.stderr, result.stderr
    zero = invoke_cli([*common, "--strategy", "nsc", "--init", "0", "--lr", "1e-300", "--steps", "1",
                       "--out", tmp_path / "z.json"])
    assert zero.exit_code == 1 and "every coefficient NSC learned is 0" in zero.stderr, zero.stderr
    assert not (tmp_path / "z.json").exists()
    fitness = invoke_cli([*common, "--strategy", "nsc", "--steps", "1", "--fitness", "nsc",
                          "--out", tmp_path / "f.json"])
    assert fitness.exit_code == 2 and "--fitness does nothing with --strategy nsc" in fitness.stderr, fitness.stderr


def test_shell_words_round_trip_odd_names_through_bash():
    """Each word `shell_words` quotes comes back from bash byte for byte, in any locale: a name with a byte that is
    not UTF-8 (Python's surrogate escape) was written as `\\udcff`, which bash turns into three other bytes."""
    import os
    import subprocess

    from loramerge_cli.errors import shell_words

    words = ["plain", "a b", "it's", "tab\there", "new\nline", "back\\slash\n", os.fsdecode(b"bad\xffname"),
             "\u00e9\u0085\u2028", "\U000e0001x", "$HOME `x` !"]
    script = f"for word in {shell_words(words)}; do printf '%s\\0' \"$word\"; done"
    for locale in ("C", "C.UTF-8"):
        out = subprocess.run(["bash", "-c", script], capture_output=True,
                             env={"LC_ALL": locale, "PATH": "/usr/bin:/bin"}).stdout
        assert out.split(b"\0")[:-1] == [os.fsencode(word) for word in words], (locale, out)


def test_two_commands_sharing_a_score_cache_keep_each_others_scores(tmp_path):
    """Two `eval --run-dir R` at once: each wrote the scores.json it had read at its start plus its own, so the
    last to write dropped the other's entries (4 runs in 9 lost 3 or 6 of 12); and a file that stopped being a
    score cache meanwhile was written over."""
    import json

    import pytest
    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.evaluation.cache import ScoreCache, read_cache

    first, second = ScoreCache(tmp_path), ScoreCache(tmp_path)
    first.put({"a" * 64: 0.5})
    second.put({"b" * 64: 0.25})
    assert read_cache(tmp_path / "scores.json") == {"a" * 64: 0.5, "b" * 64: 0.25}
    (tmp_path / "scores.json").write_text(json.dumps({"accuracy": 0.9}))  # a user's file appeared there
    with pytest.raises(LoramergeError, match="not a score cache"):
        first.put({"c" * 64: 0.75})
    assert json.loads((tmp_path / "scores.json").read_text()) == {"accuracy": 0.9}
