"""A ninth round of hostile inputs (of main at 65f6bae). One test per defect, each failing on that commit; each
docstring says what the user did, what happened and what should happen."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from eval_fixtures import build_text_setting, write_jsonl, write_tasks_file
from factories import invoke_cli
from test_hostile_inputs import REPO, one_line

from loramerge_cli.errors import LoramergeError
from loramerge_cli.evaluation.data import check_task_file, load_examples
from loramerge_cli.evaluation.specs import load_task_file


def test_config_given_twice_is_a_usage_error(tmp_path):
    """`merge --config a.yaml --config b.yaml`: the second recipe was used and the first ignored, without a
    word. Two recipes are now a usage error naming the flag, before either is read."""
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(f"out: {tmp_path / 'from_a'}\n")
    second.write_text(f"out: {tmp_path / 'from_b'}\n")
    for args in (["--config", first, "--config", second], [f"--config={first}", "--config", second]):
        one_line(invoke_cli(["merge", *args, "--adapters", "x", "y"]), "given twice", 2)
    assert not (tmp_path / "from_a").exists() and not (tmp_path / "from_b").exists()


@pytest.mark.parametrize("args", [["-h"], ["merge", "--help"], ["search-mask", "-h", "--strategy", "enmp"]])
def test_help_on_a_closed_stdout_says_so(args):
    """`loramerge -h >&-`: exit 0 and not a word (rich writes to nowhere when there is no stdout). The help is
    the product here: one line and exit 1, as any other command whose stdout is closed."""
    process = subprocess.run([sys.executable, "-m", "loramerge_cli", *args], stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": REPO}, timeout=120, preexec_fn=lambda: os.close(1))
    assert (process.returncode, process.stderr) == (1, "error: cannot write to standard output: it is closed\n")


# --- eval and task specs -------------------------------------------------------------------------------------

def _spec(tmp_path, task: dict, model_type: str = "sequence-classification", name: str = "tasks.yaml", **top):
    return write_tasks_file(tmp_path / name, {**top, "model_type": model_type, "tasks": [task]})


def _pair_task(data: Path, **settings) -> dict:
    return {"name": "nli", "data": {"validation": str(data)}, "text": ["premise", "hypothesis"], "label": "label",
            "num_labels": 3, **settings}


def test_a_long_causal_lm_prompt_is_text_not_a_file_name(tmp_path):
    """A BoolQ-style task whose passage is 100 words: `eval`, `merge --lambda auto` and `search-mask` ended in
    "internal error: OSError: [Errno 36] File name too long" (every prompt was tried as an image path for the
    data's fingerprint)."""
    passage = " ".join(f"w{i % 40}" for i in range(100))
    rows = [{"passage": passage, "question": "w1", "answer": index % 2} for index in range(4)]
    spec = _spec(tmp_path, {"name": "yn", "data": {"validation": str(write_jsonl(tmp_path / "v.jsonl", rows))},
                            "prompt": "{passage} {question}", "choices": [" no", " yes"], "label": "answer"},
                 model_type="causal-lm")
    task_file = check_task_file(spec, ["validation"])
    examples = load_examples(task_file, task_file.tasks[0], "validation")
    assert examples.inputs[0] == f"{passage} w1" and examples.labels == [0, 1, 0, 1]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    return build_text_setting(tmp_path_factory.mktemp("review9"), rows=6)


def test_a_token_cap_past_the_model_s_positions_is_one_line(setting, tmp_path):
    """`eval --max-length 300` on a model with 64 positions: "internal error: RuntimeError: The size of tensor a
    (103) must match …" (BERT) or "IndexError: index out of range in self" (GPT-2); a spec's
    `max_length: 10**30` gave "internal error: OverflowError"."""
    from transformers import AutoConfig

    positions = AutoConfig.from_pretrained(str(setting.base)).max_position_embeddings
    result = invoke_cli(["eval", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file, "--threads", "1",
                         "--max-length", str(positions + 1)])
    one_line(result, f"--max-length {positions + 1} is more than the model's {positions} positions", 1)
    data = setting.root / "data" / "alpha" / "validation.jsonl"
    spec = _spec(tmp_path, _pair_task(data, max_length=10**30), base_model=str(setting.base))
    one_line(invoke_cli(["eval", "--adapters", *setting.adapter_args(), "--tasks", spec]), "max_length", 1)
    one_line(invoke_cli(["eval", "--adapters", *setting.adapter_args(), "--tasks", spec, "--max-length", 2**25]),
             "--max-length", 2)


def test_malformed_data_rows_are_one_line(tmp_path):
    """A label of 5,000 digits ("internal error: ValueError: Exceeds the limit") and a row nested 100,000 deep
    ("internal error: RecursionError") were internal errors."""
    for line in ('{"premise": "a", "hypothesis": "b", "label": ' + "9" * 5000 + "}", "[" * 100000):
        (tmp_path / "v.jsonl").write_text(line + "\n")
        with pytest.raises(LoramergeError, match=r"v\.jsonl line 1 is not JSON"):
            check_task_file(_spec(tmp_path, _pair_task(tmp_path / "v.jsonl")))


@pytest.mark.parametrize("text,message", [
    ("premise,premise,hypothesis,label\na,b,c,0\n", "column 'premise' appears twice in the header"),
    ("premise,hypothesis,label\na,b,0,extra\n", "line 2 has 4 fields; the header names 3"),
])
def test_a_csv_that_would_drop_a_value_is_refused(tmp_path, text, message):
    """A header naming a column twice used its last column; a row with a field past the header was read
    without it. Both exited 0."""
    (tmp_path / "v.csv").write_text(text)
    with pytest.raises(LoramergeError, match=message):
        check_task_file(_spec(tmp_path, _pair_task(tmp_path / "v.csv")))


def test_csv_fields_and_labels_read_as_json_s_would(tmp_path):
    """A CSV field over 131,072 characters (a long passage) was "internal error: field larger than field limit";
    labels `1.0` and `True`/`False` (as pandas writes them) were "unknown label name", where JSONL reads
    them."""
    long = " ".join(["w1"] * 50000)
    (tmp_path / "v.csv").write_text(f"premise,hypothesis,label\n{long},b,1.0\na,b,True\na,b,False\na,b,2\n")
    task_file = check_task_file(_spec(tmp_path, _pair_task(tmp_path / "v.csv")))
    examples = load_examples(task_file, task_file.tasks[0], "validation")
    assert examples.labels == [1, 1, 0, 2] and examples.inputs[0] == (long, "b")


@pytest.mark.parametrize("content,message", [
    (b"# caf\xe9\nmodel_type: sequence-classification\n", "not UTF-8 text"),
    (b"tasks:\n  - name: a\n    name: b\n    data: {validation: v.jsonl}\n", "key 'name' appears twice"),
])
def test_a_spec_that_is_not_utf8_or_repeats_a_key_is_one_line(tmp_path, content, message):
    """A latin-1 byte in tasks.yaml was "internal error: UnicodeDecodeError"; a task with two `name:` keys
    silently took the last one."""
    (tmp_path / "tasks.yaml").write_bytes(content)
    with pytest.raises(LoramergeError, match=message):
        load_task_file(tmp_path / "tasks.yaml")


@pytest.mark.parametrize("content,message", [(b"out: caf\xe9\n", "not UTF-8 text"),
                                             (b"out: a\nout: b\n", "key 'out' appears twice")])
def test_a_recipe_that_is_not_utf8_or_repeats_a_key_is_one_line(tmp_path, content, message):
    (tmp_path / "r.yaml").write_bytes(content)
    one_line(invoke_cli(["merge", "--config", tmp_path / "r.yaml"]), message, 1)


@pytest.mark.parametrize("settings,message", [
    ({"num_labels": 2**21, "labels": ["a", "b"]}, "num_labels: 2097152 is greater than the maximum"),
    ({"masked_labels": [0, 1, 2]}, "every one of the 3 classes is masked"),
])
def test_impossible_class_settings_are_refused(tmp_path, settings, message):
    """`num_labels: 10**12` beside two names built a list of every masked class (MemoryError; here 2**21, over the
    limit of 2**20, so that the test fails without a memory error); masking every
    class always predicted class 0 (exit 0)."""
    write_jsonl(tmp_path / "v.jsonl", [{"premise": "a", "hypothesis": "b", "label": 0}])
    with pytest.raises(LoramergeError, match=message):
        load_task_file(_spec(tmp_path, _pair_task(tmp_path / "v.jsonl", **settings)))


def test_two_equal_choices_are_refused(tmp_path):
    """`choices: [" yes", " yes"]`: label 1 could never be predicted (exit 0)."""
    write_jsonl(tmp_path / "v.jsonl", [{"q": "a", "answer": 0}])
    task = {"name": "yn", "data": {"validation": "v.jsonl"}, "prompt": "{q}", "choices": [" yes", " yes"],
            "label": "answer"}
    with pytest.raises(LoramergeError, match="choices: .* has non-unique elements"):
        load_task_file(_spec(tmp_path, task, model_type="causal-lm"))


def test_a_relative_base_model_is_taken_from_the_spec_s_folder(setting, tmp_path):
    """`base_model: ../models/base` in specs/tasks.yaml was looked up from the working folder (its data paths
    from the spec's folder): run from elsewhere, it failed after the adapters loaded, or loaded another model."""
    specs = tmp_path / "specs"
    specs.mkdir()
    shutil.copytree(setting.base, tmp_path / "models" / "base")
    data = write_jsonl(specs / "v.jsonl", [{"premise": "w1", "hypothesis": "w2", "label": 0}])
    spec = _spec(specs, _pair_task(data), base_model="../models/base")
    assert load_task_file(spec).base_model == str(specs / "../models/base")
    hub = _spec(specs, _pair_task(data), name="hub.yaml", base_model="org/name")
    assert load_task_file(hub).base_model == "org/name"
    result = invoke_cli(["eval", "--adapters", f"nli={setting.adapters['alpha']}", "--tasks", spec, "--json"])
    assert result.exit_code == 1 and "differs from the base adapter 'nli' was trained on" in result.stderr  # a copy
    result = invoke_cli(["eval", "--adapters", f"nli={setting.adapters['alpha']}", "--tasks", spec, "--json",
                         "--allow-base-mismatch"])
    assert result.exit_code == 0, result.stderr


def test_a_truncated_image_is_found_before_any_model_loads(tmp_path):
    """Half a PNG passed the check before the model loaded (only its header was read) and failed after it."""
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "images" / name / "0.png")
    whole = (tmp_path / "images" / "dog" / "0.png").read_bytes()
    (tmp_path / "images" / "dog" / "0.png").write_bytes(whole[: len(whole) // 2])
    spec = _spec(tmp_path, {"name": "pets", "data": {"validation": "images"}}, model_type="image-classification")
    with pytest.raises(LoramergeError, match=r"dog/0\.png: not an image PIL can read"):
        check_task_file(spec, ["validation"])


# --- merge --------------------------------------------------------------------------------------------------

def test_a_merged_update_past_float32_is_refused(folders, tmp_path):
    """Factors of ±1e20 are finite but their product is not: `merge --merger ta` wrote the adapter (exit 0) and
    PEFT's forward on it gave NaN logits; `inspect` showed ‖ΔW‖ = 9.2e41."""
    from safetensors.torch import load_file, save_file

    big = tmp_path / "big"
    shutil.copytree(folders["a"], big)
    weights = big / "adapter_model.safetensors"
    save_file({key: value * 1e20 if ".lora_" in key else value for key, value in load_file(weights).items()},
              weights)
    result = invoke_cli(["merge", "--adapters", big, folders["b"], "--merger", "ta", "--out", tmp_path / "m"])
    one_line(result, "beyond the range of float32; nothing written", 1)
    assert not (tmp_path / "m").exists()
    assert invoke_cli(["merge", "--adapters", folders["a"], folders["b"], "--merger", "ta", "--out",
                       tmp_path / "fine"]).exit_code == 0


def test_adapters_naming_one_module_two_ways_are_refused(llama_task_dirs, tmp_path):
    """One adapter trained on the bare LlamaModel (keys `layers.0…`), one on the classifier (`model.layers.0…`):
    `inspect` said "compatible", and `merge` wrote both names as targets; PEFT matches targets by suffix, so it
    loaded only half of the modules, without a word."""
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare"
    shutil.copytree(llama_task_dirs["mnli"], bare)
    weights = bare / "adapter_model.safetensors"
    save_file({key.replace("base_model.model.model.", "base_model.model."): value
               for key, value in load_file(weights).items()}, weights)
    result = invoke_cli(["merge", "--adapters", llama_task_dirs["rte"], bare, "--merger", "ta",
                         "--out", tmp_path / "m"])
    one_line(result, "module model.layers.0.self_attn.q_proj in rte is layers.0.self_attn.q_proj in bare", 1)
    assert not (tmp_path / "m").exists()
    inspected = invoke_cli(["inspect", llama_task_dirs["rte"], bare])
    assert inspected.exit_code == 0 and "merge would refuse: module model.layers.0" in inspected.stdout


def test_an_image_classifier_merge_loads_as_its_card_says(tmp_path):
    """A merge of two ViT classifier adapters (PEFT task type null, `classifier` in modules_to_save): the card's
    snippet loaded the base with AutoModel, which PEFT then refused (no `vit.` prefix), and without --head the
    classifier was left out without a word (the base's untrained one served)."""
    import re

    import torch
    from eval_fixtures import build_vit_classifier, save_peft_adapter
    from safetensors.torch import load_file

    base = build_vit_classifier(tmp_path / "vit")
    folders = [save_peft_adapter(base, tmp_path / name, ["q_proj", "v_proj"], "AutoModelForImageClassification",
                                 None, seed=seed, head_modules=["classifier"]) for name, seed in (("i1", 5), ("i2", 6))]
    result = invoke_cli(["merge", "--adapters", *folders, "--merger", "ties", "--out", tmp_path / "merged"])
    assert result.exit_code == 0 and "note: no --head: the head of task 'i1'" in result.stderr, result.stderr
    card = (tmp_path / "merged" / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "AutoModelForImageClassification.from_pretrained" in snippet
    namespace = {}
    snippet = snippet.replace('"path/to/the/base/model"', repr(str(base)))
    exec(snippet.replace("'merged'", repr(str(tmp_path / "merged"))), namespace)
    served = namespace["model"].base_model.model.classifier.modules_to_save["default"].weight
    head = load_file(folders[0] / "adapter_model.safetensors")["base_model.model.classifier.weight"]
    assert torch.equal(served, head)


def test_a_class_count_that_differs_from_the_head_is_named_before_the_base_loads(setting, tmp_path, monkeypatch):
    """`labels: [entailment, neutral]` without `num_labels` on a 3-row head: after the base loaded, "head:
    score.weight is 3×16 but the model's is 2×16", the 2 from the spec, not from the model."""
    from loramerge_cli.evaluation import engine

    monkeypatch.setattr(engine, "load_base", lambda *args, **kwargs: pytest.fail("the base loaded"))
    data = write_jsonl(tmp_path / "v.jsonl", [{"premise": "w1", "hypothesis": "w2", "label": 1}])
    task = {"name": "alpha", "data": {"validation": str(data)}, "text": ["premise", "hypothesis"],
            "label": "label", "labels": ["entailment", "neutral"]}
    spec = _spec(tmp_path, task, base_model=str(setting.base))
    result = invoke_cli(["eval", "--adapters", f"alpha={setting.adapters['alpha']}", "--tasks", spec])
    one_line(result, "tasks[0].num_labels: the spec gives 2 classes but the task's head has 3 rows; set num_labels: 3")


# --- search-mask ------------------------------------------------------------------------------------------

def test_a_surrogate_budget_below_its_screen_is_a_usage_error_before_any_work(setting, tmp_path, monkeypatch):
    """`search-mask --lambda auto --budget 10` on 24 units × tasks: the experts were scored, the λ grid run and
    the unpruned merge scored before "error: --budget 10 is less than the screen's 24 …", exit 1."""
    from loramerge_cli.evaluation import engine

    monkeypatch.setattr(engine, "load_base", lambda *args, **kwargs: pytest.fail("the base loaded"))
    result = invoke_cli(["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                         "--lambda", "auto", "--budget", "5", "--out", tmp_path / "m.json"])
    one_line(result, "--budget 5 is less than the screen's 6 single-unit tables", 2)


@pytest.mark.parametrize("flags,message", [(["--lr", "inf"], "--lr must be > 0 and at most 1000 (got inf)"),
                                           (["--lr", "1e38"], "--lr must be > 0 and at most 1000"),
                                           (["--init", "1e30"], "--init must be a number from -1000 to 1000")])
def test_nsc_settings_past_any_sane_range_are_usage_errors(setting, tmp_path, flags, message):
    """`--lr inf` (or `--init 1e30`) trained until every activation was NaN, then said "a batch has no
    non-padding token"; `--lr 1e38` was "internal error: RuntimeError" inside AdamW."""
    result = invoke_cli(["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                         "--strategy", "nsc", "--steps", "2", *flags, "--out", tmp_path / "c.json"])
    one_line(result, message, 2)


def test_a_nan_in_a_saved_nsc_state_is_named(tmp_path):
    """A NaN in `nsc_state.safetensors`'s coefficients resumed into "a batch has no non-padding token"."""
    import torch
    from safetensors.torch import save_file

    from loramerge_cli.search.nsc import read_state

    path = tmp_path / "nsc_state.safetensors"
    save_file({"coefficients": torch.tensor([[0.4, float("nan")]])}, str(path),
              metadata={"step": "3", "param_groups": "[]", "history": "[]"})
    with pytest.raises(LoramergeError, match="not a readable NSC state \\(coefficients holds NaN or Inf\\)"):
        read_state(path)


@pytest.mark.parametrize("score", ["NaN", "Infinity", '"1"'])
def test_a_saved_enmp_score_that_is_no_finite_number_is_named(tmp_path, score):
    """A NaN or a string score in ENMP's state.json: "does not match this search (generation 2 asks for a table
    it never scored)", or accepted."""
    from loramerge_cli.search.enmp import STATE_FORMAT, read_state

    path = tmp_path / "state.json"
    path.write_text(f'{{"format": "{STATE_FORMAT}", "generation": 1, "history": [], '
                    f'"memo": [[[], null, 0.0, 0], [[1], null, {score}, 1]]}}')
    with pytest.raises(LoramergeError, match="not a readable search state .*not a finite number"):
        read_state(path)


def test_a_lost_worker_says_how_to_resume(capsys):
    """`--workers 2 --run-dir R`, a worker killed: "error: a search worker died (exit code -9)", while --resume
    would go on from what was scored (the Ctrl-C message says so)."""
    from loramerge_cli import interrupts
    from loramerge_cli.cli.common import command_errors
    from loramerge_cli.errors import WorkerLost

    @command_errors
    def search(debug=False):
        interrupts.set_hint("resume with: loramerge search-mask --run-dir R --resume", resumable=True)
        raise WorkerLost("a search worker died (exit code -9)")

    with pytest.raises(Exception) as raised:
        search()
    interrupts.set_hint(None)
    assert raised.value.exit_code == 1
    assert capsys.readouterr().err == ("error: a search worker died (exit code -9); the run dir keeps what was scored: "
                                       "resume with: loramerge search-mask --run-dir R --resume\n")


def test_a_table_s_units_in_another_order_or_fewer_are_named_so(llama_task_dirs):
    """A mask whose `units` were only reordered (blocks 0 and 1 swapped) said "units differ from the adapters'
    2", which reads as if the units themselves were wrong."""
    from loramerge_cli.api import load_adapters
    from loramerge_cli.masks import WeightTable, check_table

    adapters = load_adapters([f"{name}={path}" for name, path in llama_task_dirs.items()])
    units = ["model.layers.0", "model.layers.1"]
    for listed, message in ((units[::-1], "lists the adapters' 2 units in another order"),
                            (units[:1], "lists 1 of the adapters' 2 units \\(missing: \\['model.layers.1'\\]\\)")):
        table = WeightTable(list(llama_task_dirs), listed, [[1.0] * len(listed) for _ in llama_task_dirs])
        with pytest.raises(LoramergeError, match=message):
            check_table(table, adapters)


def test_a_run_dir_that_is_a_file_is_named_so(tmp_path):
    """`--run-dir notes.txt`: "cannot use it (File exists)"."""
    from loramerge_cli.search.rundir import RunDirLock

    (tmp_path / "notes.txt").write_text("mine\n")
    with pytest.raises(LoramergeError, match="cannot use it \\(a file, not a folder\\)"):
        with RunDirLock(tmp_path / "notes.txt"):
            pass
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


def test_lambda_auto_with_a_table_also_tries_the_table_s_lambda(setting, tmp_path):
    """`merge --mask coeffs.json --lambda auto`: the grid never tried the λ the table sets (4.5 here), which
    `merge --mask` uses without --lambda: "auto" could not be compared with the untuned merge, and could be
    worse than it on validation."""
    import json

    from loramerge_cli.masks import WeightTable

    units = ["model.layers.0", "model.layers.1"]
    WeightTable(list(setting.adapters), units, [[1.0, 1.0] for _ in setting.adapters], scale=4.5).save(
        tmp_path / "t.json")
    result = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--mask", tmp_path / "t.json", "--lambda",
                         "auto", "--tasks", setting.tasks_file, "--threads", "1", "--out", tmp_path / "m"])
    assert result.exit_code == 0, result.stderr
    grid = json.loads((tmp_path / "m" / "loramerge.json").read_text())["lambda_tuning"]["grid"]
    assert [record["stage"] for record in grid if record["lambda"] == 4.5] == ["table"]


# --- PEFT adapter variants ----------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_adapter_whose_init_changed_the_base_is_refused(tmp_path, init):
    """A PiSSA or OLoRA adapter (saved without PEFT's conversion) was read as ΔW = s·B·A, while PEFT subtracts
    the initial B·A from the base: for an untrained PiSSA adapter PEFT's update is 4e-9 and loramerge's was 0.05
    (80 % of the largest base weight); `merge` wrote it without a word."""
    from tiny_models import save_lora

    from loramerge_cli.api import load_adapters

    folder = save_lora("llama", tmp_path / init, 1, r=4, lora_alpha=4, target_modules=["q_proj"],
                       init_lora_weights=init)
    with pytest.raises(LoramergeError, match=f"init_lora_weights='{init}' changes the base model"):
        load_adapters([str(folder)])


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_a_causal_lm_merge_that_leaves_trained_modules_out_says_so(tmp_path):
    """Two CAUSAL_LM adapters with a trained `lm_head` in modules_to_save: the merged adapter served the base's
    lm_head (its weights only in heads/), exit 0 and not a word."""
    import json

    from eval_fixtures import build_gpt2_lm, save_peft_adapter

    base = build_gpt2_lm(tmp_path / "gpt2")
    folders = [save_peft_adapter(base, tmp_path / name, ["c_attn"], "GPT2LMHeadModel", "CAUSAL_LM", seed=seed,
                                 head_modules=["lm_head"], fan_in_fan_out=True) for name, seed in (("a", 1), ("b", 2))]
    result = invoke_cli(["merge", "--adapters", *folders, "--merger", "ta", "--out", tmp_path / "m", "--json"])
    assert result.exit_code == 0, result.stderr
    [warning] = [w for w in json.loads(result.stdout)["warnings"] if "modules_to_save" in w]
    assert warning.startswith("the inputs' modules_to_save weights (lm_head) are not in the merged adapter")
    kept = invoke_cli(["merge", "--adapters", *folders, "--merger", "ta", "--out", tmp_path / "k", "--head", "a",
                       "--json"])
    assert not [w for w in json.loads(kept.stdout)["warnings"] if "modules_to_save" in w]


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_a_bare_file_with_trained_biases_is_refused(tmp_path, bias):
    """A bias="lora_only" (or "all") adapter's .safetensors given alone: its `…q_proj.base_layer.bias` tensors
    (and for "all" every bias) were read as task heads, and the merge wrote modules_to_save entries that
    PeftModel.from_pretrained could not load (KeyError); the same adapter as a folder was refused."""
    from tiny_models import save_lora

    from loramerge_cli.api import load_adapters

    folder = save_lora("vit", tmp_path / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias=bias)
    shutil.copy(folder / "adapter_model.safetensors", tmp_path / "bare.safetensors")
    with pytest.raises(LoramergeError, match="trained biases"):
        load_adapters([str(folder)])
    with pytest.raises(LoramergeError, match="trained biases"):
        load_adapters([str(tmp_path / "bare.safetensors")])


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")
def test_the_evaluator_orients_a_conv1d_update_by_the_module_not_the_config(tmp_path):
    """A GPT-2 adapter whose config says fan_in_fan_out false (PEFT saves the last value it set when the targets mix
    Conv1D and Linear; a bare file has no config): the evaluator added ΔW instead of ΔWᵀ to the square
    `attn.c_proj` (off by 0.6 on an update of 0.5), while PEFT orients by the module's type; and such an adapter
    beside a folder of the same modules was refused ("fan_in_fan_out differs")."""
    import json

    import torch
    from eval_fixtures import build_gpt2_lm, save_peft_adapter
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    from loramerge_cli.api import load_adapters
    from loramerge_cli.evaluation.engine import Evaluator, adapter_deltas

    base = build_gpt2_lm(tmp_path / "gpt2")
    folder = save_peft_adapter(base, tmp_path / "t", ["attn.c_proj"], "GPT2LMHeadModel", "CAUSAL_LM", seed=1,
                               fan_in_fan_out=True)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": False}))
    write_jsonl(tmp_path / "v.jsonl", [{"q": "w1 w2", "answer": 0}, {"q": "w3", "answer": 1}])
    spec = _spec(tmp_path, {"name": "t", "data": {"validation": "v.jsonl"}, "prompt": "{q}",
                            "choices": [" w1", " w2"], "label": "answer"}, model_type="causal-lm", base_model=str(base))
    [adapter] = load_adapters([f"t={folder}"])
    engine = Evaluator(load_task_file(spec), [adapter])
    path = "transformer.h.0.attn.c_proj"
    with torch.no_grad(), engine.apply(adapter_deltas(adapter)):
        evaluated = engine.modules[path].weight.clone()
    reference = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(base)), str(folder)).merge_and_unload()
    assert torch.allclose(evaluated, reference.get_submodule(path).weight, atol=1e-6)
    other = save_peft_adapter(base, tmp_path / "o", ["attn.c_proj"], "GPT2LMHeadModel", "CAUSAL_LM", seed=2,
                              fan_in_fan_out=True)
    assert invoke_cli(["merge", "--adapters", folder, other, "--out", tmp_path / "m"]).exit_code == 0


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_lora_on_a_tied_lm_head_leaves_the_embeddings_alone(tmp_path):
    """LoRA on GPT-2's lm_head, whose weight is wte's: the evaluator wrote W0 + ΔW into the shared tensor, so the
    input embeddings changed too; its logits differed from PEFT's by 10.6, against an adapter effect of 3.1."""
    import torch
    from eval_fixtures import build_gpt2_lm
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2LMHeadModel

    from loramerge_cli.api import load_adapters
    from loramerge_cli.evaluation.engine import Evaluator, adapter_deltas

    base = build_gpt2_lm(tmp_path / "gpt2")
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(str(base)), LoraConfig(
        r=4, lora_alpha=8, target_modules=["lm_head"], init_lora_weights=False))
    folder = tmp_path / "t"
    model.save_pretrained(str(folder), save_embedding_layers=False)
    write_jsonl(tmp_path / "v.jsonl", [{"q": "w1 w2", "answer": 0}])
    spec = _spec(tmp_path, {"name": "t", "data": {"validation": "v.jsonl"}, "prompt": "{q}",
                            "choices": [" w1", " w2"], "label": "answer"}, model_type="causal-lm", base_model=str(base))
    [adapter] = load_adapters([f"t={folder}"])
    engine = Evaluator(load_task_file(spec), [adapter])
    ids = torch.tensor([[5, 9, 12, 7, 30]])
    reference = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(base)), str(folder)).eval()
    with torch.no_grad(), engine.apply(adapter_deltas(adapter)):
        assert torch.allclose(engine.model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)
    with torch.no_grad():
        embeddings = GPT2LMHeadModel.from_pretrained(str(base)).transformer.wte.weight
        assert torch.equal(engine.model.transformer.wte.weight, embeddings)


