"""An interrupt fuzzer's findings (SIGINT, SIGTERM and SIGKILL at random moments): each test failed before its fix."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from factories import write_task_folders

REPOSITORY = Path(__file__).resolve().parents[1]


def _run_driver(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    """`body` run as a script that ends by running the console script's main() (a real process: its exit code
    and the signal handlers are what a shell or a CI runner sees)."""
    driver = tmp_path / "driver.py"
    driver.write_text(f"import atexit, builtins, os, signal, sys\n{body}\nfrom loramerge_cli.cli import main\nmain()\n")
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, env=environment, timeout=300)


def test_a_ctrl_c_while_the_process_ends_exits_130_not_killed_by_the_signal(tmp_path):
    """After the command had printed its result, a Ctrl-C while Python and torch shut down killed the process by
    SIGINT (return code −2 for subprocess and CI runners, nothing said): its handlers were reset to the default."""
    folder = write_task_folders(tmp_path / "inputs", names=("a",))["a"]
    done = _run_driver(tmp_path, "atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))\n"
                                 f"sys.argv = ['loramerge', 'inspect', '--adapters', {str(folder)!r}]")
    assert done.returncode == 130, (done.returncode, done.stderr[-500:])
    assert "Traceback" not in done.stderr and done.stdout  # the result was printed before


def test_a_ctrl_c_before_loramerge_installed_its_handler_is_one_line_and_130(tmp_path):
    """A Ctrl-C while `main` imported its interrupt handling (the first milliseconds) gave a KeyboardInterrupt
    traceback and return code 1 or −2."""
    body = """real_import = builtins.__import__
def interrupting_import(name, *args, **kwargs):
    if name == "loramerge_cli" and "interrupts" in (args[2] if len(args) > 2 else kwargs.get("fromlist")) or ():
        builtins.__import__ = real_import
        os.kill(os.getpid(), signal.SIGINT)
    return real_import(name, *args, **kwargs)
builtins.__import__ = interrupting_import
sys.argv = ['loramerge', '--help']"""
    done = _run_driver(tmp_path, body)
    assert done.returncode == 130, (done.returncode, done.stderr[-500:])
    assert done.stderr == "interrupted; nothing was written\n"


def test_a_ctrl_c_while_merge_force_removes_the_old_output_says_the_new_one_was_written(tmp_path, monkeypatch):
    """`merge --force` swapped the new output in, then removed the old one unshielded, and set its "written"
    hint only after: a Ctrl-C during the removal said "nothing was written" beside the new output."""
    from loramerge_cli import interrupts, outputs

    out = tmp_path / "merged"
    with outputs.staged_folder(out) as staging:
        (staging / "adapter_model.safetensors").write_bytes(b"old")
        (staging / "loramerge.json").write_text("{}")
    removing = outputs.shutil.rmtree

    def interrupted_removal(path, *args, **kwargs):  # the Ctrl-C arrives while the old output is removed
        interrupts._handler(signal.SIGINT, None)
        removing(path, *args, **kwargs)

    monkeypatch.setattr(outputs.shutil, "rmtree", interrupted_removal)
    interrupts.reset()
    try:
        with pytest.raises(KeyboardInterrupt):
            with outputs.staged_folder(out, force=True) as staging:
                (staging / "adapter_model.safetensors").write_bytes(b"new")
                (staging / "loramerge.json").write_text("{}")
        assert interrupts.message() == f"interrupted; {out} was written whole before it"
    finally:
        interrupts.reset()
    assert (out / "adapter_model.safetensors").read_bytes() == b"new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]  # the old one removed all the same


def _table():
    from loramerge_cli.masks import WeightTable

    return WeightTable(tasks=["a", "b"], units=["model.layers.0", "model.layers.1"], weights=[[1.0, 0.0], [1.0, 1.0]])


def test_search_plots_are_written_whole(tmp_path, monkeypatch):
    """`--plot` saved each picture straight into place: a kill while saving left a 0-byte fitness.png, which a
    `--resume` of the finished run kept for good. (Such a file is now refused as no picture loramerge drew:
    test_review31.)"""
    import matplotlib.figure

    from loramerge_cli.search.plots import write_plots

    history = [{"generation": 0, "best_fitness": 1.0, "mean_fitness": 0.5}]
    folder = tmp_path / "plots"
    folder.mkdir()
    paths = write_plots(_table(), history, folder)
    assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in paths)
    saving = matplotlib.figure.Figure.savefig

    def interrupted_save(self, target, *args, **kwargs):  # killed halfway through the picture
        target.write(b"\x89PNG\r\n\x1a\n half") if hasattr(target, "write") else Path(target).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        write_plots(_table(), history, tmp_path / "new")
    assert list((tmp_path / "new").iterdir()) == []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", saving)


@pytest.mark.slow
def test_two_ctrl_c_to_a_search_with_workers_end_it(text_setting, tmp_path):
    """A second Ctrl-C while a `--workers 2` search stopped its workers (they ignore SIGTERM; the parent sent it
    and waited 5 s per worker) left them alive, and the exit then waited on them for ever, ignoring every signal."""
    import time

    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "loramerge_cli", "search-mask", "--adapters", *text_setting.adapter_args(), "--tasks",
         str(text_setting.tasks_file), "--merger", "ta", "--strategy", "enmp", "--popsize", "6", "--generations",
         "200", "--max-prune", "0.5", "--workers", "2", "--threads", "1", "--run-dir", str(run_dir), "--out",
         str(tmp_path / "mask.json"), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY), "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 240
    while not (run_dir / "trajectory.jsonl").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert (run_dir / "trajectory.jsonl").exists(), process.communicate()[1]
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(0.3)
    try:
        os.killpg(process.pid, signal.SIGINT)
    except ProcessLookupError:  # it had already ended
        pass
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("the search did not end after two Ctrl-C")
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted; resume with:"), stderr


def test_ctrl_c_with_more_candidates_queued_than_a_pipe_holds_still_exits(tmp_path):
    """Workers killed with a batch's unsent candidates (over 64 KB) still in the parent's queue: the exit waited
    for ever on the queue's feeder thread, with SIGINT and SIGTERM ignored."""
    (tmp_path / "slow_fitness.py").write_text(
        "import time\n\nclass Build:\n    def __call__(self, device):\n"
        "        def fitness(candidates):\n            time.sleep(0.5)\n            return [0.0 for _ in candidates]\n"
        "        return fitness\n")
    body = """import threading
from slow_fitness import Build
from loramerge_cli import interrupts
import loramerge_cli.cli as cli
from loramerge_cli.search.parallel import ParallelFitness

if __name__ == "__main__":  # (the spawned workers import this file)
    interrupts.install()
    try:
        with ParallelFitness(Build(), ["cpu", "cpu"]) as pool:
            threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
            pool([tuple(range(k, k + 40)) for k in range(3000)])
    except KeyboardInterrupt:
        cli._exit_interrupted()
    sys.exit(3)"""
    driver = tmp_path / "driver.py"
    driver.write_text(f"import os, signal, sys\n{body}\n")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPOSITORY), str(tmp_path)])}  # (the workers too)
    try:
        done = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, env=environment,
                              timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the interrupted process waited for ever on its queue")
    assert done.returncode == 130, done.stderr[-500:]


