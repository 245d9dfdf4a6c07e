"""Review of session 22: each test failed before its fix."""

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from factories import write_task_folders
from hub_cache import MAIN_COMMIT, add_snapshot, set_ref


@pytest.fixture
def silent_hub():
    """An endpoint on loopback that accepts every connection and never answers (a stuck proxy or Hub mirror)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    server.close()


def _inspect_through(endpoint, home, spec):
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DISABLE_TELEMETRY="1")
    return subprocess.run([sys.executable, "-m", "loramerge_cli", "inspect", spec, "--json"], capture_output=True,
                          text=True, env=env, timeout=120, check=False)


def test_a_hub_that_never_answers_is_one_line_after_the_timeout(silent_hub, tmp_path):
    """huggingface_hub asks for the repository's metadata with no timeout: a Hub source waited until Ctrl-C."""
    result = _inspect_through(silent_hub, tmp_path / "hf_home", "org/name")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: org/name: no such local file or folder, and as a Hub id: not in the local Hugging Face cache and "
        "the Hub cannot be reached (offline, or no answer within 2 s: HF_HUB_ETAG_TIMEOUT)"]


def test_a_hub_that_never_answers_falls_back_on_the_cache(silent_hub, tmp_path, llama_task_dirs):
    """The same silent endpoint with the adapter cached: the cached snapshot is used, as offline."""
    repo = tmp_path / "hf_home" / "hub" / "models--org--name"
    add_snapshot(repo, MAIN_COMMIT, llama_task_dirs["rte"], symlinks=True)
    set_ref(repo, "main", MAIN_COMMIT)
    result = _inspect_through(silent_hub, tmp_path / "hf_home", "org/name@main")
    assert result.returncode == 0, result.stderr


def test_the_hub_timeout_leaves_huggingface_hub_s_client_as_it_was():
    from huggingface_hub import get_session

    from loramerge_cli.adapters.sources import hub_requests_time_out

    hooks = list(get_session().event_hooks["request"])
    with hub_requests_time_out(3):
        assert len(get_session().event_hooks["request"]) == len(hooks) + 1
    assert get_session().event_hooks["request"] == hooks


REPOSITORY = Path(__file__).resolve().parents[1]
SIGNALLED_MERGE = """import os, signal, sys
import loramerge_cli.atomic as atomic
real_save = atomic.save_safetensors
def save_signalled(*args, **kwargs):  # the signal arrives while the output is being written
    os.kill(os.getpid(), signal.{name})
    return real_save(*args, **kwargs)
atomic.save_safetensors = save_signalled
sys.argv = ["loramerge", "merge", "--adapters", *{adapters!r}, "--merger", "ta", "--out", {out!r}]
from loramerge_cli.cli import main
main()
"""


def _merge_signalled(tmp_path, name: str, ignored: bool) -> subprocess.CompletedProcess:
    """A merge that receives signal `name` mid-work, in a process whose parent set it to be ignored (`ignored`:
    SIGHUP under nohup, SIGINT for a script's background job) or not."""
    folders = write_task_folders(tmp_path / "inputs", names=("a", "b"))
    driver = tmp_path / "driver.py"
    driver.write_text(SIGNALLED_MERGE.format(name=name, adapters=[str(folders["a"]), str(folders["b"])],
                                             out=str(tmp_path / "merged")))
    number = getattr(signal, name)
    return subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPOSITORY), "HF_HUB_OFFLINE": "1"},
                          preexec_fn=(lambda: signal.signal(number, signal.SIG_IGN)) if ignored else None)


def test_a_hang_up_mid_work_is_handled_as_an_interrupt(tmp_path):
    """SIGHUP (a closed terminal or ssh session) killed the process at once: no line, and the staging folder of
    the output it was writing stayed behind."""
    done = _merge_signalled(tmp_path, "SIGHUP", ignored=False)
    assert done.returncode == 129, (done.returncode, done.stderr[-500:])
    assert done.stderr.strip().splitlines()[-1] == "hung up; nothing was written"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["driver.py", "inputs"]


