"""Review of session 20: each test failed before its fix (but the plan_merge one, which pins a moved check)."""

import json

import pytest

from loramerge_cli.evaluation.engine import EvalSettings


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    from eval_fixtures import build_text_setting

    return build_text_setting(tmp_path_factory.mktemp("review20"))


def test_a_cap_above_a_split_s_rows_is_said_where_its_scores_are_recorded(setting, tmp_path):
    """`--val-limit 512` on 24 rows scored the 24 without a word, and the record kept 512 as the examples used."""
    import yaml

    from loramerge_cli import api
    from loramerge_cli.evaluation.tuning import search_lambda
    from loramerge_cli.merging.merge import MergeConfig

    adapters = api.load_adapters(setting.adapter_args())
    report = api.evaluate(setting.tasks_file, adapters, settings=EvalSettings(val_limit=512, threads=1))
    assert report["warnings"][0] == ("--val-limit 512 is above the validation rows of alpha (24), beta (24), "
                                     "gamma (24): every row is used")
    assert report["examples"] == {"alpha": 24, "beta": 24, "gamma": 24}
    assert not api.evaluate(setting.tasks_file, adapters, settings=EvalSettings(val_limit=24, threads=1))["warnings"]
    spec = yaml.safe_load(setting.tasks_file.read_text())
    spec["tasks"][1]["limit"] = 30  # a task's own cap, on a split the --val-limit does not cap
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump(spec))
    report = api.evaluate(tasks, adapters, settings=EvalSettings(split="test", threads=1))
    assert report["warnings"] == ["limit 30 is above the test rows of beta (24): every row is used"]
    tuned = search_lambda(adapters, MergeConfig(merger="ta"), None, setting.tasks_file, grid=[0.5], val_limit=100,
                          threads=1)
    assert tuned.warnings[0].startswith("--val-limit 100 is above the validation rows of alpha (24)")


@pytest.mark.parametrize("peak, chosen, reached", [(0.02, 0.02, 0.01481), (20.0, 8.0, 8.0), (7.6, 7.6, 8.0),
                                                   (1e-4, 0.005, 0.005), (0.0058, 0.006, 0.005)])
def test_lambda_auto_s_edge_extension_reaches_its_limits_and_its_warning_names_the_final_best(peak, chosen, reached):
    """The extension stopped a step short of its documented limits (6.75, not 8: λ 7.6 was never tried), its
    warning named the best before the refinement ("the best is now 0.02222" while 0.02 was returned), and a best
    at the extension's end was not refined toward its one neighbour."""
    from loramerge_cli.evaluation.tuning import grid_search

    tried = []
    best, [warning] = grid_search(lambda lam, stage: tried.append(lam) or -abs(lam - peak), default_lambda=0.25)
    assert best == pytest.approx(chosen) and f"{reached:g}" in warning
    assert warning.endswith(f"the best is now {chosen:g}") or f"the best λ, {chosen:g}, is still at that end" in warning
    assert (min(tried) if peak < 1 else max(tried)) == pytest.approx(reached)
    if peak == 20.0:  # between 6.75 and 8, toward the end's one neighbour
        assert any(6.75 < lam < 8.0 for lam in tried) and "beyond" in warning


def test_plan_merge_refuses_a_truncation_it_would_ignore(setting):
    """`out_rank` / `energy` given where nothing is truncated are refused by the library's plan, as on the
    command line (the check now lives with the merge code, beside the settings it reads)."""
    from loramerge_cli import api
    from loramerge_cli.errors import UsageError
    from loramerge_cli.merging.merge import MergeConfig

    adapters = api.load_adapters(setting.adapter_args())
    with pytest.raises(UsageError, match="--out-rank does not apply with --isotropize"):
        api.plan_merge(adapters, MergeConfig(merger="ties", isotropize=True, out_rank=2))
    with pytest.raises(UsageError, match="--energy truncates dense merges"):
        api.plan_merge(adapters, MergeConfig(merger="tsv", energy=0.9))
    assert api.plan_merge(adapters, MergeConfig(merger="ties", out_rank=2))


# --- PEFT's saved embedding layers (save_embedding_layers) --------------------------------------------------------

def _llama_lm(folder, vocab=64):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
                     ).save_pretrained(str(folder))
    return folder


def _lm_adapter(model, folder, targets, seed, **save):
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                  **({"task_type": "CAUSAL_LM"} if "resized" in str(folder) else {})))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(folder), **save)
    return folder


