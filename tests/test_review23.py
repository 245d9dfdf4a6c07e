"""Review of session 23: each test failed before its fix."""

import json
import subprocess
import sys

import pytest

from factories import write_task_folders


def _cli(args, cwd, stdin=None):
    return subprocess.run([sys.executable, "-m", "loramerge_cli", *map(str, args)], cwd=cwd, input=stdin,
                          capture_output=True, timeout=300, check=False)


def _table(folders) -> dict:
    from loramerge_cli.adapters.peft_reader import load_adapters
    from loramerge_cli.adapters.units import sorted_units, unit_of

    adapters = load_adapters([f"{name}={folder}" for name, folder in folders.items()])
    units = sorted_units({unit_of(path) for path in adapters[0].modules} - {None})
    weights = [[float((t + u) % 2) for u in range(len(units))] for t in range(len(adapters))]
    return {"format": "loramerge.mask/v1", "tasks": list(folders), "units": units, "weights": weights}


def test_a_table_is_read_from_standard_input_with_mask_dash(tmp_path):
    """`--mask -` (a pipe from `search-mask --json`) was "mask file not found"; `--mask /dev/stdin` recorded
    `--mask ../../../dev/stdin` in the output's command. Both now read the same table as the file, and the
    recorded command names what was given."""
    folders = write_task_folders(tmp_path / "inputs", names=("a", "b"))
    table = json.dumps(_table(folders)).encode()
    (tmp_path / "t.json").write_bytes(table)
    sources = ["--adapters", *(f"{name}={folder}" for name, folder in folders.items())]
    from_file = _cli(["merge", *sources, "--mask", "t.json", "--out", "file", "--json"], tmp_path)
    assert from_file.returncode == 0, from_file.stderr
    for given, out in (("-", "dash"), ("/dev/stdin", "device")):
        piped = _cli(["merge", *sources, "--mask", given, "--out", out, "--json"], tmp_path, stdin=table)
        assert piped.returncode == 0, piped.stderr
        assert (tmp_path / out / "adapter_model.safetensors").read_bytes() == \
            (tmp_path / "file" / "adapter_model.safetensors").read_bytes()
        assert json.loads((tmp_path / out / "mask.json").read_text())["weights"] == _table(folders)["weights"]
        command = json.loads((tmp_path / out / "loramerge.json").read_text())["command"]
        assert f" --mask {given} " in command, command
    pruned = _cli(["apply-mask", *sources, "--mask", "-", "--out", "pruned", "--json"], tmp_path, stdin=table)
    assert pruned.returncode == 0, pruned.stderr
    assert sorted(path.name for path in (tmp_path / "pruned").iterdir() if path.is_dir()) == ["a", "b"]
    for bad, words in ((b"{", "Expecting property name"), (b"\xff", "can't decode byte 0xff")):
        refused = _cli(["merge", *sources, "--mask", "-", "--out", "bad"], tmp_path, stdin=bad)
        assert refused.returncode == 1
        lines = refused.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: standard input: not a readable JSON mask") \
            and words in lines[0], lines
        assert not (tmp_path / "bad").exists()


def test_a_recipe_keeps_dash_as_a_standard_stream(tmp_path):
    """A recipe's `mask: "-"` was read as a file named '-' beside the recipe, and `out: "-"` wrote a folder
    named '-' there (`--out -` on the command line is refused as standard output)."""
    folders = write_task_folders(tmp_path / "inputs", names=("a", "b"))
    table = json.dumps(_table(folders)).encode()
    adapters = "".join(f"  {name}: {folder}\n" for name, folder in folders.items())
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "r.yaml").write_text(f"adapters:\n{adapters}mask: \"-\"\nmerger: ta\n")
    merged = _cli(["merge", "--config", "recipe/r.yaml", "--out", "merged", "--json"], tmp_path, stdin=table)
    assert merged.returncode == 0, merged.stderr
    assert json.loads((tmp_path / "merged" / "mask.json").read_text())["weights"] == _table(folders)["weights"]
    (tmp_path / "recipe" / "out.yaml").write_text(f"adapters:\n{adapters}merger: ta\nout: \"-\"\n")
    refused = _cli(["merge", "--config", "recipe/out.yaml"], tmp_path)
    assert refused.returncode == 2 and b"never standard output" in refused.stderr, refused.stderr
    assert not (tmp_path / "recipe" / "-").exists()


