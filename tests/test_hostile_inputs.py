"""A hostile user's commands: nothing lost, nothing overwritten, nothing silent.

Outputs never replace an input or anything loramerge did not write; nothing non-finite is written;
Ctrl-C is exit 130 with nothing half-written; workers die with their parent; a run dir is locked, holds no
pickle, and resumes only the search it holds, on the inputs it started with; every failure is one line.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from factories import attention_shapes, invoke_cli, random_adapter, write_peft_folder, write_task_folders

from loramerge_cli.errors import LoramergeError

TESTS = os.path.dirname(__file__)
REPO = os.path.dirname(TESTS)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folders = write_task_folders(tmp_path_factory.mktemp("hostile"), names=("a", "b"))
    return [str(folders["a"]), str(folders["b"])]


def digests(*folders) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def one_line(result, word: str, code: int = 1) -> None:
    """Exit `code`, one line on stderr naming `word`, no traceback, no internal error."""
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert result.stderr.count("\n") == 1 and "internal error" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert word.lower() in result.stderr.lower(), result.stderr


# --- outputs: never an input, never something loramerge did not write -------------------------------------

@pytest.mark.parametrize("command,target", [
    ("apply-mask", "input"), ("apply-mask", "holder"), ("merge", "input"), ("merge", "holder"), ("merge", "inside"),
])
def test_out_never_replaces_or_holds_an_input(good, command, target):
    before = digests(*good)
    out = {"input": good[0], "holder": str(Path(good[0]).parent), "inside": str(Path(good[0]) / "merged")}[target]
    extra = ["--indices", "[]"] if command == "apply-mask" else []
    one_line(invoke_cli([command, "--adapters", *good, *extra, "--out", out, "--force"]), "input")
    assert digests(*good) == before and not (Path(good[0]) / "merged").exists()


@pytest.mark.parametrize("target", ["adapter config", "task spec"])
def test_search_out_never_replaces_an_input(setting, target):
    adapters = setting.adapter_args()
    out = setting.tasks_file if target == "task spec" else \
        Path(adapters[0].partition("=")[2] or adapters[0]) / "adapter_config.json"
    before = out.read_bytes()
    result = invoke_cli(["search-mask", "--strategy", "screened",
                         "--adapters", *adapters, "--tasks", setting.tasks_file, "--out", out,
                         "--force"])
    one_line(result, "input")
    assert out.read_bytes() == before


@pytest.mark.parametrize("kind", ["regular file", "fifo", "symlink", "foreign folder"])
@pytest.mark.parametrize("command", ["merge", "apply-mask"])
def test_force_never_replaces_what_loramerge_did_not_write(good, tmp_path, kind, command):
    out = tmp_path / "out"
    if kind == "regular file":
        out.write_text("precious")
    elif kind == "fifo":
        os.mkfifo(out)
    elif kind == "symlink":
        (tmp_path / "target").mkdir()
        out.symlink_to(tmp_path / "target")
    else:
        out.mkdir()
        (out / "thesis.tex").write_text("precious")
    extra = ["--indices", "[]"] if command == "apply-mask" else []
    result = invoke_cli([command, "--adapters", *good, *extra, "--out", out, "--force"])
    one_line(result, "refusing")
    if kind == "regular file":
        assert out.read_text() == "precious"
    elif kind == "fifo":
        assert Path(out).is_fifo()
    elif kind == "symlink":
        assert out.is_symlink()
    else:
        assert (out / "thesis.tex").read_text() == "precious"


def test_search_plots_never_go_into_an_input(setting, tmp_path):
    adapters = setting.adapter_args()
    result = invoke_cli(["search-mask", "--strategy", "screened",
                         "--adapters", *adapters, "--tasks", setting.tasks_file, "--plot",
                         adapters[0].partition("=")[2], "--out", tmp_path / "mask.json"])
    one_line(result, "--plot")


def test_search_out_onto_a_folder_is_refused_before_any_work(setting, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    result = invoke_cli(["search-mask", "--strategy", "screened",
                         "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                         "--out", folder, "--force"])
    one_line(result, "not a regular file")


def test_out_dot_and_the_working_folder(good, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", str(work), str(tmp_path)):
        one_line(invoke_cli(["merge", "--adapters", *good, "--out", out, "--force"]), "working folder")
    assert list(work.iterdir()) == []


def test_out_parents_are_checked_before_work(good, setting, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for command in (["merge", "--adapters", *good],
                    ["search-mask", "--strategy", "screened",
                     "--tasks", setting.tasks_file, "--adapters", *setting.adapter_args()]):
        result = invoke_cli([*command, "--out", blocker / "sub" / "out.json"])
        one_line(result, "not a folder")


def test_loramerge_output_is_replaced_with_force(good, tmp_path):
    out = tmp_path / "out"
    assert invoke_cli(["merge", "--adapters", *good, "--out", out]).exit_code == 0
    result = invoke_cli(["merge", "--adapters", *good, "--out", out, "--force", "--lambda", "0.5"])
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "loramerge.json").read_text())["parameters"]["lambda"] == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging left


def _killed_merge(good, out, patch: str) -> subprocess.CompletedProcess:
    """Run a merge in a subprocess that SIGKILLs itself at the point `patch` sets up."""
    head = textwrap.dedent("""
        import os, signal, sys
        import loramerge_cli.adapters.writer as writer
        import loramerge_cli.outputs as outputs
        die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    """)
    tail = textwrap.dedent(f"""
        from loramerge_cli.cli import main
        sys.argv = ["loramerge", "merge", "--adapters", {good[0]!r}, {good[1]!r}, "--out", {str(out)!r}, "--force",
                    "--lambda", "0.25"]
        main()
    """)
    script = head + patch + "\n" + tail
    return subprocess.run([sys.executable, "-c", script], capture_output=True, env={**os.environ, "PYTHONPATH": REPO})


def test_killed_merge_leaves_no_debris_after_the_next_run(good, tmp_path):
    out = tmp_path / "out"
    killed = _killed_merge(good, out, "writer._save_safetensors = die")
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # debris
    assert invoke_cli(["merge", "--adapters", *good, "--out", out]).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_replacement_has_the_old_or_the_new_adapter_at_every_instant(good, tmp_path):
    from loramerge_cli.outputs import clean_debris

    out = tmp_path / "out"
    assert invoke_cli(["merge", "--adapters", *good, "--out", out]).exit_code == 0
    old = (out / "adapter_model.safetensors").read_bytes()
    # killed right after the atomic swap: the new adapter is in place, the old one is debris
    killed = _killed_merge(good, out, "real = outputs.exchange\n"
                                      "outputs.exchange = lambda a, b: real(a, b) and die()")
    assert killed.returncode == -signal.SIGKILL
    new = (out / "adapter_model.safetensors").read_bytes()
    assert new != old and json.loads((out / "loramerge.json").read_text())["parameters"]["lambda"] == 0.25
    clean_debris(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # where the swap is not available: killed between the two renames, the next run puts the old one back
    killed = _killed_merge(good, out, "outputs.exchange = lambda a, b: False\n"
                                      "real_rename = os.rename\n"
                                      "calls = []\n"
                                      "def rename(a, b):\n"
                                      "    calls.append(a)\n"
                                      "    real_rename(a, b)\n"
                                      "    if len(calls) == 1: die()\n"
                                      "os.rename = rename")
    assert killed.returncode == -signal.SIGKILL and not out.exists()
    clean_debris(out)
    assert (out / "adapter_model.safetensors").read_bytes() == new
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".out.loramerge-")) == ["out"]


# --- nothing non-finite is written; every number is checked ----------------------------------------------

def _mask(tmp_path, good, change) -> list[str]:
    from loramerge_cli.adapters.peft_reader import load_adapters
    from loramerge_cli.masks import ones_table

    data = ones_table(load_adapters(good)).to_json()
    change(data)
    path = tmp_path / "mask.json"
    path.write_text(json.dumps(data))  # json writes inf/nan as Infinity/NaN, as a hostile file would
    return ["--mask", str(path)]


def _row(value):
    def change(data):
        data["weights"][0][0] = value
    return change


def _nan_head_folder(tmp_path):
    adapter = random_adapter("h", attention_shapes(blocks=3, m=12, n=10) | {"pooler.dense": (6, 10)}, rank=2,
                             alpha=4.0, seed=5, dtype=torch.float32)
    adapter.heads = {"score.weight": torch.full((3, 10), float("nan"))}
    adapter.config["task_type"] = "SEQ_CLS"
    return str(write_peft_folder(tmp_path / "h", adapter))


def _huge_folder(tmp_path):
    adapter = random_adapter("huge", attention_shapes(blocks=3, m=12, n=10) | {"pooler.dense": (6, 10)}, rank=2,
                             alpha=2.0, seed=6, dtype=torch.float32)
    for module in adapter.modules.values():
        module.lora_B.mul_(1e5)
    return str(write_peft_folder(tmp_path / "huge", adapter))


NON_FINITE = {
    "mask weight Infinity": lambda t, g: (["--adapters", *g, *_mask(t, g, _row(float("inf")))], "finite"),
    "mask weight 1e308": lambda t, g: (["--adapters", *g, *_mask(t, g, _row(1e308))], "NaN or Inf"),
    "mask scale NaN": lambda t, g: (["--adapters", *g, *_mask(t, g, lambda d: d.update(scale=float("nan")))],
                                    "finite"),
    "lambda 1e308": lambda t, g: (["--adapters", *g, "--lambda", "1e308"], "NaN or Inf"),
    "lambda nan": lambda t, g: (["--adapters", *g, "--lambda", "nan"], "finite"),
    "weights 1e308": lambda t, g: (["--adapters", *g, "--weights", "1e308,1"], "NaN or Inf"),
    "weights nan": lambda t, g: (["--adapters", *g, "--weights", "nan,1"], "finite"),
    "density nan": lambda t, g: (["--adapters", *g, "--merger", "ties", "--density", "nan"], "finite"),
    "drop rate nan": lambda t, g: (["--adapters", *g, "--merger", "dare", "--drop-rate", "nan"], "finite"),
    "NaN head with --head": lambda t, g: (["--adapters", _nan_head_folder(t), g[1], "--head", "h"], "score"),
    "float16 overflow": lambda t, g: (["--adapters", _huge_folder(t), "--dtype", "float16"], "float16"),
}


FLAG_VALUES = {"lambda nan", "weights nan", "density nan", "drop rate nan"}  # usage errors: exit 2


@pytest.mark.parametrize("case", NON_FINITE)
def test_non_finite_output_is_never_written(case, good, tmp_path):
    args, word = NON_FINITE[case](tmp_path, good)
    out = tmp_path / "out"
    one_line(invoke_cli(["merge", *args, "--out", out]), word, code=2 if case in FLAG_VALUES else 1)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.mark.parametrize("flag", ["--threshold", "--sigma0"])
def test_search_numbers_must_be_finite(good, tmp_path, flag):
    result = invoke_cli(["search-mask", "--strategy", "screened",
                         "--adapters", *good, "--tasks", tmp_path / "tasks.yaml", flag, "nan",
                         "--out", tmp_path / "mask.json"])
    one_line(result, flag, code=2)  # a flag value: usage, refused before the task spec is read


# --- adapter configs, names, full disks -----------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("r", "four"), ("lora_alpha", None), ("rank_pattern", ["q_proj"]), ("r", 0),
                                         ("use_rslora", "yes"), ("target_modules", 3)])
def test_config_field_types_are_one_line(good, tmp_path, field, value):
    folder = tmp_path / "typed"
    shutil.copytree(good[0], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config[field] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))
    one_line(invoke_cli(["merge", "--adapters", folder, good[1], "--out", tmp_path / "out"]), field)


def test_a_source_through_dot_dot_is_named_by_its_folder(good):
    from loramerge_cli.adapters.peft_reader import load_adapter

    sub = Path(good[0]) / "sub"
    sub.mkdir(exist_ok=True)
    try:
        assert load_adapter(str(sub / "..")).name == "a"
        assert load_adapter(good[0] + "/.").name == "a"
    finally:
        sub.rmdir()


def test_full_disk_is_one_line(good, tmp_path, monkeypatch):
    import safetensors.torch

    from loramerge_cli import atomic
    from loramerge_cli.masks import WeightTable

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    one_line(invoke_cli(["merge", "--adapters", *good, "--out", tmp_path / "out"]), "no space left")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(atomic, "_commit", full)
    with pytest.raises(LoramergeError, match="No space left") as error:
        WeightTable(["a"], ["u"], [[1.0]]).save(tmp_path / "mask.json")
    assert "\n" not in str(error.value) and list(tmp_path.iterdir()) == []


# --- interrupts ---------------------------------------------------------------------------------------------

def test_ctrl_c_inside_a_safetensors_read_is_not_a_corrupt_file(good, tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        import safetensors.torch
        from safetensors import SafetensorError
        def load_file(path, device="cpu"):
            try:  # what the Rust reader does: the interrupt surfaces as its own error
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except KeyboardInterrupt:
                raise SafetensorError("Error while deserializing header: invalid")
        safetensors.torch.load_file = load_file
        from loramerge_cli.cli import main
        sys.argv = ["loramerge", "merge", "--adapters", {good[0]!r}, {good[1]!r}, "--out", {str(tmp_path / "o")!r}]
        main()
    """)
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": REPO})
    assert process.returncode == 130, process.stderr
    assert process.stderr.startswith("interrupted") and "corrupt" not in process.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("delay", [1.0, 2.0, 3.5])  # from the heavy imports on (a loaded machine may still be