def test_unwrapped_embedding_layers_peft_saved_are_base_weights_not_heads(tmp_path):
    """b saved with `save_embedding_layers=True` holds `lm_head.weight` and `model.embed_tokens.weight` (not
    LoRA-wrapped there): they were read as b's task heads, and `merge a b` wrote `modules_to_save: [lm_head,
    model.embed_tokens]`, so PEFT wrapped lm_head as a saved copy and a's LoRA on lm_head had no effect (exit 0,
    merged ΔW of lm_head 0). They are base weights PEFT loads over the base's: carried as such."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from factories import invoke_cli

    base = _llama_lm(tmp_path / "base")
    load = lambda: LlamaForCausalLM.from_pretrained(str(base)).eval()  # noqa: E731
    a = _lm_adapter(load(), tmp_path / "a", ["q_proj", "lm_head"], 1)
    b = _lm_adapter(load(), tmp_path / "b", ["q_proj"], 2, save_embedding_layers=True)
    report = json.loads(invoke_cli(["inspect", a, b, "--json"]).stdout)
    assert [summary["heads"] for summary in report["adapters"]] == [[], []]
    out = tmp_path / "m"
    assert invoke_cli(["merge", "--adapters", a, b, "--merger", "ta", "--lambda", "1", "--out", out]).exit_code == 0
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] is None
    written = load_file(str(out / "adapter_model.safetensors"))
    assert {"base_model.model.lm_head.base_layer.weight", "base_model.model.model.embed_tokens.weight"} <= set(written)
    base_head = load().lm_head.weight.detach().double()

    def lm_head_update(folder):
        return PeftModel.from_pretrained(load(), str(folder)).merge_and_unload().lm_head.weight.detach().double() \
            - base_head

    assert lm_head_update(a).abs().max() > 0.1
    assert torch.allclose(lm_head_update(out), lm_head_update(a), atol=1e-6)


def test_a_resized_vocabulary_s_embeddings_stay_in_the_merge(tmp_path):
    """A CAUSAL_LM adapter trained on a base resized from 64 to 72 tokens: PEFT saves both embedding matrices
    (`save_embedding_layers="auto"`). The merge dropped them, with a warning calling them modules_to_save
    weights, and the merged model's logits on the resized base differed from the adapter's by 16.5 (on a
    scale of 16.6). They are written as PEFT saved them: the merge of the one adapter is the adapter."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from factories import invoke_cli

    base = _llama_lm(tmp_path / "base")

    def resized():
        model = LlamaForCausalLM.from_pretrained(str(base)).eval()
        model.resize_token_embeddings(72, mean_resizing=False)
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():  # the new tokens' rows, as training left them
            model.model.embed_tokens.weight[64:] = torch.randn(8, 32, generator=generator)
            model.lm_head.weight[64:] = torch.randn(8, 32, generator=generator)
        return model

    adapter = _lm_adapter(resized(), tmp_path / "resized", ["q_proj", "v_proj"], 3)
    out = tmp_path / "m"
    result = invoke_cli(["merge", "--adapters", adapter, "--merger", "ta", "--lambda", "1", "--out", out])
    assert result.exit_code == 0 and "modules_to_save" not in result.stderr
    ids = torch.tensor([[1, 5, 66, 70, 9]])

    def logits(folder):
        fresh = LlamaForCausalLM.from_pretrained(str(base)).eval()
        fresh.resize_token_embeddings(72, mean_resizing=False)  # the new rows come from the adapter's copy
        with torch.no_grad():
            return PeftModel.from_pretrained(fresh, str(folder)).eval()(input_ids=ids).logits

    assert torch.allclose(logits(out), logits(adapter), atol=1e-5)