def test_a_merge_of_adapters_changed_in_memory_is_no_rebuild_of_their_files(folders, tmp_path):
    """`merge --config` of a recipe beside a merge of adapters pruned in memory compared the files' sha256 only,
    and took a merge of the unpruned files for a rebuild of it."""
    from factories import invoke_cli
    from loramerge_cli import api

    adapters = api.load_adapters([f"{name}={folders[name]}" for name in "ab"])
    pruned = api.prune(api.plan_prune(adapters, api.weight_table(adapters, indices="[0]"), tmp_path / "unused"))
    plan = api.plan_merge(pruned, api.MergeConfig(merger="ta"), out=tmp_path / "merged")
    recipe = f"adapters: [a={folders['a']}, b={folders['b']}]\nmerger: ta\n"
    api.write(plan, api.execute(plan), recipe=recipe)
    result = invoke_cli(["merge", "--config", tmp_path / "merged" / "loramerge.yaml", "--out", tmp_path / "again"])
    assert result.exit_code == 0 and "adapter 'a' is not the one" in result.stderr, result.stderr
    assert "adapter 'b'" not in result.stderr


@pytest.mark.parametrize("moment, when", [  # the end-of-run handler in place, or about to be
    ("cli._flush", "True"), ("interrupts.restore", "cli._late_signal in args[0].values()")])
def test_a_ctrl_c_as_the_command_finishes_exits_130(tmp_path, moment, when):
    """A Ctrl-C while `main` flushed the result, before its end-of-run handler was in place, raised through it:
    a chained KeyboardInterrupt traceback and death by SIGINT."""
    folder = write_task_folders(tmp_path / "inputs", names=("a",))["a"]
    body = f"""import loramerge_cli.cli as cli
from loramerge_cli import interrupts
original = {moment}
calls = []
def interrupted(*args):
    if not calls and {when}:
        calls.append(os.kill(os.getpid(), signal.SIGINT))
    return original(*args)
{moment} = interrupted
sys.argv = ['loramerge', 'inspect', '--adapters', {str(folder)!r}]"""
    done = _run_driver(tmp_path, body)
    assert done.returncode == 130 and "Traceback" not in done.stderr, (done.returncode, done.stderr[-500:])
    # (exit 130 said nothing: a script could not tell that the command's work was whole)
    finished = "interrupted as it exited: the command had finished (see above)\n"
    assert moment != "cli._flush" or done.stderr.endswith(finished), done.stderr


def test_a_plot_folder_holding_a_folder_named_like_a_picture_is_refused_before_the_search(text_setting, tmp_path,
                                                                                            monkeypatch):
    """`--plot P --force` with a folder P/fitness.png searched to the end and only then failed to draw."""
    from factories import invoke_cli
    from loramerge_cli.search import runner

    def no_search(*args, **kwargs):
        raise AssertionError("the search ran")

    monkeypatch.setattr(runner, "run_search", no_search)
    (tmp_path / "plots" / "fitness.png").mkdir(parents=True)
    result = invoke_cli(["search-mask", "--adapters", *text_setting.adapter_args(), "--tasks",
                         text_setting.tasks_file, "--out", tmp_path / "mask.json", "--plot", tmp_path / "plots",
                         "--force"])
    assert result.exit_code == 1 and "fitness.png there is not a file" in result.stderr, result.stderr