@pytest.mark.parametrize("name", ["SIGHUP", "SIGINT"])
def test_a_signal_the_parent_ignores_stays_ignored(tmp_path, name):
    """Under `nohup` (SIGHUP ignored) and as a script's background job (SIGINT ignored), loramerge put its own
    handler in place: a closed terminal, or a Ctrl-C meant for the foreground job, ended the work."""
    done = _merge_signalled(tmp_path, name, ignored=True)
    assert done.returncode == 0, (done.returncode, done.stderr[-500:])
    assert (tmp_path / "merged" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("unbuffered", [True, False])
def test_a_large_result_reaches_a_non_blocking_pipe_whole(unbuffered):
    """A pipe set non-blocking by the process that reads it (some CI runners, Node parents) takes 64 KiB per
    write: with PYTHONUNBUFFERED=1 the rest of a --json document was dropped and the exit code was 0; buffered,
    the command failed with "write could not complete without blocking"."""
    import fcntl
    import json

    document = {"values": ["x" * 100] * 3000}  # about 300 kB
    script = 'from loramerge_cli.cli.common import emit_json\nemit_json({"values": ["x" * 100] * 3000})\n'
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETFL, fcntl.fcntl(write_end, fcntl.F_GETFL) | os.O_NONBLOCK)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    process = subprocess.Popen([sys.executable, "-c", script], stdout=write_end, stderr=subprocess.PIPE,
                               env={**env, "PYTHONPATH": str(REPOSITORY)})
    os.close(write_end)
    received = b""
    while chunk := os.read(read_end, 1 << 16):
        received += chunk
    os.close(read_end)
    assert process.wait(timeout=120) == 0, process.stderr.read()
    assert json.loads(received) == document


def test_every_byte_is_written_after_short_writes(monkeypatch):
    from loramerge_cli.cli import common

    real_write = os.write
    monkeypatch.setattr(common.os, "write", lambda descriptor, data: real_write(descriptor, bytes(data[:7])))
    read_end, write_end = os.pipe()
    data = bytes(range(256)) * 40
    common.write_all(write_end, data)
    os.close(write_end)
    received = b""
    while chunk := os.read(read_end, 1 << 16):
        received += chunk
    assert received == data


def test_a_closed_stdout_is_refused_before_the_work(tmp_path):
    """`merge ... >&-` merged and wrote --out, then failed on printing its result: the same CI step run again
    was refused (`--out exists`)."""
    folders = write_task_folders(tmp_path / "inputs", names=("a", "b"))
    process = subprocess.run([sys.executable, "-m", "loramerge_cli", "merge", "--adapters", str(folders["a"]),
                              str(folders["b"]), "--out", str(tmp_path / "merged")], stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(REPOSITORY)}, timeout=120,
                             preexec_fn=lambda: os.close(1))
    assert process.returncode == 1, process.stderr
    assert process.stderr.endswith("error: cannot write to standard output: it is closed (redirect it to a file "
                                   "or /dev/null)\n")
    assert not (tmp_path / "merged").exists()


def test_an_output_name_the_file_system_allows_is_written(tmp_path):
    """A 240-character --out was refused ("File name too long"): the hidden staging folder beside it repeats the
    name, and went past the 255 bytes a name may have."""
    from loramerge_cli import api, atomic, outputs

    folders = write_task_folders(tmp_path / "inputs", names=("a", "b"))
    adapters = api.load_adapters([str(folders["a"]), str(folders["b"])])
    out = tmp_path / ("m" * 240)
    for force in (False, True):
        api.write_merged_adapter(api.merge(adapters), adapters, out, force=force)
        assert (out / "adapter_model.safetensors").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["inputs", out.name]
    long_names = ["m" * 255, "ü" * 127, "m" * 254 + "n"]
    prefixes = [atomic.sibling_prefix(tmp_path / name) for name in long_names]
    assert len(set(prefixes)) == 3 and all(len(os.fsencode(p + "4194304.abcdefgh.tmp")) <= 255 for p in prefixes)
    dead = tmp_path / f"{atomic.sibling_prefix(out)}999999999.x.tmp"  # a killed run's staging: cleaned up
    dead.mkdir()
    outputs.clean_debris(out)
    assert not dead.exists()