def test_a_head_is_written_in_its_own_dtype_without_dtype(setting, tmp_path):
    """Float16 factors and a float32 head: the head inside the merged adapter_model.safetensors was rounded to
    float16 (heads/<task>.safetensors and apply-mask kept it whole). Only --dtype converts it."""
    import torch
    from safetensors.torch import load_file, save_file

    from factories import invoke_cli

    adapter = tmp_path / "half"
    import shutil

    shutil.copytree(setting.adapters["alpha"], adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({key: value.half() if "lora_" in key else value for key, value in tensors.items()},
              str(adapter / "adapter_model.safetensors"))
    head = {key: value for key, value in tensors.items() if "lora_" not in key}
    assert head and all(value.dtype == torch.float32 for value in head.values())
    for extra, dtype in (([], torch.float32), (["--dtype", "float16"], torch.float16)):
        out = tmp_path / f"m{len(extra)}"
        assert invoke_cli(["merge", "--adapters", f"alpha={adapter}", "--lambda", "1", "--out", out, *extra]
                          ).exit_code == 0
        written = load_file(str(out / "adapter_model.safetensors"))
        assert all(torch.equal(written[key], value.to(dtype)) and written[key].dtype == dtype
                   for key, value in head.items())


def test_which_saved_tensors_are_heads_follows_peft_s_modules_to_save_rule():
    """A head is a module PEFT wraps for `modules_to_save` (a plain suffix match of a module's path, or of a
    module above it, as PEFT's `_set_trainable`; the task type's head names too); any other whole tensor is a
    base weight PEFT loads over the base's; without a config, every whole tensor is a head."""
    import torch

    from loramerge_cli.adapters.peft_reader import parse_state_dict

    prefix = "base_model.model."
    tensors = {f"{prefix}layers.0.q.lora_A.weight": torch.ones(1, 4),
               f"{prefix}layers.0.q.lora_B.weight": torch.ones(4, 1),
               **{f"{prefix}{key}": torch.full((4, 4), float(index)) for index, key in enumerate(
                   ["pre_classifier.weight", "classifier.dense.weight", "score.weight", "embed_tokens.weight",
                    "lm_head.original_module.weight", "lm_head.modules_to_save.weight", "lm_head.weight",
                    "head.modules_to_save.default.weight"])}}
    tensors[f"{prefix}lm_head.weight"] = tensors[f"{prefix}lm_head.modules_to_save.weight"]
    config = {"r": 1, "lora_alpha": 1, "target_modules": ["q"], "modules_to_save": ["classifier", "lm_head", "head"],
              "task_type": "SEQ_CLS"}
    _, heads, copies = parse_state_dict(tensors, config, "x")
    assert sorted(heads) == ["classifier.dense.weight", "head.weight", "lm_head.weight", "pre_classifier.weight",
                             "score.weight"]
    assert sorted(copies) == ["embed_tokens.weight", "lm_head.weight"]
    assert float(heads["lm_head.weight"][0, 0]) == 5.0 and float(copies["lm_head.weight"][0, 0]) == 4.0
    _, heads, copies = parse_state_dict(tensors, {**config, "task_type": None}, "x")
    assert "score.weight" in copies
    _, heads, copies = parse_state_dict(tensors, {}, "x")  # a bare file: no config to tell
    assert list(copies) == ["lm_head.weight"] and "embed_tokens.weight" in heads  # (original_module: the base)
    tensors[f"{prefix}lm_head.weight"] = tensors[f"{prefix}lm_head.weight"] + 1
    with pytest.raises(Exception, match="lm_head.weight is saved twice with different values"):
        parse_state_dict(tensors, config, "x")


# --- terminals and shells ----------------------------------------------------------------------------------------

def test_paths_and_names_with_brackets_are_printed_as_written(setting, tmp_path):
    """Rich read `[...]` in a path as markup: `merge --out 'mm[/]z'` wrote the merge, then failed with an internal
    MarkupError (exit 1); `--out 'mm[exp1]'` said "merged into mm"; an adapter whose base path holds `[red]`
    showed another path in `inspect`."""
    import shutil

    from factories import invoke_cli

    for name in ("mm[/]z", "mm[exp1]"):
        result = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--out", tmp_path / name])
        assert result.exit_code == 0 and f"merged into {tmp_path / name}" in result.stdout, result.output
    adapter = tmp_path / "odd"
    shutil.copytree(setting.adapters["alpha"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/m/[red]x[/]"}))
    result = invoke_cli(["inspect", adapter, setting.adapters["beta"]])
    assert result.exit_code == 0 and "/m/[red]x[/]" in result.stdout, result.output


def _run_in_shell(script: str, tmp_path, **env):
    import os
    import subprocess
    import sys

    command = f"{sys.executable} -c 'from loramerge_cli.cli import main; main()'"
    return subprocess.run(["bash", "-c", script.replace("LORAMERGE", command)], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, **env}, timeout=300)


def test_a_working_folder_removed_under_the_shell_is_one_line(setting, tmp_path):
    """`mkdir g && cd g && rmdir ../g && loramerge inspect /abs/a`: torch's import died with "Intel oneMKL FATAL
    ERROR" and exit 2 (the usage code); search-mask gave an internal FileNotFoundError."""
    adapter = setting.adapters["alpha"]
    result = _run_in_shell(f"mkdir gone && cd gone && rmdir ../gone && LORAMERGE inspect {adapter}", tmp_path)
    assert result.returncode == 1 and result.stderr == "error: the working folder no longer exists: cd to one that " \
        "does\n", result.stderr


def test_a_non_ascii_output_path_in_an_ascii_locale_is_written(setting, tmp_path):
    """With LC_ALL=C and PYTHONUTF8=0 (no UTF-8 mode), `merge --out 'ünï/out ×'` failed with an internal
    UnicodeEncodeError writing the model card, which holds the folder's name."""
    out = tmp_path / "ünï" / "out ×"
    import shlex

    adapters = " ".join(shlex.quote(str(arg)) for arg in setting.adapter_args())
    result = _run_in_shell(f"LORAMERGE merge --quiet --adapters {adapters} --out {shlex.quote(str(out))}", tmp_path,
                           LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", LANG="C")
    assert result.returncode == 0, result.stderr
    assert "out ×" in (out / "README.md").read_text(encoding="utf-8")


def _head_and_update(tmp_path):
    """d saves lm_head whole (modules_to_save), b has LoRA on lm_head: (d, b) folders on one tiny Llama LM."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = _llama_lm(tmp_path / "base")
    d = tmp_path / "d"
    get_peft_model(LlamaForCausalLM.from_pretrained(str(base)), LoraConfig(
        r=4, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM",
        init_lora_weights=False)).save_pretrained(str(d))
    return d, _lm_adapter(LlamaForCausalLM.from_pretrained(str(base)), tmp_path / "b", ["q_proj", "lm_head"], 2)


def test_a_served_head_that_holds_another_adapter_s_update_is_refused(tmp_path):
    """d saves lm_head whole (modules_to_save) and b has LoRA on lm_head: `merge d b --head d` wrote both the
    head and b's factors for lm_head, and PEFT, which puts no LoRA on a module it saves whole, dropped b's update
    as it loaded the merge (exit 0, no word). Refused before any work; another head, or none, merges."""
    from factories import invoke_cli
    from test_hostile_inputs import one_line

    d, b = _head_and_update(tmp_path)
    one_line(invoke_cli(["merge", "--adapters", d, b, "--head", "d", "--out", tmp_path / "m"]),
             "d's head, served by the merge (modules_to_save: lm_head), saves lm_head whole, and b has a LoRA update")
    assert not (tmp_path / "m").exists()
    assert invoke_cli(["merge", "--adapters", d, b, "--out", tmp_path / "m"]).exit_code == 0  # no head: served none


# --- search-mask --strategy nsc -----------------------------------------------------------------------------------

def test_nsc_refuses_merger_settings_it_never_reads(setting, tmp_path):
    """`--strategy nsc -h` listed every merger option, and `--merger ties` or `--lambda 0.3` ran (exit 0) and
    changed nothing: NSC learns the coefficients of a task-arithmetic sum itself."""
    from dataclasses import replace

    from factories import invoke_cli
    from test_hostile_inputs import one_line

    from loramerge_cli import api
    from loramerge_cli.errors import UsageError
    from loramerge_cli.merging.merge import MergeConfig
    from loramerge_cli.search.runner import SearchRequest

    common = ["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file, "--strategy", "nsc",
              "--steps", "1", "--out", tmp_path / "c.json"]
    for flags, named in ((["--merger", "ties"], "--merger"), (["--lambda", "0.3"], "--lambda"),
                         (["--method", "ta"], "--method"), (["--density", "0.5"], "--density")):
        one_line(invoke_cli([*common, *flags]), f"{named} does nothing with --strategy nsc", code=2)
    help_text = invoke_cli(["search-mask", "--strategy", "nsc", "-h"]).stdout
    assert "--steps" in help_text and "--density" not in help_text and "--knots-scaled" not in help_text
    assert "--density" in invoke_cli(["search-mask", "--strategy", "surrogate", "-h"]).stdout
    request = SearchRequest(strategy="nsc", adapters=setting.adapter_args(), merge=MergeConfig(merger="ta"),
                            tasks=setting.tasks_file, eval=EvalSettings(threads=1))
    with pytest.raises(UsageError, match="--merger does nothing with --strategy nsc"):
        api.plan_search(replace(request, merge=MergeConfig(merger="ties")))
    assert api.plan_search(replace(request, merge=MergeConfig(merger="ta", seed=3)))


def test_nsc_warnings_go_to_stderr(setting, tmp_path, monkeypatch):
    """`search-mask --strategy nsc` printed its "the nsc loss of task … rose" warnings on stdout, with the
    result, also under --quiet; warnings go to stderr (and --quiet silences them), as every command's do."""
    from factories import invoke_cli

    from loramerge_cli.search import nsc

    real = nsc.raised_tasks
    monkeypatch.setattr(nsc, "raised_tasks", lambda *args: (real(*args)[0], ["the nsc loss of task beta rose"]))
    args = ["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file, "--strategy", "nsc",
            "--steps", "1", "--threads", "1", "--out", tmp_path / "c.json"]
    result = invoke_cli(args)
    assert result.exit_code == 0, result.output
    assert "rose" not in result.stdout and "warning: the nsc loss of task beta rose" in result.stderr
    quiet = invoke_cli([*args[:-1], tmp_path / "q.json", "--quiet"])
    assert quiet.exit_code == 0 and "rose" not in quiet.stdout + quiet.stderr


def test_greedy_and_random_record_the_settings_they_used(setting, tmp_path):
    """Their `provenance.search` was {budget, sparsity}: the --max-prune cap given was only in the command, and
    random's sparsity was null instead of the max_prune / 2 it used."""
    from loramerge_cli.masks import load_table

    from factories import invoke_cli

    for strategy in ("greedy", "random"):
        out = tmp_path / f"{strategy}.json"
        result = invoke_cli(["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                             "--strategy", strategy, "--max-prune", "0.5", "--budget", "4", "--threads", "1",
                             "--out", out])
        assert result.exit_code == 0, result.output
        search = load_table(out).provenance["search"]
        assert search["max_prune"] == 0.5 and search["budget"] == 4
        if strategy == "random":
            assert search["sparsity"] == 0.25 and search["pruned"] >= 1
        else:
            assert search["max_pruned"] >= 1


def test_a_prompt_longer_than_the_tokenizer_s_limit_prints_no_transformers_warning(tmp_path):
    """`eval --json` on causal-lm prompts longer than the tokenizer's model_max_length printed transformers'
    "Token indices sequence length is longer than the specified maximum …" on stderr: the prompts are
    left-truncated to the cap right after, so it was noise, and --json promises a silent stderr."""
    from eval_fixtures import build_gpt2_lm
    from transformers import AutoTokenizer

    from loramerge_cli.evaluation.batches import prepare_choices

    base = build_gpt2_lm(tmp_path / "gpt2")
    config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 8}))
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        prepared = prepare_choices(["w1 w2 " * 10], [" w1", " w2"], tokenizer, 0, 2, 8, "cpu")
        AutoTokenizer.from_pretrained(str(base))("w1 w2 " * 10)  # (a fresh one warns once: the test can fail)
    finally:
        logger.removeHandler(handler)
    messages = [record.getMessage() for record in records]
    assert prepared.count == 1 and len(messages) == 1 and "Token indices" in messages[0]