def test_ctrl_c_at_any_moment_is_exit_130_and_no_output(good, tmp_path, delay):  # in Python's own startup at 0.4 s)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "loramerge_cli", "merge", "--adapters", *good, "--out", out],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": REPO})
    time.sleep(delay)
    finished_before = process.poll() is not None
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    if finished_before or process.returncode == 0:  # it ended before the signal came: then it succeeded whole
        assert process.returncode == 0 and (out / "adapter_model.safetensors").is_file()
        return
    assert process.returncode in (130, -signal.SIGINT), stderr  # -SIGINT: a shell shows 130 too
    completed = (out / "loramerge.json").is_file()  # the signal came as the process was ending
    assert completed or stderr.strip().splitlines()[-1].startswith("interrupted"), stderr
    assert not out.exists() or completed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# --- search workers -----------------------------------------------------------------------------------------

class ConstantBuilder:
    """A worker fitness that needs no model (for process-lifetime tests)."""

    def __call__(self, device):
        return lambda candidates: [0.0 for _ in candidates]


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie holds no memory or pipes; its reaper may be slow in a container


def test_workers_die_with_their_parent():
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {TESTS!r})
        from test_hostile_inputs import ConstantBuilder
        from loramerge_cli.search.parallel import ParallelFitness
        fitness = ParallelFitness(ConstantBuilder(), ["cpu", "cpu"])
        assert fitness([((1,), None)]) == [0.0]
        print(" ".join(str(p.pid) for p in fitness.processes), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": REPO})
    assert process.returncode == -signal.SIGKILL, process.stderr
    pids = [int(pid) for pid in process.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(map(_gone, pids)):
        time.sleep(0.2)
    assert all(map(_gone, pids))


def test_a_worker_ignores_ctrl_c_and_a_dead_worker_is_one_line():
    from loramerge_cli.search.parallel import ParallelFitness

    fitness = ParallelFitness(ConstantBuilder(), ["cpu", "cpu"])
    try:
        os.kill(fitness.processes[0].pid, signal.SIGINT)  # Ctrl-C reaches the group: the parent handles it
        time.sleep(0.5)
        assert fitness([((1,), None), ((2,), None)]) == [0.0, 0.0]
        os.kill(fitness.processes[1].pid, signal.SIGKILL)
        fitness.processes[1].join(timeout=30)
        with pytest.raises(LoramergeError, match="worker died"):
            fitness([((index,), None) for index in range(8)])
    finally:
        fitness.close(wait=False)
    assert not any(p.is_alive() for p in fitness.processes)


# --- run directories: lock, no pickle, resume -------------------------------------------------------------

@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    from eval_fixtures import build_text_setting

    return build_text_setting(tmp_path_factory.mktemp("hostile_search"))


def search_request(setting, **changes):
    from loramerge_cli.evaluation.engine import EvalSettings
    from loramerge_cli.merging.merge import MergeConfig
    from loramerge_cli.search.enmp import EnmpSettings
    from loramerge_cli.search.runner import SearchRequest

    base = SearchRequest(strategy="screened",
                         adapters=setting.adapter_args(), merge=MergeConfig(merger="ties"), tasks=setting.tasks_file,
                         eval=EvalSettings(threads=1, batch_size=8),
                         enmp=EnmpSettings(popsize=6, generations=4, max_prune=0.5, seed=3))
    return replace(base, **changes)


@pytest.fixture(scope="module")
def plain(setting):
    from loramerge_cli.search.runner import run_search

    return run_search(search_request(setting))


def test_a_locked_run_dir_is_refused_in_one_line(setting, tmp_path):
    from loramerge_cli.search.rundir import RunDirLock

    with RunDirLock(tmp_path / "run"):
        result = invoke_cli(["search-mask", "--strategy", "screened",
                             "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                             "--run-dir", tmp_path / "run", "--out", tmp_path / "mask.json"])
        one_line(result, "in use by another search")
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # nothing written into it
    with RunDirLock(tmp_path / "run"):  # released with the process (or the search) that held it
        pass


@pytest.mark.slow
def test_a_planted_pickle_never_runs(setting, tmp_path):
    from loramerge_cli.search.runner import run_search

    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    run_search(search_request(setting, run_dir=run_dir))

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    (run_dir / "state.pkl").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(LoramergeError, match="never read"):
        run_search(search_request(setting, run_dir=run_dir, resume=True))
    assert not marker.exists()
    assert not list(run_dir.glob("*.pkl"))[1:]  # nothing of ours is a pickle: the planted file is the only one


CORRUPT = {"truncated": lambda b: b[: len(b) // 2], "empty": lambda b: b"", "wrong type": lambda b: b"[1, 2]",
           "random bytes": lambda b: os.urandom(300)}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["screened_state.json", "state.json", "config.json", "scores.json"])
@pytest.mark.parametrize("corruption", CORRUPT)
def test_a_corrupt_run_dir_file_is_one_line(setting, tmp_path, name, corruption):
    run_dir = tmp_path / "run"
    strategy = ["--strategy", "enmp"] if name == "state.json" else []  # ENMP's state; the default's is screened's
    result = _cli_search(setting, tmp_path, "--run-dir", run_dir, *strategy)
    assert result.exit_code == 0, result.stderr
    path = run_dir / name
    path.write_bytes(CORRUPT[corruption](path.read_bytes()))
    one_line(_cli_search(setting, tmp_path, "--run-dir", run_dir, "--resume", "--force", "--quiet", *strategy), name)


def _cli_search(setting, tmp_path, *extra, out="mask.json", generations="4"):
    return invoke_cli(["search-mask", "--strategy", "screened",
                       "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                       "--merger", "ties", "--popsize", "6", "--generations", generations, "--max-prune", "0.5",
                       "--seed", "3", "--threads", "1", "--batch-size", "8", "--out", tmp_path / out, *extra])


def _kill_at_commit(monkeypatch, name: str, skip: int = 0):
    """Make the (skip+1)-th atomic write of run-dir file `name` die between its temporary file and its rename,
    as a SIGKILL there would."""
    from loramerge_cli import atomic

    real, seen = atomic._commit, []

    def commit(temporary, path):
        if Path(path).name == name:
            seen.append(path)
            if len(seen) == skip + 1:
                raise KeyboardInterrupt
        real(temporary, path)

    monkeypatch.setattr(atomic, "_commit", commit)


@pytest.mark.slow
@pytest.mark.parametrize("name,skip", [("config.json", 0), ("scores.json", 0), ("screened_state.json", 0),
                                       ("screened_state.json", 2),
                                       ("trajectory.jsonl", 1), ("best.json", 1)])
def test_killed_during_each_run_dir_write_resumes_to_the_same_table(setting, plain, tmp_path, monkeypatch, name,
                                                                    skip):
    from loramerge_cli.search.runner import run_search

    run_dir = tmp_path / "run"
    _kill_at_commit(monkeypatch, name, skip)
    with pytest.raises(KeyboardInterrupt):
        run_search(search_request(setting, run_dir=run_dir))
    monkeypatch.undo()
    table, provenance = run_search(search_request(setting, run_dir=run_dir, resume=True))
    assert table.weights == plain[0].weights
    assert provenance["validation"] == plain[1]["validation"]
    assert [r["best_fitness"] for r in provenance["history"]] == [r["best_fitness"] for r in plain[1]["history"]]


@pytest.mark.slow
def test_killed_before_the_first_checkpoint_starts_over(setting, plain, tmp_path):
    from loramerge_cli.search.runner import run_search

    def interrupt(kind, data):
        if kind == "start":
            raise KeyboardInterrupt

    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_search(search_request(setting, run_dir=run_dir), interrupt)
    assert (run_dir / "config.json").is_file() and not (run_dir / "screened_state.json").exists()
    table, _ = run_search(search_request(setting, run_dir=run_dir, resume=True))
    assert table.weights == plain[0].weights


def _copied_setting(setting, tmp_path):
    """The setting's adapters and data copied, so that a test may change them."""
    import yaml

    adapters = {name: shutil.copytree(path, tmp_path / "adapters" / name) for name, path in setting.adapters.items()}
    spec = yaml.safe_load(setting.tasks_file.read_text())
    for task in spec["tasks"]:
        for split, file in task["data"].items():
            copy = tmp_path / "data" / task["name"] / Path(file).name
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, copy)
            task["data"][split] = str(copy)
    tasks_file = tmp_path / "tasks.yaml"
    tasks_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    return replace(setting, adapters=adapters, tasks_file=tasks_file)


@pytest.mark.slow
@pytest.mark.parametrize("changed", ["adapter", "data"])
def test_resume_refuses_a_changed_input_naming_it(setting, tmp_path, changed):
    from safetensors.torch import load_file, save_file

    from loramerge_cli.search.runner import run_search

    copied = _copied_setting(setting, tmp_path)
    run_dir = tmp_path / "run"

    def interrupt(kind, data):
        if kind in ("generation", "greedy") and data["generation"] == 2:  # a step (a greedy round too)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_search(search_request(copied, run_dir=run_dir), interrupt)
    if changed == "adapter":
        target = copied.adapters["beta"] / "adapter_model.safetensors"
        tensors = load_file(str(target))
        key = next(k for k in tensors if "lora_B" in k)
        tensors[key] = tensors[key] + 0.01
        save_file(tensors, str(target))
    else:
        target = tmp_path / "data" / "alpha" / "validation.jsonl"
        target.write_text(target.read_text().replace('"label": 0', '"label": 2', 1))
    with pytest.raises(LoramergeError, match="changed") as error:
        run_search(search_request(copied, run_dir=run_dir, resume=True))
    assert str(target.resolve()) in str(error.value)


@pytest.mark.slow
def test_resume_alone_continues_with_the_saved_flags(setting, tmp_path, monkeypatch):
    from loramerge_cli.search import screened

    whole = _cli_search(setting, tmp_path, "--run-dir", tmp_path / "whole", out="whole.json")
    assert whole.exit_code == 0, whole.stderr
    real_step = screened.ScreenedSearch.step  # the default strategy's

    def step(self):
        if self.state.step == 2:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(screened.ScreenedSearch, "step", step)
    run_dir = tmp_path / "run"
    interrupted = _cli_search(setting, tmp_path, "--run-dir", run_dir)
    assert interrupted.exit_code == 130
    assert f"loramerge search-mask --run-dir {run_dir} --resume" in interrupted.stderr
    monkeypatch.undo()
    different = invoke_cli(["search-mask", "--strategy", "screened",
                            "--run-dir", run_dir, "--resume", "--popsize", "4"])
    one_line(different, "--popsize is 4 but the saved run used 6")
    monkeypatch.chdir(setting.tasks_file.parent)  # the same file, spelt relative: not a difference
    resumed = invoke_cli(["search-mask", "--strategy", "screened",
                          "--run-dir", run_dir, "--resume", "--tasks", setting.tasks_file.name])
    assert resumed.exit_code == 0, resumed.stderr
    table = json.loads((tmp_path / "mask.json").read_text())
    assert table["weights"] == json.loads((tmp_path / "whole.json").read_text())["weights"]


@pytest.mark.slow
def test_search_out_into_a_missing_folder_is_created(setting, tmp_path):
    result = _cli_search(setting, tmp_path, out="new/deeper/mask.json", generations="1")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "new" / "deeper" / "mask.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("signal_number, codes, word", [
    (signal.SIGINT, (130, -signal.SIGINT), "interrupted"),  # Ctrl-C in a terminal: the whole foreground group
    (signal.SIGTERM, (143,), "terminated"),  # a cancelled CI job, `timeout`, `docker stop`: handled as Ctrl-C is
])
def test_ctrl_c_to_a_parallel_search_process_group(setting, tmp_path, signal_number, codes, word):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "loramerge_cli", "search-mask", "--strategy", "screened",
                                                "--adapters", *setting.adapter_args(), "--tasks",
         str(setting.tasks_file), "--merger", "ties", "--popsize", "6", "--generations", "200", "--max-prune", "0.5",
         "--workers", "2", "--threads", "1", "--batch-size", "8", "--run-dir", str(run_dir), "--out",
         str(tmp_path / "mask.json"), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONPATH": REPO})
    deadline = time.monotonic() + 240
    while not (run_dir / "trajectory.jsonl").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert (run_dir / "trajectory.jsonl").exists(), process.communicate()[1]
    os.killpg(process.pid, signal_number)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode in codes, stderr
    assert stderr.strip().splitlines()[-1] == (f"{word}; resume with: loramerge search-mask --run-dir "
                                               f"{run_dir} --resume --threads 1 --workers 2"), stderr  # as it ran
    assert not (tmp_path / "mask.json").exists() and "leaked" not in stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        alive = subprocess.run(["ps", "-o", "pid,stat,cmd", "-g", str(process.pid)], capture_output=True, text=True)
        assert all(" Z" in line for line in alive.stdout.splitlines()[1:]), alive.stdout


# --- what the evaluation reads ------------------------------------------------------------------------------

def _spec_with(setting, tmp_path, change):
    import yaml

    spec = yaml.safe_load(setting.tasks_file.read_text())
    change(spec)
    path = tmp_path / "tasks.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.slow
def test_non_utf8_data_is_one_line(setting, tmp_path):
    from loramerge_cli.search.runner import build_problem

    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"premise": "caf\xe9", "hypothesis": "x", "label": 0}\n'.encode("latin-1"))
    tasks = _spec_with(setting, tmp_path, lambda s: s["tasks"][0]["data"].update(validation=str(bad)))
    with pytest.raises(LoramergeError, match="not UTF-8") as error:
        build_problem(search_request(setting, tasks=tasks))
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_a_spec_base_other_than_the_adapters_is_refused_unless_allowed(setting, tmp_path):
    from loramerge_cli.search.runner import build_problem

    other = shutil.copytree(setting.base, tmp_path / "other_base")
    tasks = _spec_with(setting, tmp_path, lambda s: s.update(base_model=str(other)))
    with pytest.raises(LoramergeError, match="differs from the base"):
        build_problem(search_request(setting, tasks=tasks))
    assert build_problem(search_request(setting, tasks=tasks, allow_base_mismatch=True)).engine is not None