# --- mergers ------------------------------------------------------------------------------------------------

def test_tsv_of_tasks_that_share_a_lora_factor_is_defined_and_not_empty():
    """Three tasks sharing one A (LoRA-FA, or one init seed): full-space `tsv` differed by 126 % between float32
    and float64 and by 131 % after 1e-9 of noise (the polar factor of dependent columns held whatever directions
    LAPACK returned), and `core` merged to zero (each task kept ⌊2/3⌋ = 0 directions) without a word."""
    import torch
    from dense_reference import tsv as dense_tsv

    from loramerge_cli.merging.lowrank import LowRank
    from loramerge_cli.merging.spectral import tsv

    generator = torch.Generator().manual_seed(0)
    A = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    tasks = [LowRank(torch.randn(8, 2, generator=generator, dtype=torch.float64), A) for _ in range(3)]
    merged = tsv(tasks).dense()
    assert torch.allclose(merged, dense_tsv([task.dense() for task in tasks]), atol=1e-10)
    noisy = tsv([LowRank(task.left, task.right + 1e-9 * torch.randn(2, 6, generator=generator, dtype=torch.float64))
                 for task in tasks]).dense()
    assert torch.allclose(noisy, merged, atol=1e-6)
    single = tsv([LowRank(task.left, task.right) for task in tasks])  # as in the core space: 2 × 2, T = 3
    core = tsv([LowRank(torch.randn(2, 1, generator=generator, dtype=torch.float64),
                        torch.randn(1, 2, generator=generator, dtype=torch.float64)) for _ in range(3)])
    assert float(single.dense().norm()) > 0 and float(core.dense().norm()) > 0