def test_a_matplotlib_that_does_not_start_is_one_line_before_any_work(setting, tmp_path):
    """`MPLBACKEND=nonsense search-mask --plot p.png` ended in an internal error (matplotlib's ValueError as it
    imports): an environment matplotlib refuses is said in one line, before any work."""
    import shlex

    adapters = " ".join(shlex.quote(str(arg)) for arg in setting.adapter_args())
    result = _run_in_shell(f"LORAMERGE search-mask --adapters {adapters} --tasks {setting.tasks_file} --budget 10 "
                           f"--plot {tmp_path / 'p.png'} --out {tmp_path / 'm.json'}", tmp_path, MPLBACKEND="nonsense")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: --plot: matplotlib does not start") and "MPLBACKEND" in result.stderr
    assert not (tmp_path / "m.json").exists()


# --- heads of several layers, image classifiers: what the card and the config say ---------------------------------

def test_a_head_of_several_layers_gives_its_class_count():
    """RoBERTa's `classifier.dense` + `classifier.out_proj` (DistilBERT's `pre_classifier` + `classifier`): the
    card's snippet left out `num_labels`, so it failed to load (a 3-row out_proj into a 2-class head)."""
    from types import SimpleNamespace

    import torch

    from loramerge_cli.adapters.card import head_classes
    from loramerge_cli.adapters.model import head_class_count

    roberta = {"classifier.dense.weight": torch.zeros(32, 32), "classifier.dense.bias": torch.zeros(32),
               "classifier.out_proj.weight": torch.zeros(3, 32), "classifier.out_proj.bias": torch.zeros(3)}
    distilbert = {"pre_classifier.weight": torch.zeros(32, 32), "classifier.weight": torch.zeros(5, 32)}
    assert head_class_count(roberta) == 3 and head_class_count(distilbert) == 5
    assert head_class_count({"score.weight": torch.zeros(4, 32)}) == 4
    assert head_class_count({"a.weight": torch.zeros(3, 8), "b.weight": torch.zeros(4, 8)}) is None  # cannot tell
    assert head_classes([SimpleNamespace(name="t1", heads=roberta)], "t1") == 3


