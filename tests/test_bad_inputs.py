"""Every bad input: exit code 1, one line on stderr, no traceback, no output folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from factories import attention_shapes, invoke_cli, random_adapter, write_peft_folder, write_task_folders

from loramerge_cli.adapters.peft_reader import load_adapters
from loramerge_cli.masks import ones_table

SHAPES = {**attention_shapes(blocks=3, m=12, n=10), "pooler.dense": (6, 10)}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folders = write_task_folders(tmp_path_factory.mktemp("good"), names=("a", "b"))
    return [str(folders["a"]), str(folders["b"])]


def _adapter(name="x", seed=5, shapes=SHAPES):
    return random_adapter(name, shapes, rank=2, alpha=4.0, seed=seed, dtype=torch.float32)


def _folder(tmp_path, name="x", config_updates=None, extra_tensors=None, adapter=None):
    return str(write_peft_folder(tmp_path / name, adapter or _adapter(name), config_updates, extra_tensors))


def _copy_with_weights(tmp_path, source, weights: bytes):
    folder = tmp_path / "broken"
    shutil.copytree(source, folder)
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return str(folder)


def _mask(tmp_path, good, change):
    table = ones_table(load_adapters(good))
    data = table.to_json()
    change(data)
    path = tmp_path / "mask.json"
    path.write_text(json.dumps(data))
    return ["--mask", str(path)]


def _nan_adapter():
    adapter = _adapter()
    adapter.modules["model.layers.1.self_attn.v_proj"].lora_B[0, 0] = float("nan")
    return adapter


def _inf_adapter():
    adapter = _adapter()
    adapter.modules["pooler.dense"].lora_A[1, 2] = float("inf")
    return adapter


def _pickle_only(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    adapter = _adapter()
    torch.save({f"base_model.model.{p}.lora_A.weight": m.lora_A for p, m in adapter.modules.items()} |
               {f"base_model.model.{p}.lora_B.weight": m.lora_B for p, m in adapter.modules.items()},
               folder / "adapter_model.bin")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    return str(folder)


def _read_only_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return locked / "out"


REFUSED_FIELDS = {
    "use_dora": True, "lora_bias": True, "target_parameters": ["mlp.experts.weight"], "layer_replication": [[0, 2]],
    "trainable_token_indices": [1, 2], "alora_invocation_tokens": [5, 6], "use_qalora": True, "use_bdlora": True,
}
# name -> function(tmp_path, good) returning (merge arguments before --out, word the message must contain)
CASES = {
    "missing path": lambda t, g: (["--adapters", str(t / "nope"), g[1]], "no such file"),
    "folder without adapter files": lambda t, g: (["--adapters", str((t / "empty").mkdir() or t / "empty"), g[1]],
                                                   "adapter_model.safetensors"),
    "truncated safetensors": lambda t, g: (
        ["--adapters", _copy_with_weights(t, g[0], (open(g[0] + "/adapter_model.safetensors", "rb").read()[:900])),
         g[1]], "truncated"),
    "corrupt safetensors": lambda t, g: (["--adapters", _copy_with_weights(t, g[0], os.urandom(3000)), g[1]],
                                         "corrupt"),
    "config rank differs from weights": lambda t, g: (
        ["--adapters", _folder(t, config_updates={"r": 5}), g[1]], "disagree"),
    "different base models": lambda t, g: (
        ["--adapters", _folder(t, config_updates={"base_model_name_or_path": "other/base"}), g[1]],
        "different base models"),
    "shapes differ": lambda t, g: (
        ["--adapters", _folder(t, adapter=_adapter(shapes={**SHAPES, "pooler.dense": (7, 10)})), g[1]],
        "pooler.dense"),
    **{
        f"refused {field}": (lambda field, value: lambda t, g: (
            ["--adapters", _folder(t, config_updates={field: value}), g[1]], field))(field, value)
        for field, value in REFUSED_FIELDS.items()
    },
    "non-LORA peft_type": lambda t, g: (["--adapters", _folder(t, config_updates={"peft_type": "IA3"}), g[1]],
                                        "IA3"),
    "embedding LoRA": lambda t, g: (
        ["--adapters", _folder(t, extra_tensors={
            "base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(2, 50),
            "base_model.model.model.embed_tokens.lora_embedding_B": torch.ones(10, 2)}), g[1]], "embedding"),
    "conv factors": lambda t, g: (
        ["--adapters", _folder(t, extra_tensors={"base_model.model.conv.lora_A.weight": torch.ones(2, 3, 1, 1),
                                                 "base_model.model.conv.lora_B.weight": torch.ones(4, 2, 1, 1)}),
         g[1]], "convolution"),
    "NaN weights": lambda t, g: (["--adapters", _folder(t, adapter=_nan_adapter()), g[1]], "NaN"),
    "Inf weights": lambda t, g: (["--adapters", _folder(t, adapter=_inf_adapter()), g[1]], "Inf"),
    "mask tasks differ": lambda t, g: (
        ["--adapters", *g, *_mask(t, g, lambda d: d.update(tasks=["a", "z"]))], "tasks"),
    "mask units differ": lambda t, g: (
        ["--adapters", *g, *_mask(t, g, lambda d: d.update(units=["model.layers.0", "model.layers.1",
                                                                  "model.layers.7"]))], "units"),
    "mask hash differs": lambda t, g: (
        ["--adapters", *g, *_mask(t, g, lambda d: d["adapters"][1].update(sha256="0" * 64, content_sha256="0" * 64))],
        "sha256"),
    "indices out of range": lambda t, g: (["--adapters", *g, "--indices", "[99]"], "--indices"),
    "pickle without --allow-pickle": lambda t, g: (["--adapters", _pickle_only(t), g[1]], "--allow-pickle"),
    "head without a head": lambda t, g: (["--adapters", *g, "--head", "zzz"], "--head"),
}


# Usage errors (a flag value or combination that cannot work): exit 2, before anything is read. These cases
# exited 1 before issue 12 (the bug: usage errors exited 2 or 1 depending on the flag).
USAGE_CASES = {
    "duplicate names (name=source mends it)": lambda t, g: (["--adapters", g[0], g[0]], "name=source"),
    "unknown method": lambda t, g: (["--adapters", *g, "--merger", "average"], "'average' is not one of"),
    "seed 0": lambda t, g: (["--adapters", *g, "--merger", "dare", "--seed", "0"], "--seed"),
    "lambda auto without tasks": lambda t, g: (["--adapters", *g, "--lambda", "auto"], "--tasks"),
    "lambda not a number": lambda t, g: (["--adapters", *g, "--lambda", "inf"], "--lambda"),
    "lambda abc": lambda t, g: (["--adapters", *g, "--lambda", "abc"], "--lambda"),
    "bad weights": lambda t, g: (["--adapters", *g, "--weights", "1,x"], "--weights"),
    "density out of bounds": lambda t, g: (["--adapters", *g, "--merger", "ties", "--density", "2"], "--density"),
    "unknown space": lambda t, g: (["--adapters", *g, "--space", "diagonal"], "full"),
    "mask and indices": lambda t, g: (["--adapters", *g, "--mask", "m.json", "--indices", "[1]"], "--indices"),
    "val-limit 0": lambda t, g: (["--adapters", *g, "--lambda", "auto", "--tasks", str(t / "tasks.yaml"),
                                  "--val-limit", "0"], "--val-limit"),
    "val-limit -1": lambda t, g: (["--adapters", *g, "--lambda", "auto", "--tasks", str(t / "tasks.yaml"),
                                   "--val-limit", "-1"], "--val-limit"),
    "val-limit -1 without auto": lambda t, g: (["--adapters", *g, "--val-limit", "-1"], "--val-limit"),
}


@pytest.mark.parametrize("case", sorted(USAGE_CASES))
def test_bad_usage_is_exit_2_and_no_output(case, good, tmp_path):
    (tmp_path / "tasks.yaml").write_text("tasks: []\n")
    args, word = USAGE_CASES[case](tmp_path, good)
    out = tmp_path / "out"
    result = invoke_cli(["merge", *args, "--out", out])
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert word.lower() in result.stderr.lower() and "Traceback" not in result.stdout + result.stderr
    _assert_nothing_written(tmp_path, out)


def _assert_one_line_error(result, word: str):
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert word.lower() in result.stderr.lower(), result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def _assert_nothing_written(parent, out):
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_1_and_no_output(case, good, tmp_path):
    args, word = CASES[case](tmp_path, good)
    out = tmp_path / "out"
    _assert_one_line_error(invoke_cli(["merge", *args, "--out", out]), word)
    _assert_nothing_written(tmp_path, out)


def test_base_mismatch_is_allowed_on_request(good, tmp_path):
    other = _folder(tmp_path, config_updates={"base_model_name_or_path": "other/base"})
    result = invoke_cli(["merge", "--adapters", other, good[1], "--allow-base-mismatch", "--out", tmp_path / "out"])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_existing_output_needs_force(good, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    _assert_one_line_error(invoke_cli(["merge", "--adapters", *good, "--out", out]), "--force")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_output_under_a_regular_file(good, tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"
    _assert_one_line_error(invoke_cli(["merge", "--adapters", *good, "--out", out]), "not a folder")
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_under_a_read_only_folder(good, tmp_path):
    out = _read_only_dir(tmp_path)
    _assert_one_line_error(invoke_cli(["merge", "--adapters", *good, "--out", out]), "not writable")
    assert not out.exists()


def test_other_commands_follow_the_same_policy(good, tmp_path):
    _assert_one_line_error(invoke_cli(["inspect", str(tmp_path / "nope")]), "no such file")
    mask = _mask(tmp_path, good, lambda d: d.update(tasks=["a", "z"]))
    out = tmp_path / "pruned"
    _assert_one_line_error(invoke_cli(["apply-mask", "--adapters", *good, *mask, "--out", out]), "tasks")
    assert not out.exists()


def test_unexpected_errors_and_interrupts(good, tmp_path, monkeypatch):
    import loramerge_cli.merging.merge as merge_module

    def boom(*args, **kwargs):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(merge_module, "run_merge", boom)
    result = invoke_cli(["merge", "--adapters", *good, "--out", tmp_path / "out"])
    assert result.exit_code == 1 and result.stderr == "internal error: RuntimeError: kaboom (rerun with --debug)\n"
    debug = invoke_cli(["merge", "--adapters", *good, "--out", tmp_path / "out", "--debug"])
    assert debug.exit_code == 1 and "Traceback" in debug.stderr and "kaboom" in debug.stderr

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_module, "run_merge", interrupted)
    result = invoke_cli(["merge", "--adapters", *good, "--out", tmp_path / "out"])
    assert result.exit_code == 130
    assert not (tmp_path / "out").exists()


def test_bad_usage_exits_2(good, tmp_path):
    assert invoke_cli(["merge", "--adapters", *good]).exit_code == 2  # no --out
    assert invoke_cli(["merge", "--adapters", *good, "--out", tmp_path / "o", "--dtype", "int8"]).exit_code == 2
    both = invoke_cli(["merge", "--adapters", *good, "--out", tmp_path / "o", "--mask", "m.json", "--indices", "[1]"])
    assert both.exit_code == 2


def test_real_process_exit_codes_and_no_traceback(good, tmp_path):
    """The installed entry point, in a subprocess: real exit codes, one line, no traceback."""
    command = [sys.executable, "-m", "loramerge_cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    missing = subprocess.run([*command, "merge", "--adapters", str(tmp_path / "nope"), good[1], "--out",
                              str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and missing.stderr.startswith("error: ")
    seed = subprocess.run([*command, "merge", "--adapters", *good, "--seed", "0", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env)
    assert seed.returncode == 2 and "Traceback" not in seed.stderr and seed.stderr.count("\n") == 1
    usage = subprocess.run([*command, "merge", "--bogus"], capture_output=True, text=True, env=env)
    assert usage.returncode == 2
    assert not (tmp_path / "out").exists()


class _RunsCode:
    """Unpickling this calls `Path.touch` on a marker file: code from the file, which must never run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        from pathlib import Path

        return Path.touch, (Path(self.marker),)


def test_allow_pickle_uses_the_restricted_unpickler_and_never_runs_code_from_the_file(tmp_path):
    import pickle

    folder = tmp_path / "hostile"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    hostile = {"base_model.model.x.lora_A.weight": _RunsCode(marker)}
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(hostile, protocol=2))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    result = invoke_cli(["inspect", str(folder), "--allow-pickle"])
    assert result.exit_code == 1 and "cannot read pickle file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()
    assert load_adapters([_pickle_only(tmp_path)], allow_pickle=True)[0].modules  # a plain state dict still loads
