"""The evaluation engine against plain PEFT forward passes, on tiny real models built here."""

from __future__ import annotations

import pytest
import torch
from eval_fixtures import (
    build_gpt2_lm,
    build_text_setting,
    build_vit_classifier,
    save_peft_adapter,
    text_rows,
    write_jsonl,
    write_tasks_file,
)

from loramerge_cli.adapters.peft_reader import load_adapter, load_adapters
from loramerge_cli.errors import LoramergeError
from loramerge_cli.evaluation.cache import ScoreCache, base_scores, expert_scores
from loramerge_cli.evaluation.engine import EvalSettings, Evaluator, adapter_deltas, merged_deltas, scale_deltas
from loramerge_cli.evaluation.metrics import accuracy, mean_defined, normalized_accuracy
from loramerge_cli.evaluation.specs import load_task_file
from loramerge_cli.evaluation.tuning import (
    COARSE_GRID,
    best_lambda,
    coarse_grid,
    grid_search,
    refine_points,
    search_lambda,
    tune_lambda,
)
from loramerge_cli.merging.merge import MergeConfig, merge

SETTINGS = EvalSettings(threads=1, batch_size=5)
CHOICES = [" yes", " no w1"]  # one and two tokens


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    setting = build_text_setting(tmp_path_factory.mktemp("engine_text"))
    adapters = load_adapters(setting.adapter_args())
    engine = Evaluator(load_task_file(setting.tasks_file), adapters, SETTINGS)
    return setting, adapters, engine


def peft_classifier_logits(base, adapter_folder, inputs, head=None, model_class="AutoModelForSequenceClassification"):
    """Logits of PeftModel.from_pretrained, one unpadded example at a time; `head` overrides the head."""
    import transformers
    from peft import PeftModel

    model = getattr(transformers, model_class).from_pretrained(str(base))
    peft_model = PeftModel.from_pretrained(model, str(adapter_folder)).eval()
    if head:
        state = dict(peft_model.base_model.model.named_parameters())
        with torch.no_grad():
            for key, tensor in head.items():
                module, name = key.rsplit(".", 1)
                for target in (key, f"{module}.modules_to_save.default.{name}"):  # merges carry a head wrapper
                    if target in state:
                        state[target].copy_(tensor)
    with torch.no_grad():
        return torch.cat([peft_model(**item).logits.float() for item in inputs])


def tokenized(base, examples):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    return [tokenizer(*pair, return_tensors="pt") for pair in examples.inputs]


def test_expert_scores_equal_a_plain_peft_forward(text):
    setting, adapters, engine = text
    for adapter in adapters:
        task = engine.task_file.task(adapter.name)
        examples = engine.examples[adapter.name]
        inputs = tokenized(setting.base, examples)
        reference = peft_classifier_logits(setting.base, setting.adapters[adapter.name], inputs)
        with engine.apply(adapter_deltas(adapter)):
            logits = engine.scores(adapter.name)
        assert torch.allclose(logits, reference, atol=1e-5, rtol=0)
        expected = accuracy(reference, examples.labels, task.masked_labels)
        assert engine.score_adapter(adapter, [adapter.name]) == {adapter.name: expected}


def test_masked_labels_are_never_predicted(text):
    _, adapters, engine = text
    task = engine.task_file.task("gamma")
    assert task.masked_labels == [1]
    with engine.apply(adapter_deltas(adapters[2])):
        logits = engine.scores("gamma")
    labels = engine.examples["gamma"].labels
    masked = logits.clone()
    masked[:, 1] = float("-inf")
    expected = float((masked.argmax(-1) == torch.tensor(labels)).double().mean())
    assert engine.score_adapter(adapters[2], ["gamma"])["gamma"] == expected
    assert (logits.argmax(-1) == 1).any(), "the fixture should make class 1 the unmasked argmax somewhere"