def test_an_image_classifier_merge_keeps_the_class_it_was_trained_on(tmp_path):
    """ViT adapters (task_type null) name ViTForImageClassification in PEFT's `auto_mapping`: the merge dropped it,
    so `AutoPeftModel.from_pretrained(merge)` failed ("Cannot infer the auto class"), and on a base saved as
    ViTModel the card's snippet loaded `AutoModel` (the adapters' targets not found)."""
    import warnings

    from eval_fixtures import build_vit_classifier, save_peft_adapter
    from peft import AutoPeftModel

    from factories import invoke_cli

    base = build_vit_classifier(tmp_path / "vit")
    adapters = [save_peft_adapter(base, tmp_path / name, ["q_proj", "v_proj"], "ViTForImageClassification", None,
                                  seed=index, head_modules=["classifier"]) for index, name in enumerate(("a", "b"))]
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["ViTModel"]}))
    out = tmp_path / "m"
    assert invoke_cli(["merge", "--adapters", *adapters, "--head", "b", "--out", out]).exit_code == 0
    mapping = json.loads((out / "adapter_config.json").read_text())["auto_mapping"]
    assert mapping["base_model_class"] == "ViTForImageClassification"
    assert "AutoModelForImageClassification.from_pretrained" in (out / "README.md").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoPeftModel.from_pretrained(str(out), num_labels=3)
    assert type(model.base_model.model).__name__ == "ViTForImageClassification"


