"""RegMean (issue 14): the factored kernel against the dense float64 formula, the input Gram matrices against
a plain PEFT forward with hooks, and `merge --merger regmean` end to end (it reads the tasks' inputs)."""

from __future__ import annotations

import json

import pytest
import torch
from eval_fixtures import build_text_setting
from factories import invoke_cli

from loramerge_cli import api
from loramerge_cli.errors import LoramergeError
from loramerge_cli.merging.lowrank import LowRank
from loramerge_cli.merging.merge import MergeConfig, merge
from loramerge_cli.merging.regmean import regmean, shrunk


def _tasks_and_grams(m=7, n=9, ranks=(2, 3, 1), seed=0, singular=False):
    generator = torch.Generator().manual_seed(seed)
    tasks, grams = [], []
    for rank in ranks:
        tasks.append(LowRank(torch.randn(m, rank, generator=generator, dtype=torch.float64),
                             torch.randn(rank, n, generator=generator, dtype=torch.float64)))
        inputs = torch.randn(20, n, generator=generator, dtype=torch.float64)
        if singular:
            inputs[:, 0] = 0.0  # a feature no task uses
        grams.append(inputs.T @ inputs / 20)
    return tasks, grams


@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.0])
def test_factored_regmean_equals_the_dense_formula(alpha):
    tasks, grams = _tasks_and_grams()
    merged = regmean(tasks, grams, alpha)
    shrunk_grams = [shrunk(gram, alpha) for gram in grams]
    dense = sum(t.dense() @ g for t, g in zip(tasks, shrunk_grams)) @ torch.linalg.inv(sum(shrunk_grams))
    assert merged.right.shape[0] == sum(t.right.shape[0] for t in tasks)  # rank ≤ Σ r_t, no SVD
    assert torch.linalg.norm(merged.dense() - dense) / torch.linalg.norm(dense) < 1e-10
    # the least-squares optimum: Σ_t (W − ΔW_t) G̃_t = 0
    gradient = sum((merged.dense() - t.dense()) @ g for t, g in zip(tasks, shrunk_grams))
    assert torch.linalg.norm(gradient) < 1e-10 * torch.linalg.norm(dense)


def test_equal_grams_give_the_mean_and_a_dead_feature_is_handled():
    tasks, grams = _tasks_and_grams()
    same = regmean(tasks, [grams[0]] * len(tasks), 0.9)
    mean = sum(t.dense() for t in tasks) / len(tasks)
    assert torch.allclose(same.dense(), mean, atol=1e-12)
    tasks, grams = _tasks_and_grams(singular=True)
    merged = regmean(tasks, grams, 0.9)
    assert torch.isfinite(merged.dense()).all()
    assert torch.allclose(merged.dense()[:, 0], torch.zeros(merged.shape[0], dtype=torch.float64))


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    return build_text_setting(tmp_path_factory.mktemp("regmean"))


