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
                          preexec_fn=lambda: signal.signal(number, signal.SIG_IGN if ignored else signal.SIG_DFL))
    # (set either way: a test run under nohup, or from a script's background job, passes its ignored signals on)


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


# --- task data (a hostile review of the evaluation engine's data) ---------------------------------------------

def _image_spec(tmp_path, rows_file: str, task: dict | None = None) -> Path:
    from eval_fixtures import write_tasks_file

    entry = {"name": "shapes", "data": {"validation": rows_file}, "image": "image", "label": "label",
             "num_labels": 3, **(task or {})}
    return write_tasks_file(tmp_path / "tasks.yaml", {"base_model": str(tmp_path / "base"),
                                                      "model_type": "image-classification", "tasks": [entry]})


def _png_bytes(array) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_parquet_files_that_cannot_be_read_are_one_line(tmp_path):
    """A corrupt, empty or text file named .parquet was an internal error (pyarrow's ArrowInvalid)."""
    pytest.importorskip("pyarrow")
    from eval_fixtures import write_tasks_file

    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.evaluation.data import check_task_file

    for content in (b"", b"premise,label\nx,1\n", b"PAR1" + b"\0" * 40):
        (tmp_path / "v.parquet").write_bytes(content)
        spec = write_tasks_file(tmp_path / "tasks.yaml", {
            "base_model": "base", "model_type": "sequence-classification",
            "tasks": [{"name": "a", "data": {"validation": "v.parquet"}, "text": "premise", "label": "label"}]})
        with pytest.raises(LoramergeError, match=r"tasks\[0\]\.data\.validation: .*v\.parquet is not a readable "
                                                 r"parquet file \(") as caught:
            check_task_file(spec)
        assert "\n" not in str(caught.value)


def test_image_bytes_are_decoded_before_the_model_loads_and_name_their_row(tmp_path):
    """Bytes in a parquet listing were not decoded by the check: a corrupt one failed after the model loaded, with
    no row and a memory address (`<_io.BytesIO object at 0x…>`)."""
    pyarrow = pytest.importorskip("pyarrow")
    import numpy as np
    import pyarrow.parquet as parquet

    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.evaluation.data import check_task_file

    good = _png_bytes(np.zeros((8, 8, 3), dtype=np.uint8))
    images = [{"bytes": good, "path": None}, {"bytes": good[:40], "path": None}]
    parquet.write_table(pyarrow.table({"image": images, "label": [0, 1]}), tmp_path / "v.parquet")
    with pytest.raises(LoramergeError, match=r"image bytes in a row of .*v\.parquet: not an image PIL can read "
                                             r"\(\w+\) \(row 2\)$"):
        check_task_file(_image_spec(tmp_path, "v.parquet"))


def test_wide_pixels_are_refused_and_exif_orientation_is_applied(tmp_path):
    """A 16-bit grayscale PNG was scored as a white image (RGB conversion clips it), a float TIFF as a black one;
    a JPEG stored sideways with an EXIF orientation (a phone's portrait photo) was scored sideways, unlike
    transformers' `load_image` and datasets."""
    import numpy as np
    from PIL import Image, ImageOps

    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.evaluation.batches import decoded_image
    from loramerge_cli.evaluation.data import check_task_file

    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(tmp_path / "wide.png")
    (tmp_path / "v.jsonl").write_text('{"image": "wide.png", "label": 0}\n')
    with pytest.raises(LoramergeError, match=r"wide\.png: I;16\w* pixels \(16/32-bit or float\)"):
        check_task_file(_image_spec(tmp_path, "v.jsonl"))
    sideways = Image.fromarray(np.arange(8 * 16 * 3, dtype=np.uint8).reshape(8, 16, 3))
    exif = sideways.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to view
    sideways.save(tmp_path / "photo.jpg", exif=exif)
    decoded = decoded_image(str(tmp_path / "photo.jpg"))
    with Image.open(tmp_path / "photo.jpg") as stored:
        assert stored.size == (16, 8)
        expected = ImageOps.exif_transpose(stored).convert("RGB")
    assert decoded.size == (8, 16) and decoded.tobytes() == expected.tobytes()