def test_a_served_head_clash_is_refused_before_the_merge_with_a_table_too(tmp_path, monkeypatch):
    """With `--mask`, the clash of a served head and another adapter's update was found by the writer, after
    the merge was computed; the plan now checks the updates the table keeps (and lets a table that prunes the
    clashing update merge)."""
    from factories import invoke_cli
    from test_hostile_inputs import one_line

    from loramerge_cli.merging import merge as merging

    d, b = _head_and_update(tmp_path)
    units = ["lm_head", *(f"model.layers.{block}.self_attn.{kind}" for block in (0, 1)
                          for kind in ("q_proj", "v_proj"))]
    for name, b_weight in (("keeps", 1), ("prunes", 0)):  # one unit per module: lm_head's weight per task
        (tmp_path / f"{name}.json").write_text(json.dumps({"format": "loramerge.mask/v1", "tasks": ["d", "b"],
                                                           "unit": "module", "units": units,
                                                           "weights": [[1] * 5, [b_weight, 1, 1, 1, 1]]}))
    merged = []
    real = merging.run_merge
    monkeypatch.setattr(merging, "run_merge", lambda *args, **kwargs: merged.append(1) or real(*args, **kwargs))
    one_line(invoke_cli(["merge", "--adapters", d, b, "--head", "d", "--mask", tmp_path / "keeps.json",
                         "--out", tmp_path / "m"]), "saves lm_head whole, and b has a LoRA update")
    assert not merged and not (tmp_path / "m").exists()
    result = invoke_cli(["merge", "--adapters", d, b, "--head", "d", "--mask", tmp_path / "prunes.json",
                         "--out", tmp_path / "m"])
    assert result.exit_code == 0 and merged, result.output


def test_a_whole_integer_tensor_two_adapters_carry_is_written_once(setting, tmp_path):
    """A whole tensor that is not floating point (an index buffer) carried by two adapters: the writer compared
    the copies' float precision and failed with an internal TypeError (torch.finfo of int64)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from factories import invoke_cli

    folders = []
    for name in ("alpha", "beta"):
        folder = tmp_path / name
        shutil.copytree(setting.adapters[name], folder)
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        save_file({**tensors, "base_model.model.model.position_ids": torch.arange(8)},
                  str(folder / "adapter_model.safetensors"))
        folders.append(folder)
    out = tmp_path / "m"
    result = invoke_cli(["merge", "--adapters", *folders, "--out", out])
    assert result.exit_code == 0, result.output
    assert torch.equal(load_file(str(out / "adapter_model.safetensors"))["base_model.model.model.position_ids"],
                       torch.arange(8))
