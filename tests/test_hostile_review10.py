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
    one_line(invoke_cli(["merge", "--adapters", a, b, "--out", tmp_path / "m"]), "lm_head.base_layer.weight differs")
    assert not (tmp_path / "m").exists()
    write_jsonl(tmp_path / "v.jsonl", [{"q": "w1 w2", "answer": 0}])
    spec = write_tasks_file(tmp_path / "tasks.yaml", {"model_type": "causal-lm", "base_model": str(base), "tasks": [
        {"name": "b", "data": {"validation": "v.jsonl"}, "prompt": "{q}", "choices": [" w1", " w2"],
         "label": "answer"}]})
    one_line(invoke_cli(["eval", "--tasks", spec, "--adapters", b]), "carries its own lm_head.weight")


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
