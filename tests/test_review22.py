"""Review of session 22: each test failed before its fix."""

import os
import socket
import subprocess
import sys
import threading

import pytest

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