@pytest.mark.slow
def test_adapters_of_another_kind_than_the_tasks_are_refused(setting, tmp_path):
    from loramerge_cli.search.runner import build_problem

    copied = _copied_setting(setting, tmp_path)
    config_file = copied.adapters["alpha"] / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "task_type": "CAUSAL_LM"}))
    with pytest.raises(LoramergeError, match="trained for CAUSAL_LM"):
        build_problem(search_request(copied))


@pytest.mark.slow
def test_a_classification_task_on_a_causal_lm_head_is_refused(setting, tmp_path):
    import transformers

    from loramerge_cli.search.runner import build_problem

    config = transformers.AutoConfig.from_pretrained(str(setting.base))
    config.architectures = ["LlamaForCausalLM"]
    transformers.LlamaForCausalLM(config).save_pretrained(str(tmp_path / "causal"))
    for file in setting.base.iterdir():  # the tokenizer's files
        if file.name != "config.json" and not file.name.startswith("model"):
            shutil.copy(file, tmp_path / "causal")

    def headless(spec):
        spec["base_model"] = str(tmp_path / "causal")
        for task in spec["tasks"]:
            task["head"] = "none"

    tasks = _spec_with(setting, tmp_path, headless)
    with pytest.raises(LoramergeError, match="no trained classification head"):
        build_problem(search_request(setting, tasks=tasks, allow_base_mismatch=True))