def test_the_fitness_plot_steps_up_at_each_table_that_beat_the_best():
    """The surrogate search's screen is one history record: `--plot` drew "best so far" as one dot at its last
    evaluation, not the step at the evaluation that found the best table."""
    from loramerge_cli.search.plots import fitness_figure

    history = [{"generation": 0, "scores": [0.0, -6.25, 6.25, 0.0], "best_fitness": 6.25, "full_evaluations": 4},
               {"generation": 1, "scores": [1.0, 7.5, 3.0], "best_fitness": 7.5, "full_evaluations": 7}]
    figure = fitness_figure(history, "ta")
    line = next(line for line in figure.axes[0].lines if line.get_label() == "best so far")
    assert list(line.get_xdata()) == [0, 3, 6, 7] and list(line.get_ydata()) == [0.0, 6.25, 7.5, 7.5]
    assert line.get_drawstyle() == "steps-post"


def _name_base(folders, base: str) -> None:
    for folder in folders.values():
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))


def test_no_output_goes_into_a_base_model_without_tasks(tmp_path, hub_cache):
    """`merge` and `apply-mask` protected the base model's folder (local, or a Hub base's cached repository) only
    when a task spec was read: `--out base/merged` wrote into the base named by --base or the adapters' configs."""
    from factories import invoke_cli

    folders = write_task_folders(tmp_path / "inputs", names=("a", "b"))
    (tmp_path / "table.json").write_text(json.dumps(_table(folders)))
    sources = ["--adapters", *(f"{name}={folder}" for name, folder in folders.items())]
    local, other = tmp_path / "base", tmp_path / "other_base"
    for folder in (local, other):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    hub_base = hub_cache.parent / "models--org--base" / "snapshots" / ("c" * 40)
    hub_base.mkdir(parents=True)
    (hub_base / "config.json").write_text("{}")
    for named, into in ((str(local), local / "merged"), ("org/base", hub_base / "merged"),
                        ("org/base", hub_base.parent.parent / "merged")):
        _name_base(folders, named)
        for command in (["merge", *sources, "--merger", "ta"],
                        ["apply-mask", *sources, "--mask", tmp_path / "table.json"]):
            result = invoke_cli([*command, "--out", into])
            assert result.exit_code == 1 and "input" in result.stderr, (command, into, result.stderr)
            assert len(result.stderr.strip().splitlines()) == 1 and not into.exists()
    _name_base(folders, str(local))
    given = invoke_cli(["merge", *sources, "--merger", "ta", "--base", other, "--out", other / "merged"])
    assert given.exit_code == 1 and "input" in given.stderr and not (other / "merged").exists(), given.stderr
    beside = invoke_cli(["merge", *sources, "--merger", "ta", "--base", other, "--out", tmp_path / "merged"])
    assert beside.exit_code == 0, beside.stderr
    _name_base(folders, ".")  # the working folder, which holds no model: it protects nothing
    here = invoke_cli(["merge", *sources, "--merger", "ta", "--out", "merged_here"])
    assert here.exit_code == 0, here.stderr