def test_override_with_the_recorded_merger_keeps_the_other_recorded_settings():
    """`merge --mask T --merger ties --override` on a table searched with ties (density 0.5, λ 0.7) dropped every
    recorded setting (density 0.8, λ default), while the documented rule drops them only for another merger or
    method."""
    from loramerge_cli.plan import combined_settings

    recorded = {"merger": "ties", "density": 0.5, "lam": 0.7}
    assert combined_settings({"merger": "ties"}, recorded, override=True) == recorded
    assert combined_settings({"merger": "ta"}, recorded, override=True) == {"merger": "ta"}


# --- the library ----------------------------------------------------------------------------------------------

def test_the_score_cache_follows_an_adapter_changed_in_memory(setting, tmp_path):
    """`api.evaluate(run_dir=…)` on an expert changed by `apply_table` (its source file unchanged) returned the
    cached score of the file's weights (beta 0.1667 where a fresh evaluation gives 0.25)."""
    from loramerge_cli import api

    adapters = api.load_adapters(setting.adapter_args())
    settings = api.EvalSettings(val_limit=6, threads=1)
    table = api.ones_table(adapters)
    table.weights[1] = [-1.0] * len(table.units)  # beta's update negated
    changed = [adapters[0], api.apply_table(adapters[1], table, 1), adapters[2]]

    def experts(report):
        return next(row["accuracy"] for row in report["rows"] if row["name"] == "experts")

    api.evaluate(setting.tasks_file, adapters, [], settings, run_dir=tmp_path / "rd")
    cached = api.evaluate(setting.tasks_file, changed, [], settings, run_dir=tmp_path / "rd")
    assert experts(cached) == experts(api.evaluate(setting.tasks_file, changed, [], settings))