# --- standard output: a reader that went away, a full device ------------------------------------------------

def _loramerge_into(stdout, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loramerge_cli", *args], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, "PYTHONPATH": REPO}, timeout=120)


@pytest.mark.parametrize("args", [("--version",), ("-h",), ("merge", "-h"), ("inspect",), ("inspect", "--json")])
def test_a_closed_pipe_on_stdout_is_quiet_exit_141(good, args):
    """`loramerge inspect | head -1`: the reader went away, as `yes | head` (141 = 128 + SIGPIPE), no word."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe is EPIPE from the first byte
    try:
        process = _loramerge_into(write_end, *args, *(good if args[0] == "inspect" else ()))
    finally:
        os.close(write_end)
    assert process.returncode == 141, process.stderr
    assert process.stderr == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("args", [("--version",), ("-h",), ("merge", "-h"), ("inspect",), ("inspect", "--json")])
def test_a_full_stdout_is_one_line_and_exit_1(good, args):
    with open("/dev/full", "w") as full:
        process = _loramerge_into(full, *args, *(good if args[0] == "inspect" else ()))
    assert process.returncode == 1, process.stderr
    assert process.stderr == "error: cannot write to standard output: No space left on device\n"


@pytest.mark.parametrize("command,flag", [
    ("merge", "--out"), ("merge", "--mask"), ("merge", "--tasks"), ("merge", "--config"),
    ("search-mask", "--run-dir"), ("search-mask", "--plot"), ("eval", "--out"),
])
def test_an_empty_path_is_a_usage_error_not_the_working_folder(good, tmp_path, command, flag):
    """`--out "$OUT"` with OUT unset: the flag named, exit 2 (it read as `.`, the working folder)."""
    given = {"merge": ["--out", tmp_path / "m"], "search-mask": ["--tasks", tmp_path / "t.yaml", "--out",
                                                                  tmp_path / "m.json"],
             "eval": ["--tasks", tmp_path / "t.yaml"]}[command]
    arguments = [a for pair in zip(given[::2], given[1::2]) if pair[0] != flag for a in pair]
    result = invoke_cli([command, "--adapters", *good, *arguments, flag, ""])
    one_line(result, f"'{flag}': the path is empty", 2)
    assert not (tmp_path / "m").exists()


def test_a_closed_stdout_is_one_line_and_exit_1(good):
    """`loramerge inspect a b >&-`: Python starts with no sys.stdout."""
    process = subprocess.run([sys.executable, "-m", "loramerge_cli", "inspect", *good], stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": REPO}, timeout=120,
                             preexec_fn=lambda: os.close(1))
    assert process.returncode == 1, process.stderr
    assert process.stderr == "error: cannot write to standard output: it is closed (redirect it to a file or " \
                             "/dev/null)\n"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_stderr_that_cannot_be_written_changes_no_output_and_no_exit_code(good, tmp_path):
    """Progress, notes and the error line are for people: a full or closed stderr drops them, nothing else."""
    env = {**os.environ, "PYTHONPATH": REPO}
    command = [sys.executable, "-m", "loramerge_cli"]
    with open("/dev/full", "w") as full:
        usage = subprocess.run([*command, "inspect", "--bogus"], stderr=full, env=env, timeout=120)
        merged = subprocess.run([*command, "merge", "--adapters", *good, "--merger", "ties", "--out", tmp_path / "m"],
                                stdout=subprocess.DEVNULL, stderr=full, env=env, timeout=120)
    closed = subprocess.run([*command, "merge", "--adapters", str(tmp_path / "missing"), "--out", tmp_path / "n"],
                            env=env, timeout=120, preexec_fn=lambda: os.close(2))
    assert (usage.returncode, merged.returncode, closed.returncode) == (2, 0, 1)
    assert (tmp_path / "m" / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_merge_warnings_come_before_a_stdout_that_fails(good, tmp_path):
    with open("/dev/full", "w") as full:
        process = _loramerge_into(full, "merge", "--adapters", *good, "--merger", "ties", "--out", str(tmp_path / "m"))
    assert process.returncode == 1
    assert "note: no --head" in process.stderr
    assert process.stderr.endswith("error: cannot write to standard output: No space left on device\n")


@pytest.mark.parametrize("line,flag,word", [
    ('out: ""', "--out", "'--out': the path is empty"), ("out: ' '", "--out", "'--out': the path is empty"),
    ("run_dir: ''", "--run-dir", "'--run-dir': the path is empty"), ("out: 2024-01-01", "--out", "is not a path"),
    ("out: 0", "--out", "is not a path"), ("tasks: 3", "--tasks", "is not a path"),
    ("out: [a, b]", "--out", "a list is not a path"), ("base: ''", "--base", "base: the source is empty"),
    ("base: 5", "--base", "base: 5 is not a path or Hub id"),
])
def test_a_recipe_path_that_is_empty_or_not_text_is_a_usage_error(good, tmp_path, line, flag, word):
    """Before: an empty path became the recipe's own folder (a previous merge there was replaced with
    --force); a date became a traceback."""
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")
    recipe = folder / "r.yaml"
    recipe.write_text(f"adapters:\n  a: {good[0]}\n  b: {good[1]}\n{line}\n")
    command = "search-mask" if flag in ("--run-dir", "--tasks") else "merge"
    extra = ["--tasks", tmp_path / "t.yaml", "--out", tmp_path / "m.json"] if flag == "--run-dir" else []
    extra += ["--out", tmp_path / "m.json"] if flag == "--tasks" else []
    extra += ["--out", tmp_path / "m"] if flag == "--base" else []
    result = invoke_cli([command, "--config", recipe, *extra, "--force"])
    one_line(result, word, 2)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "r.yaml"]


@pytest.mark.parametrize("args", [["inspect", ""], ["inspect", "--adapters", " "],
                                  ["merge", "--adapters", "", "--out", "o"], ["inspect", "first="],
                                  ["eval", "--adapters", "a", "--merged", "", "--tasks", "t.yaml"]])
def test_an_empty_adapter_source_is_a_usage_error(args):
    result = invoke_cli(args)
    one_line(result, "the source is empty", 2)


@pytest.mark.parametrize("adapters,word", [
    ("{a: '', b: B}", "adapter 'a': the source is empty"), ("{a: null, b: B}", "adapter 'a': None is not a path"),
    ("{a: 5, b: B}", "adapter 'a': 5 is not a path"),
    ("{a: {path: ''}, b: B}", "adapter 'a': path: the source is empty"), ("[B, null]", "adapters: None is not a path"),
])
def test_a_recipe_adapter_without_a_source_is_a_usage_error(good, tmp_path, adapters, word):
    """Before: `null` and numbers became the text "None" or "5" (a base model named "None" written into the
    merged adapter's config), and an empty source the recipe's folder."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"adapters: {adapters.replace('B', good[1])}\nout: m\n")
    one_line(invoke_cli(["merge", "--config", recipe]), word, 2)
    assert not (tmp_path / "m").exists()


def test_a_search_whose_stderr_reader_went_away_still_writes_its_table(setting, tmp_path):
    """`search-mask … 2>&1 | head -1`-like: the progress has nowhere to go; the search ends as usual (it stopped
    at its first progress line with exit 1 and no table)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        process = subprocess.run(
            [sys.executable, "-m", "loramerge_cli", "search-mask", "--adapters", *setting.adapter_args(), "--tasks",
             str(setting.tasks_file), "--merger", "ties", "--budget", "12", "--max-prune", "0.5", "--threads", "1",
             "--batch-size", "8", "--out", str(tmp_path / "mask.json")],
            stdout=subprocess.DEVNULL, stderr=write_end, env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
    finally:
        os.close(write_end)
    assert process.returncode == 0
    assert json.loads((tmp_path / "mask.json").read_text())["provenance"]["strategy"] == "surrogate"


def test_a_merge_in_a_terminal_finishes_with_its_live_progress(good, tmp_path):
    """On a terminal the progress is live: rich then stands in for sys.stderr, and the console's own writes must
    not go through that stand-in (they did: a loop, and the merge never ended, Ctrl-C included)."""
    import pty
    import threading

    main, terminal = pty.openpty()
    seen = []

    def drain():
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:
                return
            if not chunk:
                return
            seen.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        process = subprocess.run([sys.executable, "-m", "loramerge_cli", "merge", "--adapters", *good, "--out",
                                  str(tmp_path / "m"), "--threads", "1"], stdin=terminal, stdout=terminal,
                                 stderr=terminal, env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    finally:
        os.close(terminal)
        reader.join(timeout=10)
        os.close(main)
    assert process.returncode == 0, b"".join(seen)[-2000:]
    assert (tmp_path / "m" / "adapter_model.safetensors").is_file()
    assert b"merged into" in b"".join(seen)


@pytest.mark.parametrize("closed", [1, 2])
def test_ctrl_c_with_a_closed_stream_is_still_exit_130(good, tmp_path, closed):
    """`merge … 2>&-` (or `>&-`) and Ctrl-C: the exit code says it (it was 1: flushing the missing stream)."""
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "loramerge_cli", "merge", "--adapters", *good, "--out", out],
                               stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": REPO},
                               stdout=subprocess.DEVNULL if closed == 2 else None,
                               stderr=subprocess.DEVNULL if closed == 1 else None,
                               preexec_fn=lambda: os.close(closed))
    time.sleep(1.0)  # in the heavy imports, or the merge's first steps
    finished_before = process.poll() is not None
    process.send_signal(signal.SIGINT)
    process.wait(timeout=120)
    if finished_before or (out / "loramerge.json").is_file():  # it ended before the signal: then whole
        return
    assert process.returncode in (130, -signal.SIGINT)
    assert not out.exists()


def test_debug_tracebacks_never_go_to_stdout_nor_change_the_exit_code(tmp_path):
    """`--debug --json 2>&-`: Python prints a traceback to stdout when stderr is missing; and a stderr whose
    reader went away made the exit code 141 (the traceback's write was taken for stdout's)."""
    args = [sys.executable, "-m", "loramerge_cli", "merge", "--adapters", str(tmp_path / "missing"), "--out",
            str(tmp_path / "m"), "--debug", "--json"]
    env = {**os.environ, "PYTHONPATH": REPO}
    closed = subprocess.run(args, stdout=subprocess.PIPE, env=env, timeout=120, preexec_fn=lambda: os.close(2))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        broken = subprocess.run(args, stdout=subprocess.PIPE, stderr=write_end, env=env, timeout=120)
    finally:
        os.close(write_end)
    assert (closed.returncode, closed.stdout) == (1, b"")
    assert (broken.returncode, broken.stdout) == (1, b"")


@pytest.mark.parametrize("command", ["merge", "apply-mask"])
def test_a_quoted_tilde_in_out_is_the_home_folder_for_the_check_and_the_write(good, tmp_path, monkeypatch, command):
    """`--out '~/mo' --force`: the check looked at $HOME/mo and the writer replaced ./~/mo, a folder of the
    user's that --force must never replace."""
    home = tmp_path / "home"
    home.mkdir()
    mine = tmp_path / "work" / "~" / "mo"
    mine.mkdir(parents=True)
    (mine / "user.txt").write_text("precious\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path / "work")
    extra = ["--indices", "[0]"] if command == "apply-mask" else []
    result = invoke_cli([command, "--adapters", *good, "--out", "~/mo", "--force", *extra])
    assert result.exit_code == 0, result.stderr
    assert (mine / "user.txt").read_text() == "precious\n" and sorted(mine.iterdir()) == [mine / "user.txt"]
    assert (home / "mo").is_dir()


def test_a_quoted_tilde_is_the_home_in_every_path_flag(good, tmp_path, monkeypatch):
    """`~` given quoted or from a recipe is expanded once at parsing, for every path flag (it was for --out
    only: --run-dir and --plot went to ./~, --mask, --tasks, --config and --base were not found)."""
    import typer

    from loramerge_cli.cli.common import path_value, source_value

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert path_value("~/runs/a") == home / "runs" / "a" and source_value("~/base") == str(home / "base")
    with pytest.raises(typer.BadParameter, match="no such user"):
        path_value("~nosuchuser_zz_loramerge/x")
    (home / "r.yaml").write_text(f"adapters:\n  a: {good[0]}\n  b: {good[1]}\nout: ~/merged\n")
    result = invoke_cli(["merge", "--config", "~/r.yaml", "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert (home / "merged" / "adapter_model.safetensors").is_file() and not (tmp_path / "~").exists()
    assert one_line(invoke_cli(["merge", "--adapters", *good, "--out", "~nosuchuser_zz_loramerge/x"]),
                    "no such user", 2) is None


@pytest.mark.parametrize("recipe,word", [
    ("base: [a, b]", "base: a list is not a path or Hub id"), ("adapters: {null: A, b: B}", "None is not a task name"),
    ("adapters: {'a=b': A, b: B}", "'a=b' is not a task name"), ("adapters: null", "Missing option '--adapters'"),
])
def test_recipe_sources_that_no_command_line_gives_are_usage_errors(good, tmp_path, recipe, word):
    path = tmp_path / "r.yaml"
    body = recipe.replace("A", good[0]).replace("B", good[1])
    adapters = "" if recipe.startswith("adapters") else f"adapters: {{a: {good[0]}, b: {good[1]}}}\n"
    path.write_text(f"{adapters}{body}\nout: {tmp_path / 'm'}\n")
    one_line(invoke_cli(["merge", "--config", path]), word, 2)
    assert not (tmp_path / "m").exists()


def test_ctrl_c_after_the_output_is_written_says_so(good, tmp_path):
    """A Ctrl-C while the result is printed said "interrupted; nothing was written" beside a complete output."""
    from loramerge_cli import interrupts
    from loramerge_cli.outputs import staged_folder

    interrupts.set_hint(None)
    with staged_folder(tmp_path / "m") as staging:
        (staging / "adapter_model.safetensors").write_bytes(b"whole")
    assert interrupts.message() == f"interrupted; {tmp_path / 'm'} was written whole before it"
    interrupts.set_hint(None)
    assert interrupts.message() == "interrupted; nothing was written"