def test_a_base_folder_spelt_as_a_hub_id_is_warned_before_a_push(tmp_path, monkeypatch):
    """An adapter naming its base `models/base` (a folder here, relative) was pushed naming the Hub repository
    models/base, with no warning: the dry run warned only about absolute or ./ paths."""
    from loramerge_cli.hub import local_paths_warnings

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "models" / "base" / "config.json").write_text("{}")  # a model's folder (transformers loads it first)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "models/base"}))
    assert any("models/base is a folder here, and spelt as a Hub id" in line for line in local_paths_warnings("out"))
    (tmp_path / "out" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base"}))
    assert local_paths_warnings("out") == []


def test_a_ray_address_that_is_no_ray_cluster_is_refused_in_seconds(tmp_path, capfd):
    """`--ray-address HOST:PORT` where a web server (or a silent one) listens passed the check, which only opened a
    connection: the model loaded, then ray.init retried for about 14 minutes with Ray's log lines on stderr, also
    under --json. `:6379` printed Ray's traceback before the error line."""
    import http.server
    import socket
    import threading
    import time

    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.search.ray_backend import probe

    web = http.server.HTTPServer(("0.0.0.0", 0), http.server.SimpleHTTPRequestHandler)  # ray reads 127.0.0.1
    silent = socket.create_server(("0.0.0.0", 0))  # as the node's address: listen on every interface
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        for server, port in ((web, web.server_address[1]), (silent, silent.getsockname()[1])):
            started = time.monotonic()
            with pytest.raises(LoramergeError, match="accepts connections but does not answer as Ray's GCS"):
                probe(f"127.0.0.1:{port}", timeout=2.0)
            assert time.monotonic() - started < 30
    finally:
        web.shutdown()
        silent.close()
    capfd.readouterr()
    with pytest.raises(LoramergeError, match="cannot connect to the Ray cluster at :6379"):
        probe(":6379")
    assert capfd.readouterr().err == ""
    for address in ("local", "host:notaport", "127.0.0.1:99999"):  # (they read "invalid literal for int()")
        with pytest.raises(LoramergeError, match="no port in 1..65535 after the host: give auto, HOST:PORT"):
            probe(address)


def test_a_resume_compares_adapters_by_task_name_and_says_what_was_not_given(tmp_path):
    """`--resume --adapters a/alpha` was refused against the saved `alpha=a/alpha` (the same task and source), and
    a flag the saved run had not given read "but the saved run used None"."""
    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.search.rundir import normal_flags, resumed_flags, write_config

    folders = write_task_folders(tmp_path / "inputs", names=("alpha", "beta"))
    named = [f"{name}={folder}" for name, folder in folders.items()]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_config(run_dir, {}, normal_flags({"adapters": named, "target_modules": None, "seed": 1}), {})
    plain = [str(folder) for folder in folders.values()]
    merged = resumed_flags(run_dir, {"adapters": plain}, {"adapters": plain, "target_modules": None, "seed": 1})
    assert merged["adapters"] == normal_flags({"adapters": named})["adapters"]
    swapped = [f"beta={folders['alpha']}", f"alpha={folders['beta']}"]  # names swapped: another search
    with pytest.raises(LoramergeError, match="--adapters is beta="):
        resumed_flags(run_dir, {"adapters": swapped}, {"adapters": swapped, "target_modules": None, "seed": 1})
    with pytest.raises(LoramergeError, match="--target-modules is q_proj but the saved run did not give it"):
        resumed_flags(run_dir, {"target_modules": "q_proj"}, {"adapters": named, "target_modules": "q_proj",
                                                             "seed": 1})


def test_lora_on_multihead_attention_is_refused_as_such(tmp_path):
    """PEFT's LoRA on nn.MultiheadAttention saves its out_proj's factors under `mha.base_layer.out_proj`: the
    reader dropped `.base_layer` and blamed the config's target_modules; with `mha.out_proj` added there, as the
    message said, the merge wrote `mha.out_proj` factors, which PEFT loads into nothing (the out_proj update lost,
    exit 0). Also the refusals of target_parameters and lora_bias read as English."""
    import torch
    from peft import LoraConfig, get_peft_model

    from loramerge_cli.adapters.peft_reader import load_adapter
    from loramerge_cli.errors import LoramergeError

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=2, lora_alpha=4, target_modules=["mha"]))
    model.save_pretrained(str(tmp_path / "mha"))
    config = json.loads((tmp_path / "mha" / "adapter_config.json").read_text())
    for targets in (["mha"], ["mha", "mha.out_proj"]):
        (tmp_path / "mha" / "adapter_config.json").write_text(json.dumps({**config, "target_modules": targets}))
        with pytest.raises(LoramergeError, match=r"mha\.base_layer\.out_proj\.lora_.*LoRA inside a LoRA-wrapped "
                                                 r"module \(PEFT's LoRA on nn\.MultiheadAttention"):
            load_adapter(str(tmp_path / "mha"))
    for field, words in (("target_parameters", "LoRA on parameters (target_parameters): not supported"),
                         ("lora_bias", "LoRA bias terms (lora_bias): not supported")):
        (tmp_path / "mha" / "adapter_config.json").write_text(json.dumps({**config, field: ["x"]}))
        with pytest.raises(LoramergeError) as refused:
            load_adapter(str(tmp_path / "mha"))
        assert words in str(refused.value)


def test_search_mask_out_with_a_trailing_slash_is_a_usage_error(tmp_path):
    """`search-mask --out runs/new/` wrote the table as a file named `new` (Path drops the slash), exit 0; `eval
    --out` refused it already."""
    from factories import invoke_cli

    result = invoke_cli(["search-mask", "--adapters", tmp_path / "a", "--tasks", tmp_path / "t.yaml",
                         "--out", f"{tmp_path / 'new'}/"])
    assert result.exit_code == 2 and "names a folder: give a file" in result.stderr, result.stderr
    assert not (tmp_path / "new").exists()