@pytest.mark.parametrize("merger", ["ta", "ties", "knots"])
def test_merged_result_equals_the_written_folder_loaded_by_peft(text, tmp_path, merger):
    from loramerge_cli.adapters.writer import write_merged_adapter

    setting, adapters, engine = text
    result = merge(adapters, MergeConfig(merger=merger))
    folder = write_merged_adapter(result, adapters, tmp_path / "merged")
    scores = engine.score_merged(result)
    for adapter in adapters:
        examples = engine.examples[adapter.name]
        reference = peft_classifier_logits(
            setting.base, folder, tokenized(setting.base, examples), head=engine.heads[adapter.name]
        )
        with engine.apply(merged_deltas(result)):
            logits = engine.scores(adapter.name)
        assert torch.allclose(logits, reference, atol=1e-5, rtol=0)
        task = engine.task_file.task(adapter.name)
        assert scores[adapter.name] == accuracy(reference, examples.labels, task.masked_labels)
    # The folder read back as an adapter scores the same as the in-memory result.
    assert engine.score_adapter(load_adapter(str(folder))) == scores


def test_patched_weights_are_base_plus_delta(text):
    _, adapters, engine = text
    path = "model.layers.1.self_attn.v_proj"
    module = adapters[0].modules[path]
    with engine.apply(adapter_deltas(adapters[0])):
        patched = engine.modules[path].weight.detach().clone()
    expected = engine.base_weights[path] + (module.lora_B * module.scale) @ module.lora_A
    assert torch.allclose(patched, expected, atol=1e-6, rtol=0)


def test_base_weights_are_bit_identical_after_many_patch_restore_cycles(text):
    _, adapters, engine = text
    heads = {key for head in engine.heads.values() for key in head}
    before = {name: p.detach().clone() for name, p in engine.model.named_parameters() if name not in heads}
    base_logits = engine.scores("alpha")
    candidates = [adapter_deltas(a) for a in adapters]
    candidates += [merged_deltas(merge(adapters, MergeConfig(merger=m))) for m in ("ta", "ties", "tsv")]
    candidates += [scale_deltas(candidates[0], 0.37), scale_deltas(candidates[4], 1.9)]
    for cycle in range(30):
        deltas = candidates[cycle % len(candidates)]
        with engine.apply(deltas):
            assert any(not torch.equal(engine.modules[p].weight, engine.base_weights[p]) for p in deltas)
            engine.scores("beta")
        if cycle % 7 == 3:  # an error inside the block restores W0 too
            with pytest.raises(RuntimeError), engine.apply(deltas):
                raise RuntimeError("candidate failed")
    after = dict(engine.model.named_parameters())
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    assert torch.equal(engine.scores("alpha"), base_logits)


def test_unknown_module_is_refused_before_patching(text):
    from factories import random_adapter

    _, _, engine = text
    stranger = random_adapter("stranger", {"model.layers.0.self_attn.z_proj": (16, 16)}, dtype=torch.float32)
    with pytest.raises(LoramergeError, match="module model.layers.0.self_attn.z_proj is not a weight matrix"):
        engine.score_adapter(stranger)
    wrong = random_adapter("wrong", {"model.layers.0.self_attn.q_proj": (8, 16)}, dtype=torch.float32)
    with pytest.raises(LoramergeError, match="updates a 8×16 weight but the base model's is 16×16"):
        engine.score_adapter(wrong)


def test_score_cache_reuses_and_invalidates(text, tmp_path):
    setting, adapters, engine = text
    cache = ScoreCache(tmp_path / "run")
    experts = expert_scores(engine, cache)
    assert experts == {a.name: engine.score_adapter(a, [a.name])[a.name] for a in adapters}
    assert base_scores(engine, cache) == engine.score_base()
    stored = ScoreCache(tmp_path / "run")
    assert stored.scores == cache.scores and len(stored.scores) == 6
    for key in stored.scores:  # a cached value is served without a forward pass
        stored.scores[key] = 0.5
    assert set(expert_scores(engine, stored).values()) == {0.5}
    # Other data (another validation subset) is another key: nothing is served from the cache.
    engine_small = Evaluator(load_task_file(setting.tasks_file), adapters, EvalSettings(threads=1, val_limit=5))
    assert all(engine_small.fingerprint(t) != engine.fingerprint(t) for t in engine.task_file.names)
    assert 0.5 not in expert_scores(engine_small, stored).values()


def test_normalized_accuracy_with_a_zero_expert():
    normalized, warnings = normalized_accuracy({"a": 0.45, "b": 0.3}, {"a": 0.9, "b": 0.0})
    assert normalized == {"a": pytest.approx(50.0), "b": None}
    assert warnings == ["task b: the expert scores 0, so its normalized accuracy is undefined"]
    assert mean_defined(normalized) == pytest.approx(50.0)
    assert mean_defined({"a": None}) is None


