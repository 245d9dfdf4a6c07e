"""An eighth hostile review (of main at 0473209): `eval`, task specs and their data, NSC's targets. One test per
defect, each failing on that commit; each docstring says what the user did, what happened and what should
happen."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from eval_fixtures import build_text_setting, write_jsonl, write_tasks_file
from factories import invoke_cli

from loramerge_cli.errors import LoramergeError, UsageError
from loramerge_cli.evaluation.data import check_task_file, load_examples
from loramerge_cli.evaluation.specs import load_task_file


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    return build_text_setting(tmp_path_factory.mktemp("review8"))


def _experts(result) -> dict:
    assert result.exit_code == 0, result.stderr
    return next(row for row in json.loads(result.stdout)["rows"] if row["name"] == "experts")["accuracy"]


def test_the_score_cache_follows_the_adapter_config_and_the_tokenizer(setting, tmp_path):
    """`eval --run-dir runs`, then `lora_alpha` 8 → 64 in every adapter config (or the tokenizer's word ids
    permuted), then the same `eval --run-dir runs`: the experts' cached accuracies came back (0.2917 where a
    fresh run gives 0.25): the key held the weights file's sha256 and the base's weight files only."""
    root = tmp_path / "copy"
    shutil.copytree(setting.root, root)
    spec = (root / "tasks.yaml").read_text().replace(str(setting.root), str(root))
    (root / "tasks.yaml").write_text(spec)
    adapters = [f"{name}={root / 'adapters' / name}" for name in setting.adapters]

    def evaluate(*extra):
        return _experts(invoke_cli(["eval", "--adapters", *adapters, "--tasks", root / "tasks.yaml", "--threads", "1",
                                    "--json", "--allow-base-mismatch", *extra]))  # the spec names the copied base

    evaluate("--run-dir", tmp_path / "runs")
    for name in setting.adapters:
        config_file = root / "adapters" / name / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["lora_alpha"] = config["lora_alpha"] * 8
        config_file.write_text(json.dumps(config))
    assert evaluate("--run-dir", tmp_path / "runs") == evaluate()
    tokenizer = root / "base" / "tokenizer.json"
    data = json.loads(tokenizer.read_text())
    vocab = data["model"]["vocab"]
    words = sorted(word for word in vocab if not word.startswith("["))
    for first, second in zip(words[::2], words[1::2]):
        vocab[first], vocab[second] = vocab[second], vocab[first]
    tokenizer.write_text(json.dumps(data))
    assert evaluate("--run-dir", tmp_path / "runs") == evaluate()


def _image_spec(tmp_path, rows=None, labels=("dog", "cat")) -> Path:
    from PIL import Image

    for class_name, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        folder = tmp_path / "images" / class_name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(2):
            Image.new("RGB", (8, 8), colour).save(folder / f"{index}.png")
    data = "images" if rows is None else str(write_jsonl(tmp_path / "pets.jsonl", rows))
    task = {"name": "pets", "data": {"validation": data}}
    if labels:
        task["labels"] = list(labels)
    return write_tasks_file(tmp_path / "tasks.yaml", {"model_type": "image-classification", "tasks": [task]})


def test_a_hidden_folder_in_an_image_tree_is_no_class(tmp_path):
    """`mkdir val/.ipynb_checkpoints` in a class-folder tree whose spec names no labels: it sorted first and became
    class 0, every label shifted by one, and the expert scored 1 % instead of 90 % (exit 0)."""
    spec = _image_spec(tmp_path, labels=())
    task_file = load_task_file(spec)
    before = load_examples(task_file, task_file.tasks[0], "validation")
    (tmp_path / "images" / ".ipynb_checkpoints").mkdir()
    after = load_examples(task_file, task_file.tasks[0], "validation")
    assert after.labels == before.labels == [0, 0, 1, 1] and after.inputs == before.inputs


@pytest.mark.parametrize("row, message", [
    ({"image": None, "label": 0}, "expected an image path or bytes"),
    ({"image": 7, "label": 0}, "expected an image path or bytes"),
    ({"image": "images/missing.png", "label": 0}, "no such image file"),
    ({"image": "bad.png", "label": 0}, "not an image PIL can read"),
])
def test_image_rows_are_checked_before_any_model_loads(tmp_path, row, message):
    """A null or numeric `image:` value ended in "internal error: AttributeError"; a missing or corrupt file was
    found only after the adapters and the base loaded, naming neither the spec nor the field."""
    (tmp_path / "bad.png").write_bytes(b"not a png")
    spec = _image_spec(tmp_path, rows=[{"image": "images/cat/0.png", "label": 1}, row])
    with pytest.raises(LoramergeError, match=rf"tasks\[0\]\.image: .*{message}"):
        check_task_file(spec, ["validation"])


def test_negative_masked_labels_are_refused(tmp_path, setting):
    """`masked_labels: [-1]` with no `num_labels`: exit 0, class 2 silently masked (Python's index -1); `[-7]`
    ended in "internal error: IndexError"."""
    content = json.loads(json.dumps(__import__("yaml").safe_load(Path(setting.tasks_file).read_text())))
    content["tasks"][0].pop("num_labels", None)
    content["tasks"][0]["masked_labels"] = [-1]
    with pytest.raises(LoramergeError, match=r"masked_labels: label -1 is out of range >= 0"):
        load_task_file(write_tasks_file(tmp_path / "tasks.yaml", content))


def test_the_library_s_eval_protects_the_base_and_data_folders(setting, tmp_path):
    """`api.evaluate(…, run_dir=<the base model folder>)` (or a data folder) wrote scores.json there; the CLI
    refuses both. And a bad row outside the `val_limit` subset was refused by the CLI, not by the library."""
    from loramerge_cli import api
    from loramerge_cli.evaluation.engine import EvalSettings

    experts = api.load_adapters(setting.adapter_args())
    for folder in (setting.base, Path(setting.tasks_file).parent / "data" / "alpha"):
        with pytest.raises(LoramergeError, match="--run-dir .* the input"):
            api.evaluate(setting.tasks_file, experts, [], EvalSettings(threads=1), run_dir=folder)
        assert not (Path(folder) / "scores.json").exists()
    content = __import__("yaml").safe_load(Path(setting.tasks_file).read_text())
    rows = [json.loads(line) for line in Path(content["tasks"][0]["data"]["validation"]).read_text().splitlines()]
    rows[-1]["label"] = "maybe"
    content["tasks"][0]["data"]["validation"] = str(write_jsonl(tmp_path / "bad.jsonl", rows))
    bad = write_tasks_file(tmp_path / "tasks.yaml", content)
    with pytest.raises(LoramergeError, match="unknown label name 'maybe'"):
        api.evaluate(bad, experts, [], EvalSettings(threads=1, val_limit=3))


@pytest.mark.parametrize("name", ["val_limit", "batch_size", "max_length"])
def test_task_data_settings_are_integers(setting, name):
    """`TaskData(tasks, val_limit=2.5)` (or batch_size, max_length) for `--lambda auto`: raw TypeErrors, the
    last two after the model loaded; `val_limit=True` was taken as 1."""
    from loramerge_cli import api

    for value in (2.5, True):
        with pytest.raises(UsageError, match="must be an integer"):
            api.TaskData(setting.tasks_file, **{name: value})


def test_odd_prompts_labels_and_text_values_are_one_line(tmp_path, setting):
    """A causal-LM prompt `{premise.x}` or `{premise[x]}` ended in "internal error: AttributeError/TypeError"; a
    label "²" in "internal error: ValueError" (str.isdigit accepts it); a null text value was scored as the word
    "None" and a list as "['w2']"."""
    import yaml

    content = yaml.safe_load(Path(setting.tasks_file).read_text())
    rows = [{"premise": "w1", "hypothesis": "w2", "label": 0}]
    for bad_row, words in (({"premise": "w1", "hypothesis": "w2", "label": "²"}, "unknown label name '²'"),
                           ({"premise": None, "hypothesis": "w2", "label": 0}, "holds None"),
                           ({"premise": ["w1"], "hypothesis": "w2", "label": 0}, "expected text")):
        content["tasks"][0]["data"]["validation"] = str(write_jsonl(tmp_path / "rows.jsonl", rows + [bad_row]))
        with pytest.raises(LoramergeError, match=words):
            check_task_file(write_tasks_file(tmp_path / "tasks.yaml", content), ["validation"])
    lm = {"model_type": "causal-lm", "tasks": [{"name": "boolq", "data": {"validation": str(tmp_path / "q.jsonl")},
                                                 "prompt": "", "choices": [" no", " yes"], "label": "answer"}]}
    write_jsonl(tmp_path / "q.jsonl", [{"premise": "w1", "hypothesis": "w2", "answer": True}])
    for prompt in ("{premise.x} ?", "{premise[x]} ?"):
        lm["tasks"][0]["prompt"] = prompt
        with pytest.raises(LoramergeError, match=r"tasks\[0\]\.prompt: bad format string"):
            check_task_file(write_tasks_file(tmp_path / "lm.yaml", lm), ["validation"])


def test_boolean_labels_are_classes_0_and_1(tmp_path):
    """BoolQ stores `"answer": true/false`; with `label: answer` and `choices: [" no", " yes"]` (docs/tasks.md's
    own example) it was refused: "label False is neither an index nor a name"."""
    write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "answer": False}, {"question": "q", "answer": True}])
    spec = write_tasks_file(tmp_path / "lm.yaml", {
        "model_type": "causal-lm", "tasks": [{"name": "boolq", "data": {"validation": str(tmp_path / "q.jsonl")},
                                              "prompt": "{question}?", "choices": [" no", " yes"],
                                              "label": "answer"}]})
    task_file = load_task_file(spec)
    assert load_examples(task_file, task_file.tasks[0], "validation").labels == [0, 1]


def test_a_byte_order_mark_is_no_part_of_the_data(tmp_path, setting):
    """An Excel "CSV UTF-8" file starts with a BOM: "column 'premise' not in v.csv" (the first column was named
    '\\ufeffpremise'); a BOM-prefixed jsonl: "line 1 is not JSON"."""
    import yaml

    content = yaml.safe_load(Path(setting.tasks_file).read_text())
    (tmp_path / "v.csv").write_text("\ufeffpremise,hypothesis,label\nw1,w2,0\n", encoding="utf-8")
    (tmp_path / "v.jsonl").write_text('\ufeff{"premise": "w1", "hypothesis": "w2", "label": 0}\n', encoding="utf-8")
    for data in ("v.csv", "v.jsonl"):
        content["tasks"][0]["data"]["validation"] = str(tmp_path / data)
        spec = write_tasks_file(tmp_path / "tasks.yaml", content)
        task_file = load_task_file(spec)
        assert load_examples(task_file, task_file.tasks[0], "validation").inputs == [("w1", "w2")]


def test_a_max_length_with_no_room_for_text_is_refused(setting, tmp_path):
    """`eval --max-length 2` on sentence pairs (the tokenizer adds special tokens) left every input whole (the
    tokenizer only warns) while the report recorded max_length 2."""
    result = invoke_cli(["eval", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file, "--threads",
                         "1", "--max-length", "2"])
    specials = __import__("transformers").AutoTokenizer.from_pretrained(str(setting.base)).num_special_tokens_to_add(
        pair=True)
    if specials >= 2:
        assert result.exit_code == 1 and "leaves no room for text" in result.stderr, result.stderr
    else:  # this tokenizer adds fewer: 2 tokens hold text
        assert result.exit_code == 0, result.stderr


def test_a_target_module_typo_is_refused_before_any_model_loads(setting, tmp_path, monkeypatch):
    """`search-mask --strategy nsc --target-modules v_prj`: the base model loaded first, then "NSC: no targeted
    module"; with `v_proj,o_prj` the typo was silently dropped."""
    from loramerge_cli.evaluation import engine

    def no_model(*args, **kwargs):
        raise AssertionError("the base model was loaded before --target-modules was checked")

    monkeypatch.setattr(engine, "load_base", no_model)
    for modules in ("v_prj", "v_proj,o_prj"):
        result = invoke_cli(["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                             "--strategy", "nsc", "--target-modules", modules, "--threads", "1", "--out",
                             tmp_path / "c.json"])
        assert result.exit_code == 1 and "names no LoRA module" in result.stderr, result.stderr


@pytest.mark.parametrize("flags", [["--strategy", "nsc", "--steps", "2"],
                                   ["--strategy", "random", "--fitness", "nsc", "--budget", "2"]])
def test_a_label_free_search_reads_no_label(setting, tmp_path, flags):
    """`search-mask --strategy nsc` (or `--fitness nsc`, "no labels read") on GLUE-test-style data whose label
    column holds -1: refused, "label -1 is out of range 0..2"; a missing label column: "column 'label' missing in
    a row of {'validation': …, 'test': …}" (the splits, not the file)."""
    import yaml

    content = yaml.safe_load(Path(setting.tasks_file).read_text())
    for task in content["tasks"]:
        rows = [json.loads(line) for line in Path(task["data"]["validation"]).read_text().splitlines()]
        task["data"]["validation"] = str(write_jsonl(tmp_path / f"{task['name']}.jsonl",
                                                     [{**row, "label": -1} for row in rows]))
    spec = write_tasks_file(tmp_path / "tasks.yaml", content)
    result = invoke_cli(["search-mask", "--strategy", "screened",
                         "--adapters", *setting.adapter_args(), "--tasks", spec, "--threads", "1",
                         "--val-limit", "8", *flags, "--out", tmp_path / "t.json"])
    assert result.exit_code == 0, result.stderr
    labelled = invoke_cli(["eval", "--adapters", *setting.adapter_args(), "--tasks", spec, "--threads", "1"])
    assert labelled.exit_code == 1 and "label -1 is out of range" in labelled.stderr  # accuracy needs them
    rows = [{"premise": "w1", "hypothesis": "w2"}]
    content["tasks"][0]["data"]["validation"] = str(write_jsonl(tmp_path / "unlabelled.jsonl", rows))
    missing = write_tasks_file(tmp_path / "missing.yaml", content)
    with pytest.raises(LoramergeError, match=r"column 'label' missing in a row of .*unlabelled\.jsonl"):
        check_task_file(missing, ["validation"])


def test_the_data_fingerprint_follows_the_images_a_listing_names(tmp_path):
    """A jsonl of image paths under `eval --run-dir`: the images swapped for others, the cache still served the
    experts' old scores (0.86 where a fresh run gives 0.02): the fingerprint hashed the listing only."""
    import os

    from PIL import Image

    spec = _image_spec(tmp_path, rows=[{"image": "images/cat/0.png", "label": 1}])
    task_file = load_task_file(spec)
    before = load_examples(task_file, task_file.tasks[0], "validation").fingerprint
    image = tmp_path / "images" / "cat" / "0.png"
    Image.new("RGB", (8, 8), (0, 255, 0)).save(image)
    os.utime(image, ns=(1, 1))  # another time than the first write's
    assert load_examples(task_file, task_file.tasks[0], "validation").fingerprint != before