def test_more_ray_actors_than_this_machine_has_cpus_is_refused_before_any_work():
    """`--backend ray --workers 99` (a local cluster) scored the experts and started a cluster (16 s) before "the
    workers need 99 CPUs, the Ray cluster has 2"."""
    import os

    from loramerge_cli.errors import UsageError
    from loramerge_cli.search.backends import Backend

    many = ["cpu"] * ((os.cpu_count() or 1) + 1)
    with pytest.raises(UsageError, match=f"{len(many)} Ray actors on the CPU, and the local Ray cluster"):
        Backend("ray", many).check_worker_count("--workers")
    Backend("ray", many, "auto").check_worker_count("--workers")  # another cluster's CPUs: counted when it answers


class SquareBuilder:
    """A worker that needs no model: each item's square (for the pools' result callback)."""

    def __call__(self, device):
        return lambda items: [item * item for item in items]


def test_worker_pools_report_each_result_as_it_arrives():
    """`eval --merged … --workers N` advanced its merged × tasks progress only once every merge was scored (the
    pool returned them all at once): the bar sat at 0 and its ETA meant nothing. The pool now reports each."""
    from loramerge_cli.search.backends import Backend, LazyPool

    arrived = []
    with LazyPool(SquareBuilder(), Backend("process", ["cpu", "cpu"]), "cpu", 1) as pool:
        values = pool([1, 2, 3, 4], lambda index, value: arrived.append((index, value)))
    assert values == [1, 4, 9, 16]
    assert sorted(arrived) == [(0, 1), (1, 4), (2, 9), (3, 16)]


def test_only_a_literal_dash_is_standard_input_and_stream_paths_are_told_apart(tmp_path):
    """(Review of this session's changes.) `--mask ./-` read standard input, not the file named '-'; a terminal on
    standard input waited for typing without a word; an empty or closed one read as a JSON error; every /dev/ path
    (a tmpfs under /dev/shm) was recorded absolute; a table piped through /dev/stdin recorded its task spec as
    /dev/tasks.yaml; a recipe's `out: new/` lost its slash."""
    import os
    import pty

    from loramerge_cli.adapters.card import is_stream_path, portable_path

    folders = write_task_folders(tmp_path / "inputs", names=("a", "b"))
    table = _table(folders)
    sources = ["--adapters", *(f"{name}={folder}" for name, folder in folders.items())]
    (tmp_path / "-").write_text(json.dumps(table))
    from_file = _cli(["merge", *sources, "--mask", "./-", "--out", "file", "--json"], tmp_path, stdin=b"garbage")
    assert from_file.returncode == 0, from_file.stderr
    piped = {**table, "provenance": {"data": {"tasks": "tasks.yaml"}}}
    for given, out in (("-", "dash"), ("/dev/stdin", "device")):
        merged = _cli(["merge", *sources, "--mask", given, "--out", out, "--json"], tmp_path,
                      stdin=json.dumps(piped).encode())
        assert merged.returncode == 0, merged.stderr
        assert json.loads((tmp_path / out / "mask.json").read_text())["provenance"]["data"]["tasks"] == \
            "../tasks.yaml"  # the working folder's, as the folder names it
    for stdin, words in ((b"", "standard input is empty"), (None, "standard input is a terminal")):
        if stdin is None:  # a terminal: the child's standard input is a pty
            controller, terminal = pty.openpty()
            refused = subprocess.run([sys.executable, "-m", "loramerge_cli", "merge", *sources, "--mask", "-",
                                      "--out", "tty"], cwd=tmp_path, stdin=terminal, capture_output=True, timeout=120)
            os.close(controller)
            os.close(terminal)
        else:
            refused = _cli(["merge", *sources, "--mask", "-", "--out", "empty"], tmp_path, stdin=stdin)
        assert refused.returncode == 1 and words in refused.stderr.decode(), refused.stderr
    assert is_stream_path("/dev/stdin") and is_stream_path("/dev/fd/63") and is_stream_path("/proc/self/fd/3")
    assert not is_stream_path("/dev/shm/run/merged")
    assert portable_path("/dev/shm/run/a", "/dev/shm/run/merged") == "../a"
    assert portable_path("/dev/fd/63", "/dev/shm/run/merged") == "/dev/fd/63"


def test_a_recipe_keeps_a_trailing_slash(tmp_path):
    """A recipe's `out: new/` became `DIR/new` (the slash dropped), so search-mask wrote a file named new."""
    from factories import invoke_cli

    (tmp_path / "r.yaml").write_text(f"adapters:\n  a: {tmp_path / 'a'}\ntasks: t.yaml\nout: new/\n")
    result = invoke_cli(["search-mask", "--config", tmp_path / "r.yaml"])
    assert result.exit_code == 2 and "names a folder: give a file" in result.stderr, result.stderr
    assert not (tmp_path / "new").exists()