def test_best_lambda_breaks_ties_towards_the_default_then_the_smaller():
    records = [{"lambda": lam, "mean_normalized_accuracy": mean} for lam, mean in
               ((0.2, 90.0), (0.4, 95.0), (0.8, 95.0), (1.2, 95.0), (1.6, None))]
    assert best_lambda(records, default_lambda=1.0) == 0.8
    assert best_lambda(records, default_lambda=0.6) == 0.4  # |0.4-0.6| = |0.8-0.6|: the smaller wins


def test_the_coarse_grid_is_absolute_and_holds_the_default():
    assert coarse_grid(0.4) == list(COARSE_GRID) and COARSE_GRID[0] == 0.05 and COARSE_GRID[-1] == 2.0
    assert coarse_grid(1.0) == sorted([*COARSE_GRID, 1.0])
    assert coarse_grid(1 / 3) == sorted([*COARSE_GRID, 1 / 3])  # exactly: a tie is the default merge
    assert coarse_grid(0.01) == list(COARSE_GRID)  # outside: the edge extension reaches it if it is best
    assert refine_points(0.3, 0.6) == [0.35, 0.4, 0.45, 0.5, 0.55]
    assert refine_points(1.2, 2.0) == [1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9]


@pytest.mark.parametrize("peak", [0.5, 0.23, 1.05, 1.45, 0.09])
def test_grid_search_reaches_an_interior_optimum_to_a_fine_grid_step(peak):
    stages = []

    def mean_at(lam, stage):
        stages.append(stage)
        return -abs(lam - peak)

    best, warnings = grid_search(mean_at, default_lambda=1.0)
    assert abs(best - peak) <= 0.05 + 1e-9  # within one step of a 0.05 grid
    assert warnings == [] and "refine" in stages and len(stages) <= 27


@pytest.mark.parametrize("peak", [3.0, 0.02, 100.0, 1e-4])
def test_grid_search_extends_an_edge_and_warns(peak):
    tried = {}

    def mean_at(lam, stage):
        tried[lam] = stage
        return -abs(lam - peak)

    best, [warning] = grid_search(mean_at, default_lambda=0.25)
    extreme = max(tried) if peak > 1 else min(tried)
    assert tried[extreme] == "edge" and f"{extreme:g}" in warning
    if 0.005 < peak < 8:  # reached: the best is interior again and refined
        assert abs(best - peak) < 0.2 * peak and "refine" in tried.values() and "extended" in warning
    else:  # the extension stops at its limit
        assert best == extreme and "beyond" in warning and 0.005 <= extreme <= 8


def test_grid_search_refines_around_the_second_best_coarse_point_too():
    """The image setting's ties curve: coarse best at 0.2, a narrow higher peak at 0.5 between 0.4 and 0.6."""
    curve = {0.2: 28.24, 0.3: 27.8, 0.4: 28.08, 0.5: 29.53, 0.6: 27.79}
    best, _ = grid_search(lambda lam, stage: curve.get(lam, 20.0), default_lambda=1.0)
    assert best == 0.5


def test_a_given_grid_is_taken_as_is_and_its_edge_warns():
    best, [warning] = grid_search(lambda lam, stage: lam, default_lambda=1.0, grid=[0.1, 0.2])
    assert best == 0.2 and "edge of the given grid" in warning
    assert grid_search(lambda lam, stage: -abs(lam - 0.2), 1.0, grid=[0.1, 0.2, 0.3]) == (0.2, [])


def test_tune_lambda_scales_one_merge(text, tmp_path):
    setting, adapters, engine = text
    config = MergeConfig(merger="ties")
    chosen, records = tune_lambda(adapters, config, None, setting.tasks_file, grid=[0.0, 0.5, 1.0, 1.5],
                                  run_dir=tmp_path, evaluator=engine)
    assert [r["lambda"] for r in records] == [0.0, 0.5, 1.0, 1.5]
    assert records[0]["accuracy"] == engine.score_base()  # λ = 0 is the base model
    direct = engine.score_merged(merge(adapters, MergeConfig(merger="ties", lam=1.5)))
    assert records[3]["accuracy"] == direct  # rescaling the λ = 1 merge equals merging at λ
    experts = expert_scores(engine, ScoreCache(tmp_path))
    for record in records:
        normalized, _ = normalized_accuracy(record["accuracy"], experts)
        assert record["normalized_accuracy"] == normalized
    assert chosen == best_lambda(records, default_lambda=1.0)