def test_grams_equal_a_peft_forward_with_hooks(setting):
    """G_t of every module = XᵀX / N over task t's non-padding tokens, through task t's own expert."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from loramerge_cli.evaluation.grams import collect_grams
    from loramerge_cli.merging.merge import module_paths

    adapters = api.load_adapters(setting.adapter_args())
    engine = api.TaskData(setting.tasks_file, batch_size=5).evaluator(adapters, threads=1)
    paths = module_paths(adapters)
    grams = collect_grams(engine, adapters, paths)
    index = 1
    name = adapters[index].name
    base = AutoModelForSequenceClassification.from_pretrained(str(setting.base), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(setting.adapters[name])).eval()
    captured = {path: [] for path in paths}
    mask = {}

    def hook(path):
        def record(module, inputs):
            captured[path].append(inputs[0][mask["now"].bool()].double())
        return record

    handles = [model.get_submodule(f"base_model.model.{path}").register_forward_pre_hook(hook(path))
               for path in paths]
    with torch.no_grad():
        for batch in engine.prepared[name].batches:
            mask["now"] = batch.inputs["attention_mask"]
            model(input_ids=batch.inputs["input_ids"], attention_mask=batch.inputs["attention_mask"])
    for handle in handles:
        handle.remove()
    for path in paths:
        inputs = torch.cat(captured[path])
        expected = inputs.T @ inputs / inputs.shape[0]
        assert torch.allclose(grams[path][index], expected, rtol=1e-4, atol=1e-6), path


def test_merge_regmean_end_to_end(setting, tmp_path):
    sources = setting.adapter_args()
    refused = invoke_cli(["merge", "--adapters", *sources, "--merger", "regmean", "--out", tmp_path / "no"])
    assert refused.exit_code == 2 and "--tasks" in refused.stderr and refused.stderr.count("\n") == 1
    assert not (tmp_path / "no").exists()
    with pytest.raises(LoramergeError, match="--tasks"):
        merge(api.load_adapters(sources), MergeConfig(merger="regmean"))
    for space in ("knots", "core"):
        wrong = invoke_cli(["merge", "--adapters", *sources, "--merger", "regmean", "--space", space,
                            "--tasks", setting.tasks_file, "--out", tmp_path / "no"])
        assert wrong.exit_code == 2 and "full" in wrong.stderr
    out = tmp_path / "merged"
    result = invoke_cli(["merge", "--adapters", *sources, "--merger", "regmean", "--tasks", setting.tasks_file,
                         "--val-limit", "12", "--out", out, "--quiet", "--threads", "1"])
    assert result.exit_code == 0, result.stderr
    adapters = api.load_adapters(sources)
    merged = api.load_adapter(str(out))
    engine = api.TaskData(setting.tasks_file, val_limit=12).evaluator(adapters, threads=1)
    from loramerge_cli.evaluation.grams import collect_grams
    from loramerge_cli.merging.merge import module_paths

    grams = collect_grams(engine, adapters, module_paths(adapters))
    for path, module in merged.modules.items():
        tasks = [LowRank(*a.modules[path].factors(torch.float64)) for a in adapters]
        expected = regmean(tasks, grams[path], 0.9).dense()
        assert torch.allclose(module.delta().double(), expected, rtol=1e-4, atol=1e-6), path
    tuned = invoke_cli(["merge", "--adapters", *sources, "--merger", "regmean", "--tasks", setting.tasks_file,
                        "--val-limit", "12", "--lambda", "auto", "--out", tmp_path / "tuned", "--json",
                        "--threads", "1"])
    assert tuned.exit_code == 0, tuned.stderr
    provenance = json.loads((tmp_path / "tuned" / "loramerge.json").read_text())
    assert provenance["input_statistics"]["examples"] == {name: 12 for name in setting.adapters}
    assert provenance["input_statistics"]["max_length"] == provenance["lambda_tuning"]["max_length"]  # (the cap
    assert set(provenance["input_statistics"]["max_length"]) == set(setting.adapters)  # the Gram matrices used)
    assert provenance["lambda_tuning"]["best"] > 0
    invalid = invoke_cli(["search-mask", "--strategy", "screened",
                          "--adapters", *sources, "--merger", "regmean", "--tasks",
                          setting.tasks_file, "--out", tmp_path / "mask.json"])
    assert invalid.exit_code == 2 and "regmean" in invalid.stderr


def test_grams_keep_no_layer_input_alive(setting):
    """Each distinct input's XᵀX is computed once (a block's q, k and v read one tensor); a first version kept
    every layer's input (and its Gram) until the batch ended: on an 8B model, gigabytes of device memory. At the
    model's last LoRA module only what its layer is computing with is alive (that module's input and the
    layer's attention input, which the residual still holds): 2, where the first version kept 4 here."""
    import weakref

    from loramerge_cli.evaluation import grams as grams_module
    from loramerge_cli.merging.merge import module_paths

    adapters = api.load_adapters(setting.adapter_args())
    engine = api.TaskData(setting.tasks_file, batch_size=5).evaluator(adapters, threads=1)
    paths = module_paths(adapters)
    seen, alive = [], []
    def remember(module, inputs):
        seen.append(weakref.ref(inputs[0]))

    handles = [engine.modules[path].register_forward_pre_hook(remember) for path in paths]
    last = engine.modules[paths[-1]]
    handles.append(last.register_forward_hook(lambda *args: alive.append(sum(ref() is not None for ref in seen))))
    try:
        grams_module.collect_grams(engine, adapters[:1], paths)
    finally:
        for handle in handles:
            handle.remove()
    assert alive and max(alive) <= 2, alive
