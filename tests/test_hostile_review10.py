"""A tenth round of hostile inputs (of main at 11876b9). One test per defect, each failing on that commit; each
docstring says what the user did, what happened and what should happen."""

from __future__ import annotations

import json
import warnings

import pytest
from eval_fixtures import build_gpt2_lm, write_jsonl, write_tasks_file
from factories import invoke_cli
from test_hostile_inputs import one_line

TIED = "ignore:Model has `tie_word_embeddings=True`"


def _lm_head_adapters(tmp_path, seeds=(1, 2)):
    """GPT-2 adapters on lm_head and c_attn, saved as PEFT saves them by default: `save_embedding_layers="auto"`
    writes lm_head's base weight beside the factors (`lm_head.base_layer.weight`)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    base = build_gpt2_lm(tmp_path / "gpt2")
    folders = []
    for index, seed in enumerate(seeds):
        torch.manual_seed(seed)
        model = get_peft_model(GPT2LMHeadModel.from_pretrained(str(base)), LoraConfig(
            r=4, lora_alpha=8, target_modules=["lm_head", "c_attn"], init_lora_weights=False))
        folder = tmp_path / "ab"[index]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(str(folder))
        folders.append(folder)
    return base, folders


@pytest.mark.filterwarnings(TIED)
def test_saved_embedding_layers_are_base_weights_not_heads(tmp_path):
    """LoRA on lm_head, saved with PEFT's defaults: `inspect` listed `lm_head.base_layer` as a head, `merge` wrote
    `modules_to_save: ["lm_head.base_layer"]` (PEFT wrapped the LoRA layer's base in a ModulesToSaveWrapper) and
    `eval` refused ("lm_head.base_layer.weight is not a parameter of the base model"). They are a copy of the
    base's lm_head: carried into the merge as PEFT saved them, no head, and eval scores the adapter."""
    import torch
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    base, (a, b) = _lm_head_adapters(tmp_path)
    report = json.loads(invoke_cli(["inspect", a, b, "--json"]).stdout)
    assert [summary["heads"] for summary in report["adapters"]] == [[], []]
    out = tmp_path / "m"
    assert invoke_cli(["merge", "--adapters", a, b, "--out", out]).exit_code == 0
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] is None
    assert not (out / "heads").exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(base)), str(out)).eval()
    assert not [w for w in caught if "key" in str(w.message).lower()]
    reference = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(base)), str(a), adapter_name="a")
    reference.load_adapter(str(b), adapter_name="b")
    reference.add_weighted_adapter(["a", "b"], [0.5, 0.5], "ta", combination_type="cat")  # ta: λ 1/2, weights 1
    reference.set_adapter("ta")
    ids = torch.tensor([[5, 9, 12, 7, 30]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, reference.eval()(input_ids=ids).logits, atol=1e-5)

    write_jsonl(tmp_path / "v.jsonl", [{"q": "w1 w2", "answer": 0}, {"q": "w2 w3", "answer": 1}])
    spec = write_tasks_file(tmp_path / "tasks.yaml", {"model_type": "causal-lm", "base_model": str(base), "tasks": [
        {"name": name, "data": {"validation": "v.jsonl"}, "prompt": "{q}", "choices": [" w1", " w2"],
         "label": "answer"} for name in ("a", "b")]})
    result = invoke_cli(["eval", "--tasks", spec, "--adapters", a, b, "--merged", out, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dtype"] == "float32"  # the report says which dtype its accuracies are of


@pytest.mark.filterwarnings(TIED)
def test_different_saved_base_weights_are_refused(tmp_path):
    """Two adapters saved with different lm_head base weights (a resized or retrained vocabulary): merge wrote the
    first one's as a "head" without a word. One merged adapter can carry one copy: refused before any work, and
    eval refuses a copy that is not the base's own (its scores would describe another model)."""
    from safetensors.torch import load_file, save_file

    base, (a, b) = _lm_head_adapters(tmp_path)
    weights = b / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.model.lm_head.base_layer.weight"] = tensors["base_model.model.lm_head.base_layer.weight"] + 1
    save_file(tensors, str(weights))
    one_line(invoke_cli(["merge", "--adapters", a, b, "--out", tmp_path / "m"]),
             "the saved base weight lm_head.weight differs")
    assert not (tmp_path / "m").exists()
    write_jsonl(tmp_path / "v.jsonl", [{"q": "w1 w2", "answer": 0}])
    spec = write_tasks_file(tmp_path / "tasks.yaml", {"model_type": "causal-lm", "base_model": str(base), "tasks": [
        {"name": "b", "data": {"validation": "v.jsonl"}, "prompt": "{q}", "choices": [" w1", " w2"],
         "label": "answer"}]})
    one_line(invoke_cli(["eval", "--tasks", spec, "--adapters", b]), "carries its own lm_head.weight")
    tensors["base_model.model.lm_head.base_layer.weight"][0, 0] = float("nan")  # a damaged copy: refused on reading
    save_file(tensors, str(weights))
    one_line(invoke_cli(["inspect", b]), "lm_head.base_layer.weight has NaN or Inf values")


def test_a_token_cap_without_room_for_text_is_refused_before_the_base_loads(tmp_path):
    """`eval --max-length 3` on a tokenizer that adds 3 special tokens: refused, but only after the base model's
    weights had loaded (minutes for a large model). It needs the tokenizer and the config alone: refused first
    (here the weights are truncated, so a check after loading would report them instead)."""
    from eval_fixtures import build_text_setting

    setting = build_text_setting(tmp_path / "s")
    weights = setting.base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    args = ["eval", "--tasks", setting.tasks_file, "--adapters", *setting.adapters.values()]
    one_line(invoke_cli([*args, "--max-length", "3"]), "max_length 3 leaves no room for text")
    one_line(invoke_cli([*args, "--max-length", "4096"]), "more than the model's")
    one_line(invoke_cli(args), "cannot load the base model")


# --- dtypes ---------------------------------------------------------------------------------------------------

def _scaled_copies(setting, root, factor: float) -> dict:
    """The setting's adapters with lora_B × factor (every weight W0 + ΔW still finite in float16)."""
    import shutil

    from safetensors.torch import load_file, save_file

    folders = {}
    for name, folder in setting.adapters.items():
        copy = shutil.copytree(folder, root / name)
        tensors = load_file(str(copy / "adapter_model.safetensors"))
        save_file({key: value * factor if "lora_B" in key else value for key, value in tensors.items()},
                  str(copy / "adapter_model.safetensors"))
        folders[name] = copy
    return folders


def test_non_finite_outputs_are_refused_not_scored(tmp_path):
    """`eval --dtype float16` on adapters whose activations overflow float16 (weights finite): every logit was
    NaN, argmax read NaN as the largest, and eval reported each task's share of label 0 as its accuracy, exit 0
    and no warning (search-mask optimised those numbers). Refused in one line naming the task and dtype."""
    from eval_fixtures import build_text_setting

    setting = build_text_setting(tmp_path / "s", rows=16)
    hot = _scaled_copies(setting, tmp_path, 6000.0)
    result = invoke_cli(["eval", "--tasks", setting.tasks_file, "--adapters",
                         *[f"{name}={folder}" for name, folder in hot.items()], "--dtype", "float16"])
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: task alpha: the model's outputs are NaN or Inf on 16 "
                                                     "of 16 examples in float16")


def test_lambda_auto_skips_the_points_that_overflow(tmp_path):
    """`--lambda auto --eval-dtype float16`: one λ of the grid whose merged model overflowed float16 stopped the
    whole merge, with advice ("a smaller λ") the user cannot follow under auto. Such λs are now skipped with a
    warning (and recorded as such); when every λ overflows, one line says so."""
    from eval_fixtures import build_text_setting

    from loramerge_cli.api import load_adapters
    from loramerge_cli.errors import NonFiniteError
    from loramerge_cli.evaluation.tuning import search_lambda
    from loramerge_cli.merging.merge import MergeConfig

    setting = build_text_setting(tmp_path / "s", rows=16)
    adapters = load_adapters([f"{name}={folder}" for name, folder in
                              _scaled_copies(setting, tmp_path, 1000.0).items()])
    options = {"dtype": "float16", "threads": 1}
    search = search_lambda(adapters, MergeConfig(merger="ta"), None, setting.tasks_file, grid=[0.3, 1.0, 8.0],
                           **options)
    skipped = [record["lambda"] for record in search.records if record.get("non_finite")]
    assert skipped == [8.0] and search.best in (0.3, 1.0)
    assert any("1 of 3 λs gave NaN or Inf" in warning for warning in search.warnings)
    with pytest.raises(NonFiniteError, match="every λ tried gave NaN or Inf"):
        search_lambda(adapters, MergeConfig(merger="ta"), None, setting.tasks_file, grid=[8.0, 16.0], **options)


def test_apply_mask_rounds_once_and_writes_heads_in_the_output_dtype(tmp_path):
    """`apply-mask --dtype float32` of a bfloat16 adapter with a weight of 0.37: lora_B × 0.37 was computed in
    bfloat16 and then cast (relative error 3.4e-3 instead of float32's 6e-8), and the head stayed bfloat16 while
    loramerge.json said float32."""
    import torch
    from eval_fixtures import build_text_setting
    from safetensors.torch import load_file, save_file

    from loramerge_cli.masks import WeightTable

    setting = build_text_setting(tmp_path / "s", rows=4)
    folders = _scaled_copies(setting, tmp_path, 1.0)
    weights_file = folders["alpha"] / "adapter_model.safetensors"
    save_file({key: value.to(torch.bfloat16) for key, value in load_file(str(weights_file)).items()},
              str(weights_file))
    inputs = load_file(str(weights_file))
    units = sorted({key.split(".layers.")[1].split(".")[0] for key in inputs if "lora_B" in key})
    table = WeightTable(list(folders), [f"model.layers.{unit}" for unit in units],
                        [[0.37] * len(units) for _ in folders])
    table.save(tmp_path / "mask.json")
    out = tmp_path / "pruned"
    assert invoke_cli(["apply-mask", "--adapters", *[f"{n}={f}" for n, f in folders.items()],
                       "--mask", tmp_path / "mask.json", "--out", out, "--dtype", "float32"]).exit_code == 0
    written = load_file(str(out / "alpha" / "adapter_model.safetensors"))
    assert {tensor.dtype for tensor in written.values()} == {torch.float32}
    for key, tensor in inputs.items():
        if "lora_B" in key:
            expected = (tensor.double() * 0.37).float()
            assert torch.equal(written[key], expected), key


def test_float16_merges_keep_the_magnitude_out_of_one_factor(tmp_path):
    """Two rank-1 adapters with B = 100, A = ±100 (|ΔW| ≤ 1e4, which float16 holds): `merge --merger ties
    --dtype float16` was refused ("lora_B … NaN or Inf"), since the merge put all of S in B (U·S, Vᵀ). The
    factors are now balanced by a power of two (B·A exact) and the float16 ΔW equals the float64 merge's to
    float16's rounding."""
    import torch
    from factories import random_adapter, write_peft_folder
    from safetensors.torch import load_file

    shapes = {"model.layers.0.self_attn.q_proj": (64, 64)}
    folders = []
    for index, sign in enumerate((1.0, -1.0)):
        adapter = random_adapter("ab"[index], shapes, rank=1, alpha=1.0, seed=index, dtype=torch.float32)
        module = next(iter(adapter.modules.values()))
        module.lora_B = torch.full((64, 1), 100.0)
        module.lora_A = torch.full((1, 64), 100.0) * torch.tensor([1.0] * 32 + [sign] * 32)
        folders.append(write_peft_folder(tmp_path / "ab"[index], adapter))
    for merger in ("ties", "ta"):
        out16, out32 = tmp_path / f"{merger}16", tmp_path / f"{merger}32"
        for out, dtype in ((out16, "float16"), (out32, "float32")):
            result = invoke_cli(["merge", "--adapters", *folders, "--merger", merger, "--dtype", dtype, "--out", out])
            assert result.exit_code == 0, result.stderr

        def delta(folder):
            tensors = load_file(str(folder / "adapter_model.safetensors"))
            key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
            return tensors[key.format("B")].double() @ tensors[key.format("A")].double()

        reference = delta(out32)
        assert float((delta(out16) - reference).abs().max()) <= 2e-3 * float(reference.abs().max())


# --- terminals, pipelines and CI jobs -------------------------------------------------------------------------

def test_a_second_signal_waits_for_the_cleanup():
    """Ctrl-C pressed twice: the second interrupt cut the removal of the half-written output short (a staging
    folder with loramerge.json stayed behind, in 3 of 10 tries) and printed a traceback from an exit handler.
    Cleanup now holds the signals back and records them: the way out goes on, and ends as an interrupt."""
    import os
    import signal
    import time

    from loramerge_cli import interrupts

    interrupts.install()
    finished = False
    try:
        with interrupts.shielded():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handlers run meanwhile, in this thread
            finished = True
        assert finished and interrupts.interrupted() and interrupts.exit_code() == 130
    finally:
        interrupts.reset()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_a_full_disk_while_writing_weights_is_one_line(tmp_path, monkeypatch):
    """A disk that filled while safetensors wrote the merged weights: "internal error: SafetensorError: Error while
    serializing: I/O error: No space left on device (os error 28) (rerun with --debug)". Now the same line as any
    other full disk, and nothing left behind."""
    import safetensors.torch
    from safetensors import SafetensorError

    folders = write_task_folders_for(tmp_path)

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    result = invoke_cli(["merge", "--adapters", *folders, "--out", tmp_path / "out" / "m"])
    one_line(result, f"{tmp_path / 'out' / 'm'}: cannot write the output (No space left on device)")
    assert not (tmp_path / "out").exists()


def write_task_folders_for(tmp_path) -> list[str]:
    from factories import write_task_folders

    folders = write_task_folders(tmp_path / "inputs", names=("a", "b"))
    return [str(folders["a"]), str(folders["b"])]


def test_eval_run_dir_and_out_are_checked_before_any_work(tmp_path):
    """`eval --run-dir FILE` scored everything, then failed with "internal error: NotADirectoryError" (and the
    scores were lost); `eval --out new/report.json` was refused though every other command makes the folders
    above its output."""
    from eval_fixtures import build_text_setting

    setting = build_text_setting(tmp_path / "s", rows=4)
    args = ["eval", "--tasks", setting.tasks_file, "--adapters", *setting.adapter_args()]
    (tmp_path / "afile").write_text("x")
    for run_dir in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        one_line(invoke_cli([*args, "--run-dir", run_dir]), f"--run-dir {run_dir}: cannot write scores there, "
                 f"{tmp_path / 'afile'} is not a folder")
    report = tmp_path / "new" / "deeper" / "report.json"
    assert invoke_cli([*args, "--out", report]).exit_code == 0 and json.loads(report.read_text())["rows"]
    one_line(invoke_cli([*args, "--out", f"{tmp_path}/reports/"]), "names a folder: give a file", 2)  # not a file
    assert not (tmp_path / "reports").exists()  # named `reports`, the slash dropped


def test_the_interrupt_hint_offers_resume_only_when_the_run_dir_can_resume(tmp_path, monkeypatch):
    """Ctrl-C before the search had written its run dir's config said "resume with: loramerge search-mask
    --run-dir R --resume", which then failed ("R holds no search to resume"). The hint now appears once the run
    dir holds what --resume reads."""
    from eval_fixtures import build_text_setting

    from loramerge_cli import interrupts
    from loramerge_cli.search import runner
    from test_hostile_inputs import search_request

    setting = build_text_setting(tmp_path / "s", rows=4)

    def interrupted(request, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "prepare_run_dir", interrupted)
    interrupts.reset()
    with pytest.raises(KeyboardInterrupt):
        runner.run_search(search_request(setting, run_dir=tmp_path / "run"))
    assert interrupts.resume_hint() is None and interrupts.message() == "interrupted; nothing was written"
    interrupts.reset()


def test_long_lists_of_choices_are_named_in_the_help_not_in_the_metavar():
    """`merge --help` at 40 columns: --merger's and --method's metavars were one 142-column line
    (`breadcrumbs|breadcrumbs_ties|…`). They read NAME, the choices listed in the (wrapped) help."""
    from typer.testing import CliRunner

    from loramerge_cli.cli.app import app

    result = CliRunner().invoke(app, ["merge", "--help"], env={"COLUMNS": "60"})
    assert result.exit_code == 0
    assert "--merger NAME" in result.stdout and "--method NAME" in result.stdout
    assert "breadcrumbs|" not in result.stdout and "tsv_iso." in result.stdout  # listed in the help text


# --- registries -----------------------------------------------------------------------------------------------

def test_merge_mask_uses_every_recorded_method_parameter(tmp_path):
    """A table searched with `--merger ties --keep-rule floor --consensus count` records both, but `merge --mask`
    read back only density, drop_rate and scope: it merged with round and mass without a word (and a conflicting
    `--consensus mass` was not refused). Every registered parameter is now read back, as density is."""
    import hashlib

    from loramerge_cli.masks import WeightTable

    folders = write_task_folders_for(tmp_path)
    weights_of = lambda out: hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    settings = ["--density", "0.335", "--keep-rule", "floor", "--consensus", "count", "--lambda", "1"]
    assert invoke_cli(["merge", "--adapters", *folders, "--merger", "ties", *settings, "--out",
                       tmp_path / "explicit"]).exit_code == 0
    assert invoke_cli(["merge", "--adapters", *folders, "--merger", "ties", "--density", "0.335", "--lambda", "1",
                       "--out", tmp_path / "defaults"]).exit_code == 0
    assert weights_of(tmp_path / "explicit") != weights_of(tmp_path / "defaults")  # so the test can fail
    units = sorted({f"model.layers.{index}" for index in range(3)})
    WeightTable(["a", "b"], units, [[1.0] * len(units)] * 2, merger={
        "merger": "ties", "method": "ties", "space": "full", "lambda": 1.0, "density": 0.335, "scope": "module",
        "keep_rule": "floor", "consensus": "count", "normalize": "count", "elect_on": "weighted"},
    ).save(tmp_path / "mask.json")
    result = invoke_cli(["merge", "--adapters", *folders, "--mask", tmp_path / "mask.json", "--out", tmp_path / "m"])
    assert result.exit_code == 0, result.stderr
    assert weights_of(tmp_path / "m") == weights_of(tmp_path / "explicit")
    one_line(invoke_cli(["merge", "--adapters", *folders, "--mask", tmp_path / "mask.json", "--consensus", "mass",
                         "--out", tmp_path / "m2"]), "--consensus mass conflicts with the mask's recorded consensus", 2)


def test_settings_a_strategy_never_reads_are_refused(tmp_path):
    """`search-mask --strategy greedy --target-blocks 1` ran (exit 0) though only NSC's objective reads the
    targets; the library accepted any option name for the strategies with a check of their own (`options={"k": 2}`
    for surrogate, or `{"popsize": 4}` for screened, which then overrode --popsize)."""
    from eval_fixtures import build_text_setting

    from loramerge_cli.errors import UsageError
    from loramerge_cli.search.plan import check_request
    from test_hostile_inputs import search_request

    setting = build_text_setting(tmp_path / "s", rows=4)
    one_line(invoke_cli(["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                         "--strategy", "greedy", "--target-blocks", "1", "--out", tmp_path / "m.json"]),
             "--target-blocks does nothing with --strategy greedy", 2)
    from loramerge_cli.search.enmp import EnmpSettings

    for strategy, options in (("surrogate", {"k": 2}), ("screened", {"popsize": 4}), ("screened", {"k": 2})):
        with pytest.raises(UsageError, match=f"--strategy {strategy} has no setting {next(iter(options))}"):
            check_request(search_request(setting, strategy=strategy, options=options, enmp=EnmpSettings()))
    check_request(search_request(setting, strategy="screened", options={"rungs": 2}))  # library-only: allowed


def test_a_merge_setting_given_twice_in_the_library_is_refused():
    """`MergeConfig(density=0.5, params={"density": 0.3})` merged with 0.3 without a word (params won), and the
    seed's refusal named its randomized methods by hand; both come from one place now."""
    from loramerge_cli.errors import UsageError
    from loramerge_cli.merging.config import MergeConfig
    from loramerge_cli.merging.registry import METHODS, randomized_methods

    with pytest.raises(UsageError, match="density is given twice"):
        MergeConfig(density=0.5, params={"density": 0.3})
    assert MergeConfig(params={"density": 0.3}).density == 0.3
    assert randomized_methods() == [name for name in METHODS if name in ("dare", "dare_ties", "della", "lora_lego")]


# --- publishing -----------------------------------------------------------------------------------------------

def test_push_options_and_repository_ids(tmp_path, monkeypatch):
    """`--dry-run` (or --private, --revision) without --push-to-hub merged and replaced the output without a word;
    a folder named like the repository in the working folder made `--push-to-hub me/merged` "not a repository id"
    (so a rerun failed); `--base org/base@main` was written whole into adapter_config.json, which PEFT cannot
    load."""
    folders = write_task_folders_for(tmp_path)
    monkeypatch.chdir(tmp_path)
    one_line(invoke_cli(["merge", "--adapters", *folders, "--out", "m", "--dry-run"]),
             "--dry-run does nothing without --push-to-hub", 2)
    one_line(invoke_cli(["merge", "--adapters", *folders, "--out", "m", "--revision", "dev"]),
             "--revision does nothing without --push-to-hub", 2)
    assert not (tmp_path / "m").exists()
    (tmp_path / "me" / "merged").mkdir(parents=True)
    result = invoke_cli(["merge", "--adapters", *folders, "--out", "out", "--push-to-hub", "me/merged", "--dry-run"])
    assert result.exit_code == 0, result.stderr
    one_line(invoke_cli(["merge", "--adapters", *folders, "--out", "o2", "--push-to-hub", "me/m@dev", "--dry-run"]),
             "the branch goes in --revision")
    result = invoke_cli(["merge", "--adapters", *folders, "--out", "o3", "--base", "org/base@main"])  # (session 25:
    assert result.exit_code == 0 and "warning: --base" not in result.stderr, result.stderr  # a revision is taken)
    config = json.loads((tmp_path / "o3" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("org/base", "main")
    one_line(invoke_cli(["merge", "--adapters", *folders, "--out", "o4", "--base", "org/base@"]),
             "a base model is a folder or a Hub id (org/name[@revision])", 2)


def test_the_card_names_the_pushed_branch_and_a_hub_base_whatever_the_working_folder(tmp_path, monkeypatch):
    """The card's snippet loaded `main` though the merge was pushed to `--revision dev`; its `base_model` vanished
    when the working folder held a folder named like the base's Hub id; the inputs' base revision was dropped
    (PEFT then loaded the base's default branch), and inputs trained on two revisions merged without a word."""
    import json

    from factories import random_adapter, write_peft_folder

    from loramerge_cli.adapters.card import hub_base_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "base").mkdir(parents=True)
    assert hub_base_model("org/base") == "org/base" and hub_base_model("./org/base") is None
    import torch
    from factories import attention_shapes

    folders = []
    for index, revision in enumerate(("abc123", "abc123")):
        adapter = random_adapter("xy"[index], attention_shapes(), seed=index, dtype=torch.float32,
                                 base_model="org/base")
        folders.append(str(write_peft_folder(tmp_path / "xy"[index], adapter, {"revision": revision})))
    result = invoke_cli(["merge", "--adapters", *folders, "--out", "pushed", "--push-to-hub", "me/pushed",
                         "--revision", "dev", "--dry-run"])
    assert result.exit_code == 0, result.stderr
    card = (tmp_path / "pushed" / "README.md").read_text()
    assert "base_model: org/base" in card and "revision='dev'" in card and card.count("# pushed") == 1
    assert json.loads((tmp_path / "pushed" / "adapter_config.json").read_text())["revision"] == "abc123"
    other = json.loads((tmp_path / "y" / "adapter_config.json").read_text())
    (tmp_path / "y" / "adapter_config.json").write_text(json.dumps({**other, "revision": "def456"}))
    one_line(invoke_cli(["merge", "--adapters", *folders, "--out", "mixed"]), "different revisions of their base")


def test_publishing_warns_about_local_paths_and_reports_a_failed_upload_in_one_line(tmp_path):
    """A push whose files named the user's folders (adapter_config.json's base, ../../home/alice/… in the recipe)
    gave no hint; an unreachable endpoint ended in "internal error: ConnectError" (httpx's error is no OSError)."""
    import os
    import subprocess
    import sys

    from test_hostile_inputs import REPO

    folders = write_task_folders_for(tmp_path)
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env.update(PYTHONPATH=REPO, HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN="hf_" + "x" * 34, HF_HOME=str(tmp_path))
    process = subprocess.run([sys.executable, "-m", "loramerge_cli", "merge", "--adapters", *folders, "--base",
                              str(tmp_path / "inputs"), "--out", str(tmp_path / "m"), "--push-to-hub", "me/m"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert process.returncode == 1, process.stderr
    lines = process.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --push-to-hub me/m: upload failed, ") and "Traceback" not in process.stderr
    assert any("the base model is a local path" in line for line in lines)
    assert any("local path(s) outside the folder" in line for line in lines)
    assert (tmp_path / "m" / "adapter_model.safetensors").is_file()  # written, not uploaded


# --- a review of the fixes above ------------------------------------------------------------------------------

@pytest.mark.filterwarnings(TIED)
def test_a_base_copy_rounded_to_bfloat16_is_the_same_base(tmp_path):
    """An adapter trained on the base loaded in bfloat16 saves its lm_head copy in bfloat16: `merge a e` passed
    and wrote the rounded copy (it replaces the float32 lm_head when PEFT loads it), `merge e a` was refused,
    and `eval` refused e ("a resized vocabulary?"). Either order merges now, writing the float32 copy; eval
    accepts the rounded copy, and checks a merged folder's copy as it does an expert's."""
    import torch
    from safetensors.torch import load_file, save_file

    base, (a, e) = _lm_head_adapters(tmp_path)
    key = "base_model.model.lm_head.base_layer.weight"
    tensors = load_file(str(e / "adapter_model.safetensors"))
    tensors[key] = tensors[key].to(torch.bfloat16)
    save_file(tensors, str(e / "adapter_model.safetensors"))
    for order, out in (((a, e), tmp_path / "ae"), ((e, a), tmp_path / "ea")):
        assert invoke_cli(["merge", "--adapters", *order, "--out", out]).exit_code == 0
        assert load_file(str(out / "adapter_model.safetensors"))[key].dtype == torch.float32
    write_jsonl(tmp_path / "v.jsonl", [{"q": "w1 w2", "answer": 0}])
    spec = write_tasks_file(tmp_path / "tasks.yaml", {"model_type": "causal-lm", "base_model": str(base), "tasks": [
        {"name": name, "data": {"validation": "v.jsonl"}, "prompt": "{q}", "choices": [" w1", " w2"],
         "label": "answer"} for name in ("a", "b")]})
    assert invoke_cli(["eval", "--tasks", spec, "--adapters", a, e]).exit_code == 0
    bad = tmp_path / "bad"
    assert invoke_cli(["merge", "--adapters", a, e, "--out", bad]).exit_code == 0
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    tensors[key] = torch.full_like(tensors[key], 5.0)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    result = invoke_cli(["eval", "--tasks", spec, "--adapters", a, e, "--merged", bad])
    assert result.exit_code == 1 and "carries its own lm_head.weight" in result.stderr.splitlines()[-1]


def test_targets_do_nothing_with_the_entropy_objective(tmp_path):
    """`--objective entropy --target-blocks 0` ran (exit 0): entropy measures no targets."""
    from eval_fixtures import build_text_setting

    setting = build_text_setting(tmp_path / "s", rows=4)
    args = ["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file, "--objective",
            "entropy", "--target-blocks", "0", "--out", tmp_path / "m.json"]
    one_line(invoke_cli([*args, "--strategy", "nsc"]), "--target-blocks does nothing with --strategy nsc "
             "--objective entropy", 2)
    one_line(invoke_cli([*args, "--strategy", "greedy", "--fitness", "nsc"]), "--target-blocks does nothing with "
             "--strategy greedy --fitness nsc --objective entropy", 2)


def test_a_pinned_base_revision_beside_the_default_branch_is_a_mismatch(tmp_path):
    """One input trained on base revision abc123, another on the default branch: merged without a word, the
    output pinned to abc123. And `--base` naming the inputs' own base dropped their revision."""
    import json

    import torch
    from factories import attention_shapes, random_adapter, write_peft_folder

    folders = []
    for index, revision in enumerate(("abc123", None, "abc123")):
        adapter = random_adapter("xyz"[index], attention_shapes(), seed=index, dtype=torch.float32,
                                 base_model="org/base")
        folders.append(str(write_peft_folder(tmp_path / "xyz"[index], adapter, {"revision": revision})))
    one_line(invoke_cli(["merge", "--adapters", folders[0], folders[1], "--out", tmp_path / "m"]),
             "different revisions of their base model (x: abc123, y: the default branch)")
    out = tmp_path / "same"
    result = invoke_cli(["merge", "--adapters", folders[0], folders[2], "--base", "org/base", "--out", out])
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "adapter_config.json").read_text())["revision"] == "abc123"


def test_an_in_process_command_leaves_the_callers_signal_handlers(tmp_path):
    """A notebook or service running commands in-process had its SIGINT and SIGTERM handlers replaced for good:
    a later SIGTERM raised KeyboardInterrupt in it."""
    import signal

    def mine(signum, frame):
        pass

    previous = {number: signal.signal(number, mine) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert invoke_cli(["merge", "--adapters", *write_task_folders_for(tmp_path), "--out", tmp_path / "m"]
                          ).exit_code == 0
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def test_search_mask_help_after_a_strategy_lists_its_options_only():
    """`search-mask --strategy greedy -h` printed every strategy's options (80 of them; 703 lines at 40 columns),
    prefixed by their strategy. After `--strategy NAME` the help lists the options NAME reads; without it, all."""
    import re

    from typer.testing import CliRunner

    from loramerge_cli.cli.app import app

    def listed(*args) -> set[str]:  # the options the help lists (not the examples below them)
        return set(re.findall(r"^\s+(--[\w-]+)", CliRunner().invoke(app, ["search-mask", *args]).stdout, re.M))

    greedy = listed("--strategy", "greedy", "-h")
    assert {"--popsize", "--budget", "--merger"} <= greedy
    assert not {"--greedy-pool", "--prior-single", "--steps", "--sigma0"} & greedy
    nsc = listed("--strategy=nsc", "--help")
    assert {"--steps", "--target-blocks"} <= nsc and not {"--max-prune", "--popsize"} & nsc
    every = listed("-h")  # and the hidden options come back
    assert {"--greedy-pool", "--prior-single", "--steps", "--popsize"} <= every