def test_tune_lambda_default_grid_builds_its_own_engine(text):
    setting, adapters, _ = text
    search = search_lambda(adapters, MergeConfig(merger="ta"), None, setting.tasks_file, val_limit=4,
                           batch_size=4, threads=1)
    default = 1 / 3
    tried = [r["lambda"] for r in search.records]
    assert tried[:len(coarse_grid(default))] == coarse_grid(default)
    assert {r["stage"] for r in search.records} <= {"coarse", "edge", "refine"}
    best = max(r["mean_normalized_accuracy"] for r in search.records)
    winners = [r["lambda"] for r in search.records if r["mean_normalized_accuracy"] == best]
    assert search.best == min(winners, key=lambda lam: (abs(lam - default), lam))
    described = search.describe()
    assert described["best"] == search.best and described["best_mean_normalized_accuracy"] == best
    assert [r["lambda"] for r in described["grid"]] == sorted(tried)


def choice_log_likelihoods(base, adapter_folder, prompts, choices):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter_folder)).eval()
    out = torch.zeros(len(prompts), len(choices), dtype=torch.float64)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            context = tokenizer(prompt)["input_ids"]
            for c, choice in enumerate(choices):
                continuation = tokenizer(choice, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([context + continuation])
                log_probs = model(input_ids=ids).logits[0].float().log_softmax(-1)
                positions = range(len(context) - 1, len(context) + len(continuation) - 1)
                out[i, c] = sum(float(log_probs[p, t]) for p, t in zip(positions, continuation))
    return out


def test_causal_lm_choices_on_conv1d_adapters(tmp_path):
    base = build_gpt2_lm(tmp_path / "gpt2")
    folders = {
        name: save_peft_adapter(base, tmp_path / name, ["c_attn", "c_proj"], "GPT2LMHeadModel", "CAUSAL_LM",
                                seed=seed, fan_in_fan_out=True)
        for name, seed in (("wiki", 1), ("code", 2))
    }
    tasks = []
    for name in folders:
        rows = text_rows(9, seed=len(name), num_labels=2)
        rows = [{**row, "answer": ["yes", "no"][row["label"]]} for row in rows]
        tasks.append({"name": name, "data": {"validation": str(write_jsonl(tmp_path / f"{name}.jsonl", rows))},
                      "prompt": "{premise} ? {hypothesis} :", "choices": CHOICES, "label": "answer",
                      "labels": ["yes", "no"]})
    tasks_file = write_tasks_file(tmp_path / "tasks.yaml", {"base_model": str(base), "model_type": "causal-lm",
                                                            "tasks": tasks})
    adapters = load_adapters([f"{name}={folder}" for name, folder in folders.items()])
    assert all(m.fan_in_fan_out for a in adapters for m in a.modules.values())
    engine = Evaluator(load_task_file(tasks_file), adapters, SETTINGS)
    for adapter in adapters:
        examples = engine.examples[adapter.name]
        reference = choice_log_likelihoods(base, folders[adapter.name], examples.inputs, CHOICES)
        with engine.apply(adapter_deltas(adapter)):
            scores = engine.scores(adapter.name)
        assert torch.allclose(scores, reference, atol=1e-4, rtol=0)
        assert engine.score_adapter(adapter, [adapter.name])[adapter.name] == accuracy(reference, examples.labels)
    from loramerge_cli.adapters.writer import write_merged_adapter

    result = merge(adapters, MergeConfig(merger="ta"))
    folder = write_merged_adapter(result, adapters, tmp_path / "merged")
    for adapter in adapters:  # the merged folder, loaded back by PEFT
        examples = engine.examples[adapter.name]
        merged = choice_log_likelihoods(base, folder, examples.inputs, CHOICES)
        with engine.apply(merged_deltas(result)):
            assert torch.allclose(engine.scores(adapter.name), merged, atol=1e-4, rtol=0)
        assert engine.score_merged(result, [adapter.name])[adapter.name] == accuracy(merged, examples.labels)
    normalized = Evaluator(load_task_file(tasks_file), adapters, EvalSettings(threads=1, length_normalize=True))
    with normalized.apply(adapter_deltas(adapters[-1])):
        per_token = normalized.scores(adapters[-1].name)
    assert torch.allclose(per_token, reference / torch.tensor([1.0, 2.0], dtype=torch.float64), atol=1e-4, rtol=0)


def test_image_classification_from_a_folder_tree(tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    base = build_vit_classifier(tmp_path / "vit")
    linear = [name for name, module in AutoModelForImageClassification.from_pretrained(str(base)).named_modules()
              if isinstance(module, torch.nn.Linear) and ".attention." in name]
    targets = sorted({name.rsplit(".", 1)[1] for name in linear})
    folder = save_peft_adapter(base, tmp_path / "shapes", targets, "AutoModelForImageClassification", None, seed=5,
                               head_modules=["classifier"])
    generator = torch.Generator().manual_seed(0)
    for label, class_name in enumerate(("circle", "square", "star")):
        (tmp_path / "images" / class_name).mkdir(parents=True)
        for index in range(4):
            pixels = (torch.rand(8, 8, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / class_name / f"{index}.png")
    tasks_file = write_tasks_file(tmp_path / "tasks.yaml", {
        "base_model": str(base), "model_type": "image-classification",
        "tasks": [{"name": "shapes", "data": {"validation": "images"}, "labels": ["circle", "square", "star"]}],
    })
    adapter = load_adapter(f"shapes={folder}")
    assert set(adapter.heads) == {"classifier.weight", "classifier.bias"}
    engine = Evaluator(load_task_file(tasks_file), [adapter], SETTINGS)
    processor = AutoImageProcessor.from_pretrained(str(base))
    paths = engine.examples["shapes"].inputs
    inputs = [processor(images=Image.open(path).convert("RGB"), return_tensors="pt") for path in paths]
    reference = peft_classifier_logits(base, folder, inputs, model_class="AutoModelForImageClassification")
    with engine.apply(adapter_deltas(adapter)):
        assert torch.allclose(engine.scores("shapes"), reference, atol=1e-5, rtol=0)
    assert engine.score_adapter(adapter)["shapes"] == accuracy(reference, engine.examples["shapes"].labels)


def test_accuracy_sets_masked_classes_to_minus_infinity():
    scores = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 5.0, -1.0]])
    assert accuracy(scores, [2, 0, 0]) == pytest.approx(1 / 3)
    assert accuracy(scores, [2, 0, 0], masked_labels=[1]) == 1.0
    assert scores[0, 1] == 2.0  # the caller's tensor is untouched