def test_plots_leave_the_caller_s_matplotlib_backend_and_threads_alone(setting, tmp_path):
    """`api.search(plan)` with a plot folder switched the caller's matplotlib backend to Agg (a notebook's
    inline backend lost); `api.evaluate` left torch at min(8, CPUs) threads after the caller had set 1."""
    import matplotlib
    import torch

    from loramerge_cli import api
    from loramerge_cli.masks import WeightTable
    from loramerge_cli.search.plots import write_plots

    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        table = WeightTable(["a", "b"], ["model.layers.0", "model.layers.1"], [[1, 0], [1, 1]])
        write_plots(table, [{"generation": 1, "best_fitness": 1.0, "mean_fitness": 0.5}], tmp_path / "plots")
        assert matplotlib.get_backend() == "pdf" and (tmp_path / "plots" / "mask.png").is_file()
    finally:
        matplotlib.use(before)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        api.evaluate(setting.tasks_file, api.load_adapters(setting.adapter_args()), [],
                     api.EvalSettings(val_limit=2, threads=2))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_library_inputs_of_the_wrong_kind_are_one_line(llama_task_dirs):
    """`NscSettings(target_blocks="11")` measured block 1 (a string read one character at a time);
    `MergeConfig(compute_dtype=torch.int64)` merged with a relative error of 0.95; `load_adapters([Path(…)])` was
    an AttributeError; `plan_search` with no adapters ended in a ZeroDivisionError inside the search."""
    from pathlib import Path

    import torch

    from loramerge_cli import api
    from loramerge_cli.errors import UsageError

    for settings in (api.NscSettings(target_blocks="11"), api.NscSettings(target_modules="v_proj")):
        with pytest.raises(UsageError, match="must be a list of names"):
            settings.check()
    adapters = api.load_adapters([Path(path) for path in llama_task_dirs.values()])
    assert [adapter.name for adapter in adapters] == list(llama_task_dirs)
    for dtype in (torch.int64, torch.float16):
        with pytest.raises(UsageError, match="compute_dtype must be torch.float32 or torch.float64"):
            api.merge(adapters, api.MergeConfig(merger="ties", compute_dtype=dtype))
    with pytest.raises(UsageError, match="no adapters to search"):
        api.plan_search(api.SearchRequest([], api.MergeConfig(), Path("t.yaml"), api.EvalSettings()))


