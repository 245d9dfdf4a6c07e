"""`loramerge eval` = a plain transformers / PEFT forward on the same tokenization, for every task type and
architecture family the tests build, on experts and on merged folders loaded back by PEFT: BERT sentence
pairs with segments and ViT here; Llama and GPT-2 (causal LM, Conv1D) in test_eval_engine.py."""

from __future__ import annotations

import pytest
import torch
from eval_fixtures import (
    build_bert_classifier,
    build_vit_classifier,
    save_peft_adapter,
    text_rows,
    write_jsonl,
    write_tasks_file,
)
from test_eval_engine import peft_classifier_logits, tokenized

from loramerge_cli.adapters.peft_reader import load_adapters
from loramerge_cli.adapters.writer import write_merged_adapter
from loramerge_cli.evaluation import batches
from loramerge_cli.evaluation.engine import EvalSettings, Evaluator, adapter_deltas, merged_deltas
from loramerge_cli.evaluation.metrics import accuracy
from loramerge_cli.evaluation.specs import load_task_file
from loramerge_cli.merging.merge import MergeConfig, merge

SETTINGS = EvalSettings(threads=1, batch_size=5)
BERT_TARGETS = ["query", "key", "value", "attention.output.dense"]


def pair_inputs(base, rows):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    return [tokenizer(row["premise"], row["hypothesis"], return_tensors="pt") for row in rows]


def centre_head(base, folder, rows) -> None:
    """Shift the adapter's head bias so that its class-1 margin has mean 0 on `rows`: a random head's
    bias would otherwise predict one class everywhere, with or without segments."""
    from safetensors.torch import load_file, save_file

    logits = peft_classifier_logits(base, folder, pair_inputs(base, rows))
    file = folder / "adapter_model.safetensors"
    tensors = load_file(str(file))
    [key] = [key for key in tensors if key.endswith("classifier.bias")]
    tensors[key][1] -= float((logits[:, 1] - logits[:, 0]).mean())
    save_file(tensors, str(file))


def labelled_by(base, folder, rows):
    """Rows labelled with the expert's own prediction on the pair with its segments: the expert scores 100 %
    when it sees the segments, and a forward without them is scored against what segments decide."""
    predicted = peft_classifier_logits(base, folder, pair_inputs(base, rows)).argmax(-1).tolist()
    return [{**row, "label": label} for row, label in zip(rows, predicted)]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    base = build_bert_classifier(root / "base")
    folders, tasks = {}, []
    for index, name in enumerate(("pairs", "swapped")):
        folders[name] = save_peft_adapter(base, root / name, BERT_TARGETS, "BertForSequenceClassification",
                                          "SEQ_CLS", seed=11 + index, head_modules=["classifier"])
        rows = text_rows(30, seed=20 + index)
        centre_head(base, folders[name], rows)
        rows = labelled_by(base, folders[name], rows)
        assert 5 < sum(row["label"] for row in rows) < 25  # both classes
        tasks.append({"name": name, "data": {"validation": str(write_jsonl(root / f"{name}.jsonl", rows))},
                      "text": ["premise", "hypothesis"], "label": "label", "num_labels": 2})
    tasks_file = write_tasks_file(root / "tasks.yaml", {"base_model": str(base),
                                                        "model_type": "sequence-classification", "tasks": tasks})
    adapters = load_adapters([f"{name}={folder}" for name, folder in folders.items()])
    return base, folders, tasks_file, adapters


def test_bert_pairs_pass_segments_and_match_a_plain_peft_forward(bert, monkeypatch):
    base, folders, tasks_file, adapters = bert
    engine = Evaluator(load_task_file(tasks_file), adapters, SETTINGS)
    assert all("token_type_ids" in batch.inputs for batch in engine.prepared["pairs"].batches)
    for adapter in adapters:
        inputs = tokenized(base, engine.examples[adapter.name])
        assert all(item["token_type_ids"].any() for item in inputs)  # the second segment is type 1
        reference = peft_classifier_logits(base, folders[adapter.name], inputs)
        with engine.apply(adapter_deltas(adapter)):
            assert torch.allclose(engine.scores(adapter.name), reference, atol=1e-4, rtol=0)
        assert engine.score_adapter(adapter, [adapter.name])[adapter.name] == 1.0  # the labels are its predictions
    # Without segments (what the evaluator did before): other logits, other accuracies.
    accepted = batches.forward_inputs
    monkeypatch.setattr(batches, "forward_inputs", lambda model: accepted(model) - {"token_type_ids"})
    blind = Evaluator(load_task_file(tasks_file), adapters, SETTINGS)
    assert not any("token_type_ids" in batch.inputs for batch in blind.prepared["pairs"].batches)
    assert all(blind.score_adapter(a, [a.name])[a.name] < 1.0 for a in adapters)