def test_a_tensor_only_one_head_has_is_reset_for_the_other_tasks(text, tmp_path):
    import yaml
    from safetensors.torch import save_file

    setting, adapters, _ = text
    extra = torch.full((16,), 3.0)
    head = {"base_model.model.score.weight": adapters[1].heads["score.weight"],
            "base_model.model.model.norm.weight": extra}
    save_file(head, str(tmp_path / "beta_head.safetensors"))
    content = yaml.safe_load(setting.tasks_file.read_text())
    content["tasks"][1]["head"] = str(tmp_path / "beta_head.safetensors")
    engine = Evaluator(load_task_file(write_tasks_file(tmp_path / "tasks.yaml", content)), adapters, SETTINGS)
    original = engine.parameters["model.norm.weight"].detach().clone()
    assert not torch.equal(original, extra)
    engine.use_head("beta")
    assert torch.equal(engine.parameters["model.norm.weight"], extra)
    engine.use_head("alpha")
    assert torch.equal(engine.parameters["model.norm.weight"], original)
    assert torch.equal(engine.parameters["score.weight"], adapters[0].heads["score.weight"])


def test_max_length_comes_from_the_task_then_the_flag_then_the_model(text, tmp_path):
    from dataclasses import replace
    from types import SimpleNamespace

    import yaml

    from loramerge_cli.evaluation.task_types.base import model_max_length

    setting, adapters, engine = text
    assert engine.max_lengths == {"alpha": 64, "beta": 64, "gamma": 64}  # tokenizer and config both say 64
    content = yaml.safe_load(setting.tasks_file.read_text())
    content["tasks"][0]["max_length"] = 5
    tasks_file = write_tasks_file(tmp_path / "tasks.yaml", content)
    capped = Evaluator(load_task_file(tasks_file), adapters, replace(SETTINGS, max_length=6))
    assert capped.max_lengths == {"alpha": 5, "beta": 6, "gamma": 6}
    for task, cap in capped.max_lengths.items():
        assert max(batch.inputs["input_ids"].shape[1] for batch in capped.prepared[task].batches) == cap
    assert capped.fingerprint("beta") != engine.fingerprint("beta")  # cached scores are not reused
    tokenizer = SimpleNamespace(model_max_length=int(1e30))  # a tokenizer that states no limit
    assert model_max_length(tokenizer, SimpleNamespace(max_position_embeddings=128)) == 128
    assert model_max_length(SimpleNamespace(model_max_length=512), SimpleNamespace()) == 512
    assert model_max_length(tokenizer, SimpleNamespace()) == 2048