def test_a_tls_ray_cluster_is_only_connected_to(monkeypatch):
    """With RAY_USE_TLS the GCS speaks TLS first: the HTTP/2 preface check refused such a cluster."""
    import socket

    from loramerge_cli.search.ray_backend import probe

    server = socket.create_server(("0.0.0.0", 0))  # accepts; answers no HTTP/2 preface
    try:
        monkeypatch.setenv("RAY_USE_TLS", "1")
        probe(f"127.0.0.1:{server.getsockname()[1]}", timeout=2.0)
    finally:
        server.close()


def test_hostile_recipes_are_one_line_usage_errors(tmp_path, monkeypatch):
    """(A review of recipes.) A 500-byte alias bomb grew to gigabytes in a scalar flag, a
    self-referencing list printed a traceback, /dev/zero as --config read until memory ran out; `drop-rate` and
    `drop_rate` together let the last win; `path` and `source` of one adapter dropped `source`; --threads 10**20
    overflowed and 100000 ran out of memory."""
    from factories import invoke_cli

    folders = write_task_folders(tmp_path / "inputs", names=("a", "b"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rc").mkdir()
    bomb = "merger: [&l0 [x, x, x, x, x, x, x, x, x]" + "".join(
        f", &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)) + "]\n"
    cases = {
        "bomb.yaml": (f"adapters:\n  a: {folders['a']}\n  b: {folders['b']}\n" + bomb, "a nested list or a mapping"),
        "circle.yaml": (f"adapters:\n  a: {folders['a']}\n  b: {folders['b']}\nindices: &c [*c]\n",
                        "a nested list or a mapping"),
        "twice.yaml": (f"adapters:\n  a: {folders['a']}\n  b: {folders['b']}\nmerger: dare\ndrop-rate: 0.3\n"
                       "drop_rate: 0.4\n", "'drop-rate' and 'drop_rate' are one setting, given twice"),
        "both.yaml": (f"adapters:\n  a: {{path: {folders['a']}, source: {folders['b']}}}\n  b: {folders['b']}\n",
                      "give path or source (one name for it), not both"),
        "threads.yaml": (f"adapters:\n  a: {folders['a']}\n  b: {folders['b']}\nthreads: 100000\n",
                         "less than or equal to 4096"),
    }
    for name, (text, words) in cases.items():
        (tmp_path / "rc" / name).write_text(text)
        result = invoke_cli(["merge", "--config", f"rc/{name}", "--out", tmp_path / name])
        assert result.exit_code == 2, (name, result.exit_code, result.stderr[-500:])
        assert words in result.stderr and len(result.stderr) < 2000, (name, result.stderr[-500:])
        assert not (tmp_path / name).exists()
    (tmp_path / "rc" / "unknown.yaml").write_text(f"adapters:\n  a: {folders['a']}\nfoo: {{a: 1}}\n")
    unknown = invoke_cli(["merge", "--config", "rc/unknown.yaml", "--out", tmp_path / "unknown"])
    assert unknown.exit_code == 2 and "unknown key 'foo'" in unknown.stderr, unknown.stderr
    big = invoke_cli(["merge", "--config", "/dev/zero", "--out", tmp_path / "zero"])
    assert big.exit_code == 1 and "is over 1 MiB: not a recipe" in big.stderr, big.stderr[-500:]
    huge = invoke_cli(["merge", "--threads", "99999999999999999999", "--adapters", folders["a"], "--out", "x"])
    assert huge.exit_code == 2 and "less than or equal to 4096" in huge.stderr, huge.stderr


def test_a_recipe_piped_in_reads_paths_from_the_working_folder(tmp_path):
    """A recipe read from a stream (`--config /dev/stdin`, bash's `<(...)`) resolved its relative paths under /dev
    (`mask: t.json` was /dev/t.json, not found); they are the working folder's, as a table piped in."""
    folders = write_task_folders(tmp_path / "inputs", names=("a", "b"))
    (tmp_path / "t.json").write_text(json.dumps(_table(folders)))
    recipe = b"adapters: [a=inputs/a, b=inputs/b]\nmask: t.json\n"
    merged = _cli(["merge", "--config", "/dev/stdin", "--out", "merged", "--json"], tmp_path, stdin=recipe)
    assert merged.returncode == 0, merged.stderr
    assert json.loads((tmp_path / "merged" / "mask.json").read_text())["weights"] == _table(folders)["weights"]