def test_bert_merged_folder_matches_a_plain_peft_load(bert, tmp_path):
    base, _, tasks_file, adapters = bert
    engine = Evaluator(load_task_file(tasks_file), adapters, SETTINGS)
    result = merge(adapters, MergeConfig(merger="ties"))
    folder = write_merged_adapter(result, adapters, tmp_path / "merged")
    scores = engine.score_merged(result)
    for adapter in adapters:
        examples = engine.examples[adapter.name]
        reference = peft_classifier_logits(base, folder, tokenized(base, examples), head=engine.heads[adapter.name])
        with engine.apply(merged_deltas(result)):
            assert torch.allclose(engine.scores(adapter.name), reference, atol=1e-4, rtol=0)
        assert scores[adapter.name] == accuracy(reference, examples.labels)


def test_vit_experts_and_merged_folder_match_a_plain_peft_load(tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor

    base = build_vit_classifier(tmp_path / "vit")
    folders = {name: save_peft_adapter(base, tmp_path / name, ["q_proj", "v_proj", "o_proj"],
                                       "AutoModelForImageClassification", None, seed=seed, head_modules=["classifier"])
               for name, seed in (("shapes", 5), ("colours", 6))}
    generator = torch.Generator().manual_seed(0)
    for class_name in ("circle", "square", "star"):
        (tmp_path / "images" / class_name).mkdir(parents=True)
        for index in range(3):
            pixels = (torch.rand(8, 8, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / class_name / f"{index}.png")
    tasks_file = write_tasks_file(tmp_path / "tasks.yaml", {
        "base_model": str(base), "model_type": "image-classification",
        "tasks": [{"name": name, "data": {"validation": "images"}} for name in folders],
    })
    adapters = load_adapters([f"{name}={folder}" for name, folder in folders.items()])
    engine = Evaluator(load_task_file(tasks_file), adapters, SETTINGS)
    processor = AutoImageProcessor.from_pretrained(str(base))
    result = merge(adapters, MergeConfig(merger="tsv"))
    merged_folder = write_merged_adapter(result, adapters, tmp_path / "merged")
    for adapter in adapters:
        paths, labels = engine.examples[adapter.name].inputs, engine.examples[adapter.name].labels
        inputs = [processor(images=Image.open(path).convert("RGB"), return_tensors="pt") for path in paths]
        model_class = "AutoModelForImageClassification"
        expert = peft_classifier_logits(base, folders[adapter.name], inputs, model_class=model_class)
        with engine.apply(adapter_deltas(adapter)):
            assert torch.allclose(engine.scores(adapter.name), expert, atol=1e-5, rtol=0)
        merged = peft_classifier_logits(base, merged_folder, inputs, head=engine.heads[adapter.name],
                                        model_class=model_class)
        with engine.apply(merged_deltas(result)):
            assert torch.allclose(engine.scores(adapter.name), merged, atol=1e-5, rtol=0)
        assert engine.score_merged(result, [adapter.name])[adapter.name] == accuracy(merged, labels)


def test_inspect_names_an_ambiguous_leaf_by_its_path_in_the_block(bert):
    from loramerge_cli import api

    _, _, _, adapters = bert
    [summary, _] = api.inspect_adapters(adapters)["adapters"]
    assert summary["targets"] == ["attention.output.dense", "key", "query", "value"]
    every_dense = [f"bert.encoder.layer.{i}.{p}" for i in (0, 1)
                   for p in ("attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense")]
    assert api.target_names(every_dense, ["query", "dense"]) == [
        "attention.output.dense", "intermediate.dense", "output.dense", "query"]
    assert api.target_names(["model.layers.0.self_attn.q_proj", "lm_head"], ["q_proj", "lm_head"]) == [
        "lm_head", "q_proj"]