def test_a_csv_row_shorter_than_its_header_names_its_line(tmp_path):
    """A short row's missing fields read as None: `label None is neither an index nor a name`."""
    from eval_fixtures import write_tasks_file

    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.evaluation.data import check_task_file

    (tmp_path / "v.csv").write_text("premise,hypothesis,label\nw1,w2,0\nw3,1\n")
    spec = write_tasks_file(tmp_path / "tasks.yaml", {
        "base_model": "base", "model_type": "sequence-classification",
        "tasks": [{"name": "a", "data": {"validation": "v.csv"}, "text": ["premise", "hypothesis"],
                   "label": "label"}]})
    with pytest.raises(LoramergeError, match=r"v\.csv line 3 has 2 fields; the header names 3$"):
        check_task_file(spec)


def test_a_label_past_the_model_s_classes_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """Without `num_labels`, a label past the head's width was found only after the base model had loaded."""
    import yaml
    from eval_fixtures import build_text_setting

    from factories import invoke_cli
    from loramerge_cli.evaluation import engine

    setting = build_text_setting(tmp_path / "s", task_names=("alpha", "beta"), rows=6)
    document = yaml.safe_load(setting.tasks_file.read_text())
    for task in document["tasks"]:
        del task["num_labels"]
    setting.tasks_file.write_text(yaml.safe_dump(document))
    data = Path(document["tasks"][0]["data"]["validation"])
    data.write_text(data.read_text() + '{"premise": "w1", "hypothesis": "w2", "label": 7}\n')

    def no_model(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(engine, "load_base", no_model)
    result = invoke_cli(["eval", "--tasks", setting.tasks_file, "--adapters", *setting.adapter_args(),
                         "--threads", "1"])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().endswith(f"label 7 is out of range 0..2 (a row of {data}; the model has 3 classes)")


@pytest.mark.parametrize("width", [20, 40, 80, 200])
def test_a_narrow_terminal_never_breaks_a_number(width):
    """COLUMNS=40: eval's table folded 43.75 into `43.7` over `5` (read as 43.7); COLUMNS=20: inspect's norms
    became `0.…`. A table keeps every value whole, or turns into one `column: value` line per value."""
    import io
    import re

    from rich.console import Console

    from loramerge_cli.cli.eval_cmd import score_table
    from loramerge_cli.cli.render import Fitting

    tasks = ["first_kind", "last_kind", "after_marker", "majority_kind"]
    scores = [0.4375, 0.125, 1.0, 0.5]
    report = {"split": "validation", "examples": dict.fromkeys(tasks, 128), "tasks": tasks,
              "rows": [{"name": "merged/ties_with_a_long_name", "accuracy": dict(zip(tasks, scores)),
                        "mean_accuracy": 0.515625}]}
    output = io.StringIO()
    Console(file=output, width=width).print(Fitting(score_table(report, "accuracy (%)", "accuracy",
                                                                "mean_accuracy")))
    shown = re.findall(r"\d+(?:\.\d+)?", output.getvalue().replace("(128)", ""))
    assert ["43.75", "12.50", "100.00", "50.00", "51.56"] == [word for word in shown if "." in word]
    assert ("┃" in output.getvalue()) == (width >= 80)


def test_a_field_of_another_model_type_is_refused_even_when_false(tmp_path):
    """`length_normalize: false` on a classifier was accepted without a word (`true` was refused)."""
    from eval_fixtures import write_tasks_file

    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.evaluation.specs import load_task_file

    (tmp_path / "v.jsonl").write_text('{"premise": "w1", "label": 0}\n')
    spec = write_tasks_file(tmp_path / "tasks.yaml", {
        "base_model": "base", "model_type": "sequence-classification",
        "tasks": [{"name": "a", "data": {"validation": "v.jsonl"}, "text": "premise", "label": "label",
                   "length_normalize": False}]})
    with pytest.raises(LoramergeError, match=r"tasks\[0\]\.length_normalize: model_type is sequence-classification"):
        load_task_file(spec)


def test_class_folders_that_do_not_fill_the_head_are_refused_before_the_model_loads(tmp_path, monkeypatch):
    """Folders 1 … 3 of a 4-wide head, without labels or num_labels, were renumbered 0 … 2 without a word (an
    expert's accuracy fell from 0.278 to 0.056 on the reviewer's data)."""
    import numpy as np
    from eval_fixtures import build_vit_classifier, save_peft_adapter, write_tasks_file
    from PIL import Image

    from factories import invoke_cli
    from loramerge_cli.evaluation import engine

    base = build_vit_classifier(tmp_path / "vit", num_labels=4)
    adapter = save_peft_adapter(base, tmp_path / "shapes", ["q_proj", "v_proj"], "ViTForImageClassification", None,
                                seed=1, head_modules=["classifier"])
    for name in ("0", "1", "2", "3"):
        (tmp_path / "images" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "images" / name / "x.png")
    spec = write_tasks_file(tmp_path / "tasks.yaml", {"base_model": str(base), "model_type": "image-classification",
                                                      "tasks": [{"name": "shapes", "data": {"validation": "images"}}]})

    def no_model(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(engine, "load_base", no_model)
    for index_named in (True, False):  # 0 … 2 of a 4-wide head number as they are named; 1 … 3 do not
        ((tmp_path / "images" / "3") if index_named else (tmp_path / "images" / "0")).rename(tmp_path / "aside")
        result = invoke_cli(["eval", "--tasks", spec, "--adapters", f"shapes={adapter}", "--threads", "1"])
        assert result.exit_code == 1, result.output
        if index_named:  # past the check: refused only by the model this test does not load
            assert "the base model was loaded" in result.stderr
        else:
            assert "the classes are the task's 3 class folders in sorted order, but its head has 4 rows: set " \
                   "num_labels: 4" in result.stderr
        (tmp_path / "aside").rename(tmp_path / "images" / ("3" if index_named else "0"))


# --- a hostile review of this session's own changes -------------------------------------------------------------

def test_the_hub_timeout_bounds_requests_to_the_hub_only_and_needs_request_hooks(monkeypatch):
    """The hook on huggingface_hub's shared client cut short a request to another server that asked to wait
    (timeout=None); on a client without request hooks (huggingface_hub 0.x) every Hub source failed. Requests to
    the Hub from any thread are bounded: huggingface_hub's download threads ask for Xet tokens with no timeout."""
    from types import SimpleNamespace
    from urllib.parse import urlsplit

    import huggingface_hub
    from huggingface_hub import constants, get_session

    from loramerge_cli.adapters.sources import hub_requests_time_out

    def waiting_request(host):
        return SimpleNamespace(url=SimpleNamespace(host=host),
                               extensions={"timeout": dict.fromkeys(("connect", "read", "write", "pool"))})

    hub = urlsplit(constants.ENDPOINT).hostname
    with hub_requests_time_out(3):
        bound = get_session().event_hooks["request"][-1]
        here, in_a_thread, elsewhere = waiting_request(hub), waiting_request(hub), waiting_request("example.org")
        thread = threading.Thread(target=bound, args=(in_a_thread,))
        thread.start()
        thread.join()
        bound(here)
        bound(elsewhere)
    assert set(here.extensions["timeout"].values()) == set(in_a_thread.extensions["timeout"].values()) == {3}
    assert set(elsewhere.extensions["timeout"].values()) == {None}
    monkeypatch.setattr(huggingface_hub, "get_session", lambda: SimpleNamespace(hooks={"response": []}))
    with hub_requests_time_out(3):
        pass


def test_a_byte_order_mark_encoding_writes_its_mark_once(tmp_path):
    """Each write was encoded alone: PYTHONIOENCODING=utf-16 put a byte order mark before every table."""
    folders = write_task_folders(tmp_path / "inputs", names=("a", "b"))
    with open(tmp_path / "summary.txt", "wb") as stdout:  # (a file: the stream starts it with the mark)
        done = subprocess.run([sys.executable, "-m", "loramerge_cli", "inspect", str(folders["a"]),
                               str(folders["b"])], stdout=stdout, stderr=subprocess.PIPE, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(REPOSITORY), "PYTHONIOENCODING": "utf-16"})
    assert done.returncode == 0, done.stderr
    written = (tmp_path / "summary.txt").read_bytes()
    assert written.startswith(b"\xff\xfe") and written.count(b"\xff\xfe") == 1
    assert "compatible" in written.decode("utf-16")


def test_debris_of_an_older_version_under_a_long_name_is_cleaned(tmp_path):
    """Names of 101 to about 230 bytes are shortened in hidden siblings now: the staging folder an older version
    left (under the whole name) stayed, and an output a crash left aside was not put back."""
    from loramerge_cli import outputs

    target = tmp_path / ("m" * 150)
    staging = tmp_path / f".{target.name}.loramerge-999999999.x.tmp"
    staging.mkdir()
    aside = tmp_path / f".{target.name}.loramerge-999999998.old"
    aside.mkdir()
    outputs.clean_debris(target)
    assert not staging.exists() and target.is_dir() and not aside.exists()


def test_parquet_rows_python_cannot_hold_are_one_line(tmp_path):
    """A timestamp past year 9999 (in a column no task reads) was an internal error (OverflowError). (Since
    review 31 such a column is left unread, as in JSON Lines; read by a task, it is one line.)"""
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet
    from eval_fixtures import write_tasks_file

    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.evaluation.data import check_task_file

    parquet.write_table(pyarrow.table({"premise": ["w1"], "label": [0],
                                       "when": pyarrow.array([2**62], type=pyarrow.timestamp("us"))}),
                        tmp_path / "v.parquet")
    spec = write_tasks_file(tmp_path / "tasks.yaml", {
        "base_model": "base", "model_type": "sequence-classification",
        "tasks": [{"name": "a", "data": {"validation": "v.parquet"}, "text": "premise", "label": "label"}]})
    check_task_file(spec)
    spec = write_tasks_file(tmp_path / "reads.yaml", {
        "base_model": "base", "model_type": "sequence-classification",
        "tasks": [{"name": "a", "data": {"validation": "v.parquet"}, "text": "when", "label": "label"}]})
    with pytest.raises(LoramergeError, match=r"column 'when' holds a value Python cannot read \("):
        check_task_file(spec)


def test_an_image_a_listing_names_many_times_is_decoded_once_by_the_check(tmp_path, monkeypatch):
    """The check decoded (and turned, and converted) every row's image: 3,000 rows naming one JPEG took twice
    as long to check as before."""
    import numpy as np

    from loramerge_cli.evaluation import batches
    from loramerge_cli.evaluation.data import check_task_file
    from loramerge_cli.evaluation.task_types import image_classification

    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "one.png")
    (tmp_path / "v.jsonl").write_text('{"image": "one.png", "label": 0}\n' * 50)
    image_classification._checked_file.cache_clear()
    decoded = []
    real = batches.decoded_image
    monkeypatch.setattr(batches, "decoded_image", lambda *args, **kwargs: decoded.append(args) or real(*args,
                                                                                                         **kwargs))
    check_task_file(_image_spec(tmp_path, "v.jsonl"))
    assert len(decoded) == 1
    from loramerge_cli.errors import LoramergeError

    stat = (tmp_path / "one.png").stat()  # replaced by a broken file of the same size, its mtime kept (cp -p):
    (tmp_path / "one.png").write_bytes(b"\0" * stat.st_size)  # checked again
    os.utime(tmp_path / "one.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(LoramergeError, match="not an image PIL can read"):
        check_task_file(_image_spec(tmp_path, "v.jsonl"))