def test_a_task_type_is_one_class_in_the_registry(text, tmp_path, monkeypatch):
    """A toy type (classify on the first text column only) registered in TASK_TYPES alone: the spec accepts
    it and the engine reads, batches and scores with it, as the built-in type does on that column."""
    import json
    from importlib import resources

    import yaml

    from loramerge_cli.evaluation.task_types import TASK_TYPES
    from loramerge_cli.evaluation.task_types.sequence_classification import SequenceClassification

    shipped = json.loads(resources.files("loramerge_cli").joinpath("schemas/tasks.schema.json").read_text())
    assert shipped["properties"]["model_type"]["enum"] == list(TASK_TYPES)  # the file lists the built-ins

    class FirstColumn(SequenceClassification):
        name = "first-column-classification"

        def read_input(self, row, source, task_file, task):
            return (str(row[task.text[0]]),)

    setting, adapters, _ = text
    content = yaml.safe_load(setting.tasks_file.read_text())
    with pytest.raises(LoramergeError, match="model_type"):
        load_task_file(write_tasks_file(tmp_path / "toy.yaml", {**content, "model_type": FirstColumn.name}))
    monkeypatch.setitem(TASK_TYPES, FirstColumn.name, FirstColumn())
    toy = Evaluator(load_task_file(tmp_path / "toy.yaml"), adapters, SETTINGS)
    premise_only = {**content, "tasks": [{**task, "text": ["premise"]} for task in content["tasks"]]}
    plain = Evaluator(load_task_file(write_tasks_file(tmp_path / "plain.yaml", premise_only)), adapters, SETTINGS)
    assert toy.examples["alpha"].inputs == plain.examples["alpha"].inputs
    assert toy.score_adapter(adapters[0]) == plain.score_adapter(adapters[0])


def test_a_task_type_brings_its_own_metric(text, monkeypatch):
    """A type's `metric` is what every score reports: here the label among the two best classes."""
    from loramerge_cli.evaluation.task_types import TASK_TYPES
    from loramerge_cli.evaluation.task_types.sequence_classification import SequenceClassification

    class TopTwo(SequenceClassification):
        def metric(self, scores, labels, task):
            best = scores.topk(2, dim=-1).indices
            return float((best == torch.tensor(labels)[:, None]).any(dim=-1).double().mean())

    setting, adapters, _ = text
    task_file = load_task_file(setting.tasks_file)
    plain = Evaluator(task_file, adapters, SETTINGS)
    accuracy = plain.score_adapter(adapters[0])
    monkeypatch.setitem(TASK_TYPES, task_file.type.name, TopTwo())
    top_two = Evaluator(load_task_file(setting.tasks_file), adapters, SETTINGS)
    scores = top_two.score_adapter(adapters[0])
    with top_two.apply(adapter_deltas(adapters[0])):
        expected = {task: TopTwo().metric(top_two.scores(task), top_two.examples[task].labels, None)
                    for task in top_two.task_file.names}
    assert scores == expected and all(scores[task] >= accuracy[task] for task in scores)
    assert scores != accuracy  # the metric differs on this data