# --- recipes and apply-mask -----------------------------------------------------------------------------------

def test_a_relative_base_is_written_absolute(folders, tmp_path):
    """`merge --base setting/base`: the adapter config said "setting/base", which loads only from the folder the
    command ran in (PEFT then tried the Hub), and the recipe's rebuild wrote "/…/out/../setting/base"."""
    import json
    import os

    os.mkdir("basedir")  # in the test's own working folder
    result = invoke_cli(["merge", "--adapters", folders["a"], folders["b"], "--base", "basedir", "--out",
                         tmp_path / "m"])
    assert result.exit_code == 0, result.stderr
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == os.path.abspath("basedir")
    again = invoke_cli(["merge", "--config", tmp_path / "m" / "loramerge.yaml", "--out", tmp_path / "again"])
    assert again.exit_code == 0, again.stderr
    assert (tmp_path / "again" / "adapter_config.json").read_bytes() == (tmp_path / "m" / "adapter_config.json"
                                                                         ).read_bytes()


@pytest.mark.parametrize("folder", ["é", "-x", ".hidden", "a l"])
def test_a_folder_name_that_cannot_be_a_task_name_is_refused_at_load(folders, tmp_path, folder):
    """An adapter in a folder `é` (or `-x`, `a l`): `merge` wrote an output whose recipe its rebuild refused
    ("'é' is not a task name")."""
    from loramerge_cli.api import load_adapters

    shutil.copytree(folders["a"], tmp_path / folder)
    with pytest.raises(LoramergeError, match="cannot be a task name .*name it, NAME="):
        load_adapters([str(tmp_path / folder)])
    assert load_adapters([f"fine={tmp_path / folder}"])[0].name == "fine"


