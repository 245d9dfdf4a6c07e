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


def test_search_out_never_replaces_an_input_config(good, tmp_path):
    config = Path(good[0]) / "adapter_config.json"
    before = config.read_bytes()
    result = invoke_cli(["search-mask", "--adapters", *good, "--tasks", tmp_path / "tasks.yaml", "--out", config,
                         "--force"])
    one_line(result, "input")
    assert config.read_bytes() == before


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


def test_search_out_onto_a_folder_is_refused_before_any_work(good, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    result = invoke_cli(["search-mask", "--adapters", *good, "--tasks", tmp_path / "tasks.yaml", "--out", folder,
                         "--force"])
    one_line(result, "not a regular file")


def test_out_dot_and_the_working_folder(good, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", str(work), str(tmp_path)):
        one_line(invoke_cli(["merge", "--adapters", *good, "--out", out, "--force"]), "working folder")
    assert list(work.iterdir()) == []


def test_out_parents_are_checked_before_work(good, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for command in (["merge"], ["search-mask", "--tasks", tmp_path / "tasks.yaml"]):
        result = invoke_cli([*command, "--adapters", *good, "--out", blocker / "sub" / "out.json"])
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


@pytest.mark.parametrize("case", NON_FINITE)
def test_non_finite_output_is_never_written(case, good, tmp_path):
    args, word = NON_FINITE[case](tmp_path, good)
    out = tmp_path / "out"
    one_line(invoke_cli(["merge", *args, "--out", out]), word)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.mark.parametrize("flag", ["--threshold", "--sigma0"])
def test_search_numbers_must_be_finite(good, tmp_path, flag):
    result = invoke_cli(["search-mask", "--adapters", *good, "--tasks", tmp_path / "tasks.yaml", flag, "nan",
                         "--out", tmp_path / "mask.json"])
    one_line(result, flag)


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

    from loramerge_cli import outputs
    from loramerge_cli.masks import WeightTable

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    one_line(invoke_cli(["merge", "--adapters", *good, "--out", tmp_path / "out"]), "no space left")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(outputs, "_commit", full)
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


@pytest.mark.parametrize("delay", [0.4, 1.0, 2.0, 3.5])
def test_ctrl_c_at_any_moment_is_exit_130_and_no_output(good, tmp_path, delay):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "loramerge_cli", "merge", "--adapters", *good, "--out", out],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": REPO})
    time.sleep(delay)
    finished_before = process.poll() is not None
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    if finished_before:  # the machine was faster than the delay: then it must have succeeded whole
        assert process.returncode == 0 and (out / "adapter_model.safetensors").is_file()
        return
    assert process.returncode in (130, -signal.SIGINT), stderr  # -SIGINT: a shell shows 130 too
    assert stderr.strip().splitlines()[-1].startswith("interrupted"), stderr
    assert not out.exists() or (out / "loramerge.json").is_file()
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
        with pytest.raises(LoramergeError, match="worker"):
            for _ in range(50):
                fitness([((index,), None) for index in range(8)])
    finally:
        fitness.close(wait=False)
    assert not any(p.is_alive() for p in fitness.processes)
