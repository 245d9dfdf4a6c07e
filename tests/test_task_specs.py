"""Task spec YAML and task data: every bad spec is a one-line error naming the file and the field."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from eval_fixtures import build_text_setting, text_rows, write_jsonl, write_tasks_file
from factories import random_adapter

from loramerge_cli.adapters.sources import sha256_file
from loramerge_cli.errors import LoramergeError
from loramerge_cli.evaluation.data import load_examples
from loramerge_cli.evaluation.specs import load_task_file, match_adapters, schema


def spec(tmp_path: Path, rows: list[dict] | None = None, **task_fields) -> dict:
    data = write_jsonl(tmp_path / "rte.jsonl", rows if rows is not None else text_rows(10, seed=1, num_labels=2))
    task = {"name": "rte", "data": {"validation": data.name}, "text": ["premise", "hypothesis"], "label": "label",
            "labels": ["entailment", "not_entailment"]}
    task.update(task_fields)
    return {"model_type": "sequence-classification", "tasks": [task]}


def load_error(tmp_path: Path, content: dict, split: str = "validation") -> str:
    path = write_tasks_file(tmp_path / "tasks.yaml", content)
    with pytest.raises(LoramergeError) as caught:
        task_file = load_task_file(path)
        for task in task_file.tasks:
            load_examples(task_file, task, split)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


def test_valid_spec_loads_with_paths_relative_to_the_file(tmp_path):
    path = write_tasks_file(tmp_path / "tasks.yaml", spec(tmp_path, masked_labels=["not_entailment"], limit=4))
    task_file = load_task_file(path)
    task = task_file.tasks[0]
    assert task_file.model_type == "sequence-classification"
    assert task.data["validation"] == str(tmp_path / "rte.jsonl")
    assert task.masked_labels == [1]  # names are mapped to indices
    examples = load_examples(task_file, task, "validation")
    rows = [json.loads(line) for line in (tmp_path / "rte.jsonl").read_text().splitlines()]
    chosen = [(row["premise"], row["hypothesis"]) for row in rows]
    assert len(examples) == 4 and all(pair in chosen for pair in examples.inputs)
    assert examples.labels == [row["label"] for row in rows if (row["premise"], row["hypothesis"]) in examples.inputs]


def test_names_shorter_than_the_head_mask_the_unnamed_classes(tmp_path):
    """A 2-class task on a 3-wide head: `labels` names classes 0 and 1, class 2 is masked."""
    path = write_tasks_file(tmp_path / "tasks.yaml", spec(tmp_path, num_labels=3))
    task = load_task_file(path).tasks[0]
    assert task.class_count == 3 and task.masked_labels == [2]
    both = load_task_file(write_tasks_file(tmp_path / "both.yaml", spec(tmp_path, num_labels=4, masked_labels=[3])))
    assert both.tasks[0].masked_labels == [3, 2]


def test_check_task_file_reads_every_row_of_the_named_splits(tmp_path):
    from loramerge_cli.evaluation.data import check_task_file

    rows = text_rows(10, seed=1, num_labels=2)
    rows[7]["label"] = "maybe"
    content = spec(tmp_path, rows=rows, limit=2)  # the limit would most likely skip row 7
    content["tasks"][0]["data"]["test"] = str(write_jsonl(tmp_path / "test.jsonl", [{"premise": "w1"}]))
    path = write_tasks_file(tmp_path / "tasks.yaml", content)
    with pytest.raises(LoramergeError, match=r"tasks\[0\]\.label: unknown label name 'maybe'"):
        check_task_file(path, ["validation"])
    rows[7]["label"] = 1
    write_jsonl(tmp_path / "rte.jsonl", rows)
    assert check_task_file(path, ["validation"]).names == ["rte"]
    with pytest.raises(LoramergeError, match=r"tasks\[0\]\.text: column 'hypothesis' not in"):
        check_task_file(path, ["validation", "test"])


@pytest.mark.parametrize(
    "mutate, field, words",
    [
        (lambda s: s["tasks"][0].pop("data"), "tasks[0].data", "required field is missing"),
        (lambda s: s["tasks"][0].update(head=3), "tasks[0].head", "not of type"),
        (lambda s: s["tasks"][0].update(colour="red"), "tasks[0]", "unknown field 'colour'"),
        (lambda s: s.update(model_type="regression"), "model_type", "is not one of"),
        (lambda s: s["tasks"][0].update(masked_labels=["maybe"]), "tasks[0].masked_labels", "unknown label name"),
        (lambda s: s["tasks"][0].update(masked_labels=[2]), "tasks[0].masked_labels", "out of range"),
        (lambda s: s["tasks"][0].update(num_labels=1), "tasks[0].labels", "2 names but num_labels is 1"),
        (lambda s: s["tasks"].append(copy.deepcopy(s["tasks"][0])), "tasks[1].name", "appears twice"),
        (lambda s: s["tasks"][0].update(head="heads/none.safetensors"), "tasks[0].head", "no such file"),
        (lambda s: s["tasks"][0].pop("text"), "tasks[0].text", "required field is missing"),
    ],
)
def test_bad_spec_names_file_and_field(tmp_path, mutate, field, words):
    content = spec(tmp_path)
    mutate(content)
    message = load_error(tmp_path, content)
    assert f": {field}: " in message and words in message


def test_causal_lm_task_without_choices(tmp_path):
    content = spec(tmp_path, prompt="{premise} ? {hypothesis}")
    content["model_type"] = "causal-lm"
    del content["tasks"][0]["text"]
    message = load_error(tmp_path, content)
    assert ": tasks[0].choices: required field is missing (model_type causal-lm)" in message


def test_missing_data_file_and_missing_split(tmp_path):
    content = spec(tmp_path)
    content["tasks"][0]["data"]["test"] = "nowhere/test.jsonl"
    assert "tasks[0].data.test: no such file" in load_error(tmp_path, content, split="test")
    del content["tasks"][0]["data"]["test"]
    assert "tasks[0].data: no 'test' split (has: validation)" in load_error(tmp_path, content, split="test")


def test_empty_split(tmp_path):
    message = load_error(tmp_path, spec(tmp_path, rows=[]))
    assert "tasks[0].data.validation: split is empty" in message


def test_unknown_label_name_and_label_out_of_range(tmp_path):
    rows = text_rows(3, seed=2, num_labels=2)
    rows[1]["label"] = "contradiction"
    assert "tasks[0].label: unknown label name 'contradiction'" in load_error(tmp_path, spec(tmp_path, rows=rows))
    rows[1]["label"] = 5
    assert "tasks[0].label: label 5 is out of range 0..1" in load_error(tmp_path, spec(tmp_path, rows=rows))


def test_missing_text_column(tmp_path):
    message = load_error(tmp_path, spec(tmp_path, text=["premise", "question"]))
    assert "tasks[0].text: column 'question' not in" in message


def test_labels_by_name_and_csv(tmp_path):
    (tmp_path / "rte.csv").write_text("premise,hypothesis,label\nw1 w2,w3,not_entailment\nw4,w5,0\n")
    content = spec(tmp_path)
    content["tasks"][0]["data"] = {"validation": "rte.csv"}
    task_file = load_task_file(write_tasks_file(tmp_path / "tasks.yaml", content))
    examples = load_examples(task_file, task_file.tasks[0], "validation")
    assert examples.inputs == [("w1 w2", "w3"), ("w4", "w5")] and examples.labels == [1, 0]


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)  # the parquet extra is not installed
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    (tmp_path / "rte.parquet").write_bytes(b"PAR1")
    content = spec(tmp_path)
    content["tasks"][0]["data"] = {"validation": "rte.parquet"}
    assert "needs pyarrow" in load_error(tmp_path, content)


def test_subsampling_is_seeded_and_val_limit_overrides_limit(tmp_path):
    content = spec(tmp_path, rows=text_rows(50, seed=3, num_labels=2), limit=20)
    content["tasks"][0]["data"]["test"] = content["tasks"][0]["data"]["validation"]
    task_file = load_task_file(write_tasks_file(tmp_path / "tasks.yaml", content))
    task = task_file.tasks[0]
    first = load_examples(task_file, task, "validation", val_limit=7, seed=0)
    again = load_examples(task_file, task, "validation", val_limit=7, seed=0)
    other = load_examples(task_file, task, "validation", val_limit=7, seed=1)
    assert len(first) == 7 and first.inputs == again.inputs and first.fingerprint == again.fingerprint
    assert other.inputs != first.inputs and other.fingerprint != first.fingerprint
    assert len(load_examples(task_file, task, "test", val_limit=7)) == 20  # --val-limit is for validation only
    assert len(load_examples(task_file, task, "validation")) == 20


def test_image_folder_tree(tmp_path):
    from PIL import Image

    for class_name, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        folder = tmp_path / "images" / "validation" / class_name
        folder.mkdir(parents=True)
        for index in range(2):
            Image.new("RGB", (8, 8), colour).save(folder / f"{index}.png")
    content = {"model_type": "image-classification",
               "tasks": [{"name": "pets", "data": {"validation": "images/validation"}, "labels": ["dog", "cat"]}]}
    task_file = load_task_file(write_tasks_file(tmp_path / "tasks.yaml", content))
    examples = load_examples(task_file, task_file.tasks[0], "validation")
    assert [Path(path).parent.name for path in examples.inputs] == ["cat", "cat", "dog", "dog"]
    assert examples.labels == [1, 1, 0, 0]  # indices in the spec's label names
    rows = [{"picture": "images/validation/cat/0.png", "kind": "cat"}, {"picture": "images/validation/dog/1.png",
                                                                       "kind": 0}]
    write_jsonl(tmp_path / "pets.jsonl", rows)
    column_task = {"name": "pets", "data": {"validation": "pets.jsonl"}, "image": "picture", "label": "kind",
                   "labels": ["dog", "cat"]}
    task_file = load_task_file(write_tasks_file(tmp_path / "columns.yaml", {**content, "tasks": [column_task]}))
    examples = load_examples(task_file, task_file.tasks[0], "validation")
    assert examples.inputs == [str(tmp_path / row["picture"]) for row in rows] and examples.labels == [1, 0]
    content["tasks"][0]["labels"] = ["dog", "bird"]
    assert "tasks[0].labels: unknown label name 'cat'" in load_error(tmp_path, content)


def test_task_without_adapter_and_adapter_path_with_other_weights(tmp_path):
    task_file = load_task_file(write_tasks_file(tmp_path / "tasks.yaml", spec(tmp_path)))
    shapes = {"model.layers.0.self_attn.q_proj": (4, 4)}
    with pytest.raises(LoramergeError, match=r"tasks\[0\]\.name: no adapter named 'rte' \(adapters: mnli\)"):
        match_adapters(task_file, [random_adapter("mnli", shapes)])
    folder = tmp_path / "adapters" / "rte"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "adapter_config.json").write_text("{}")
    content = spec(tmp_path, adapter="adapters/rte")
    task_file = load_task_file(write_tasks_file(tmp_path / "tasks.yaml", content))
    adapter = random_adapter("rte", shapes)
    with pytest.raises(LoramergeError, match=r"tasks\[0\]\.adapter: .* is not the same weights as adapter 'rte'"):
        match_adapters(task_file, [adapter])
    adapter.source.sha256 = sha256_file(folder / "adapter_model.safetensors")
    assert match_adapters(task_file, [adapter]) == {"rte": adapter}


def test_schema_ships_with_the_package():
    assert schema()["$defs"]["task"]["required"] == ["name", "data"]


@pytest.fixture(scope="module")
def text_setting(tmp_path_factory):
    return build_text_setting(tmp_path_factory.mktemp("specs"), task_names=("alpha", "beta"), rows=6)


def test_head_shape_mismatch_is_named(text_setting, tmp_path):
    from safetensors.torch import save_file

    from loramerge_cli.adapters.peft_reader import load_adapters
    from loramerge_cli.evaluation.engine import EvalSettings, Evaluator

    save_file({"base_model.model.score.weight": torch.zeros(3, 8)}, str(tmp_path / "head.safetensors"))
    content = yaml.safe_load(text_setting.tasks_file.read_text())
    content["tasks"][1]["head"] = str(tmp_path / "head.safetensors")
    path = write_tasks_file(tmp_path / "tasks.yaml", content)
    adapters = load_adapters(text_setting.adapter_args())
    with pytest.raises(LoramergeError) as caught:
        Evaluator(load_task_file(path), adapters, EvalSettings(threads=1))
    assert str(caught.value) == f"{path}: tasks[1].head: score.weight is 3×8 but the model's is 3×16"


@pytest.mark.parametrize("command", [
    ["eval"], ["merge", "--lambda", "auto", "--out", "{tmp}/merged"], ["search-mask", "--strategy", "screened",
                                                                       "--out", "{tmp}/mask.json"],
])
def test_spec_and_data_errors_come_before_any_adapter_model_or_torch_loads(tmp_path, command):
    """The adapters and the base model do not even exist: the spec's data error must be the one reported,
    by a process that never imported torch."""
    import os
    import subprocess
    import sys

    rows = text_rows(6, seed=1, num_labels=2)
    rows[4]["label"] = "maybe"
    content = spec(tmp_path, rows=rows)
    content["base_model"] = str(tmp_path / "no-such-base")
    path = write_tasks_file(tmp_path / "tasks.yaml", content)
    arguments = [part.format(tmp=tmp_path) for part in command] + [
        "--adapters", f"rte={tmp_path / 'no-such-adapter'}", "--tasks", str(path)]
    script = ("import atexit, runpy, sys\nsys.argv = ['loramerge'] + sys.argv[1:]\n"  # (the command ends the process)
              "atexit.register(lambda: print('torch' in sys.modules))\n"
              "runpy.run_module('loramerge_cli', run_name='__main__')\n")
    finished = subprocess.run([sys.executable, "-c", script, *arguments], capture_output=True, text=True,
                              check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert (finished.returncode, finished.stdout.split()) == (1, ["False"]), finished.stderr
    assert f"{path}: tasks[0].label: unknown label name 'maybe'" in finished.stderr