def test_apply_mask_says_the_lambda_the_pruned_adapters_cannot_carry(folders, tmp_path):
    """An NSC table (scale 1) through apply-mask, then `merge --merger ta` of the pruned adapters: λ 1/3 instead of
    the table's 1 (a relative difference of 0.67 from `merge --mask`), without a word."""
    from loramerge_cli import api

    adapters = api.load_adapters([folders[name] for name in ("a", "b", "c")])
    table = api.ones_table(adapters)
    table.scale = 1.0
    table.save(tmp_path / "t.json")
    result = invoke_cli(["apply-mask", "--adapters", *[folders[name] for name in ("a", "b", "c")], "--mask",
                         tmp_path / "t.json", "--out", tmp_path / "p"])
    assert result.exit_code == 0, result.stderr
    assert "warning: the table sets λ = 1, which the pruned adapters do not carry: merge them with --lambda 1" in \
        result.stderr


def test_a_recipe_run_on_changed_inputs_says_it_is_no_rebuild(folders, tmp_path):
    """`merge --config out/loramerge.yaml` after one input's weights were replaced: exit 0, other weights, not a
    word, although out/loramerge.json beside the recipe records every input's sha256."""
    import json

    inputs = tmp_path / "inputs"
    for name in ("a", "b"):
        shutil.copytree(folders[name], inputs / name)
    assert invoke_cli(["merge", "--adapters", inputs / "a", inputs / "b", "--out", tmp_path / "m"]).exit_code == 0
    same = invoke_cli(["merge", "--config", tmp_path / "m" / "loramerge.yaml", "--out", tmp_path / "same", "--json"])
    assert same.exit_code == 0 and not [w for w in json.loads(same.stdout)["warnings"] if "not a rebuild" in w]
    shutil.rmtree(inputs / "b")
    shutil.copytree(folders["c"], inputs / "b")
    changed = invoke_cli(["merge", "--config", tmp_path / "m" / "loramerge.yaml", "--out", tmp_path / "x", "--json"])
    assert changed.exit_code == 0, changed.stderr
    [warning] = [w for w in json.loads(changed.stdout)["warnings"] if "not a rebuild" in w]
    assert warning.startswith("adapter 'b' is not the one")


