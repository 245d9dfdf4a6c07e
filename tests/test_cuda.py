"""The GPU path: every engine path on `cuda` gives the CPU's results (accuracies within one example per task,
the same search tables for the same seed), in float32 and the half-precision dtypes. Marked `cuda`: these run
where torch.cuda.is_available() and are skipped elsewhere (conftest.py). benchmarks/gpu_check.sh does the
same on the bundled example."""

import os
from dataclasses import replace

import pytest
import torch
from eval_fixtures import build_gpt2_lm, build_text_setting, save_peft_adapter, text_rows, write_jsonl, write_tasks_file
from factories import invoke_cli

from loramerge_cli.adapters.peft_reader import load_adapters
from loramerge_cli.evaluation.cache import ScoreCache, expert_scores
from loramerge_cli.evaluation.engine import EvalSettings, Evaluator, adapter_deltas
from loramerge_cli.evaluation.specs import load_task_file
from loramerge_cli.merging.merge import MergeConfig
from loramerge_cli.search.enmp import EnmpSettings
from loramerge_cli.search.nsc import NscSettings
from loramerge_cli.search.runner import SearchRequest, run_search

pytestmark = [pytest.mark.cuda, pytest.mark.slow]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    return build_text_setting(tmp_path_factory.mktemp("cuda"))


def request(setting, device="cpu", **changes) -> SearchRequest:
    base = SearchRequest(strategy="screened",
        adapters=setting.adapter_args(), merge=MergeConfig(merger="ties"), tasks=setting.tasks_file,
        eval=EvalSettings(threads=1, batch_size=8, device=device),
        enmp=EnmpSettings(popsize=6, generations=4, max_prune=0.5, seed=3),
    )
    return replace(base, **changes)


def within_one_example(a: dict, b: dict, engine) -> bool:
    return all(abs(a[task] - b[task]) * len(engine.examples[task]) <= 1 + 1e-9 for task in a)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_expert_accuracies_on_cuda_match_the_cpu(setting, dtype):
    adapters = load_adapters(setting.adapter_args())
    task_file = load_task_file(setting.tasks_file)
    cpu = Evaluator(task_file, adapters, EvalSettings(threads=1, batch_size=8))
    gpu = Evaluator(task_file, adapters, EvalSettings(threads=1, batch_size=8, device="cuda:0", dtype=dtype))
    assert next(gpu.model.parameters()).device.type == "cuda"
    assert within_one_example(expert_scores(gpu, ScoreCache()), expert_scores(cpu, ScoreCache()), cpu)
    before = {path: weight.clone() for path, weight in gpu.base_weights.items()}
    for adapter in adapters:
        with gpu.apply(adapter_deltas(adapter)):
            pass
    for path, weight in before.items():  # W0 restored bit for bit on the GPU
        assert torch.equal(gpu.modules[path].weight, weight)


def test_causal_lm_choices_on_cuda_match_the_cpu(tmp_path):
    base = build_gpt2_lm(tmp_path / "gpt2")
    folder = save_peft_adapter(base, tmp_path / "wiki", ["c_attn", "c_proj"], "GPT2LMHeadModel", "CAUSAL_LM",
                               seed=1, fan_in_fan_out=True)
    rows = [{**row, "answer": ["yes", "no"][row["label"]]} for row in text_rows(9, seed=4, num_labels=2)]
    task = {"name": "wiki", "data": {"validation": str(write_jsonl(tmp_path / "wiki.jsonl", rows))},
            "prompt": "{premise} ? {hypothesis} :", "choices": [" yes", " no w1"], "label": "answer",
            "labels": ["yes", "no"]}
    tasks_file = write_tasks_file(tmp_path / "tasks.yaml", {"base_model": str(base), "model_type": "causal-lm",
                                                            "tasks": [task]})
    adapters = load_adapters([f"wiki={folder}"])
    scores = {}
    for device in ("cpu", "cuda"):
        engine = Evaluator(load_task_file(tasks_file), adapters, EvalSettings(threads=1, batch_size=4, device=device))
        with engine.apply(adapter_deltas(adapters[0])):
            scores[device] = engine.scores("wiki")
    assert torch.allclose(scores["cuda"], scores["cpu"], atol=1e-3, rtol=0)


def test_enmp_search_on_cuda_finds_the_cpu_table(setting):
    cpu, _ = run_search(request(setting))
    gpu, provenance = run_search(request(setting, device="cuda:0"))
    assert gpu.weights == cpu.weights
    assert provenance["validation"]["fitness"] >= 0.0


def test_label_free_fitness_and_nsc_training_run_on_cuda(setting):
    nsc = NscSettings(steps=4, batch_size=8, lr=0.05)
    enmp = request(setting, fitness="nsc", nsc=nsc)
    cpu, _ = run_search(enmp)
    gpu, _ = run_search(request(setting, device="cuda:0", fitness="nsc", nsc=nsc))
    assert gpu.weights == cpu.weights
    trained = {device: run_search(request(setting, device=device, strategy="nsc", merge=MergeConfig(merger="ta"),
                                          nsc=nsc))[0] for device in ("cpu", "cuda:0")}
    assert torch.allclose(torch.tensor(trained["cuda:0"].weights), torch.tensor(trained["cpu"].weights), atol=1e-3)


def test_worker_processes_on_cuda_devices_equal_a_serial_cuda_search(setting):
    serial, _ = run_search(request(setting, device="cuda:0"))
    devices = [f"cuda:{index}" for index in range(torch.cuda.device_count())] * (2 // torch.cuda.device_count() or 1)
    spread, _ = run_search(request(setting, device="cuda:0", devices=devices[:2]))
    assert spread.weights == serial.weights


def test_a_parked_engine_frees_the_device_and_scores_the_same_after(setting):
    adapters = load_adapters(setting.adapter_args())
    engine = Evaluator(load_task_file(setting.tasks_file), adapters,
                       EvalSettings(threads=1, batch_size=8, device="cuda:0"))
    before = engine.score_adapter(adapters[0])
    held = torch.cuda.memory_allocated()
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    engine.park()
    assert next(engine._model.parameters()).device.type == "cpu"
    assert torch.cuda.memory_allocated() <= held - weights
    assert engine.score_adapter(adapters[0]) == before  # back on the device at its next use
    assert next(engine._model.parameters()).device.type == "cuda"
    assert all(copy.device.type == "cuda" for copy in engine.base_weights.values())


def test_ray_gpu_actors_equal_a_serial_cuda_search(setting):
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray = pytest.importorskip("ray")
    serial, _ = run_search(request(setting, device="cuda:0"))
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False)
    try:
        spread, _ = run_search(request(setting, device="cuda", backend="ray", devices=["cuda"]))
    finally:
        ray.shutdown()
    assert spread.weights == serial.weights


def test_cli_eval_on_cuda_in_half_precision(setting):
    result = invoke_cli(["eval", "--adapters", *setting.adapter_args(), "--tasks", str(setting.tasks_file),
                         "--device", "cuda:0", "--dtype", "bfloat16", "--json"])
    assert result.exit_code == 0, result.stderr