def test_inspect_reads_the_inputs_of_any_output_s_recipe(folders, tmp_path):
    """`inspect --config OUT/loramerge.yaml` refused every merge recipe ("unknown key 'merger'"), while its help
    says every output's loramerge.yaml is a recipe."""
    assert invoke_cli(["merge", "--adapters", folders["a"], folders["b"], "--merger", "ties", "--out",
                       tmp_path / "m"]).exit_code == 0
    import json

    result = invoke_cli(["inspect", "--config", tmp_path / "m" / "loramerge.yaml", "--json"])
    assert result.exit_code == 0, result.stderr
    assert [adapter["name"] for adapter in json.loads(result.stdout)["adapters"]] == ["a", "b"]


def test_the_card_says_when_the_merge_did_not_use_the_table_s_lambda(folders, tmp_path):
    """`merge --mask nsc.json --lambda 0.5`: the card said both "λ: 0.5" and "The table sets λ = 1." without
    saying which one the merge used."""
    from loramerge_cli import api

    sources = [folders[name] for name in ("a", "b", "c")]
    table = api.ones_table(api.load_adapters(sources))
    table.scale = 1.0
    table.save(tmp_path / "t.json")
    result = invoke_cli(["merge", "--adapters", *sources, "--mask", tmp_path / "t.json", "--lambda", "0.5",
                         "--out", tmp_path / "m"])
    assert result.exit_code == 0, result.stderr
    assert "The table sets λ = 1; this merge used λ = 0.5 instead." in (tmp_path / "m" / "README.md").read_text()
