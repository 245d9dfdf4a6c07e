"""Merge -> write -> `PeftModel.from_pretrained` round trips on tiny real models, a peer check against
PEFT's own `add_weighted_adapter`, and DARE's order- and mask-independence (docs/algorithms.md, Inputs and Methods)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from factories import attention_shapes, random_adapter
from tiny_models import BUILDERS, token_inputs, patched_forward, save_lora

from loramerge_cli.adapters.peft_reader import load_adapter
from loramerge_cli.adapters.writer import write_merged_adapter
from loramerge_cli.masks import ones_table
from loramerge_cli.merging import elementwise
from loramerge_cli.merging.merge import MergeConfig, merge

slow = pytest.mark.slow


def reference_deltas(adapters, weights, lam: float) -> dict[str, torch.Tensor]:
    """λ Σ_t w_t s_t B_t A_t per module, from each input's own dense ΔW (float64)."""
    deltas: dict[str, torch.Tensor] = {}
    for adapter, weight in zip(adapters, weights):
        for path, module in adapter.modules.items():
            deltas[path] = deltas.get(path, 0) + lam * weight * module.delta()
    return deltas


def merged_deltas(result) -> dict[str, torch.Tensor]:
    return {path: module.lora_B @ module.lora_A for path, module in result.modules.items()}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(actual - expected) / torch.linalg.matrix_norm(expected))


def load_merged(model_kind: str, folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(BUILDERS[model_kind](), str(folder)).eval()


@slow
@pytest.mark.parametrize("space", ["full", "knots", "core"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_identity_merge_reproduces_the_adapter(llama_task_dirs, gpt2_task_dirs, family, space):
    folder = {"llama": llama_task_dirs["rte"], "gpt2": gpt2_task_dirs["wiki"]}[family]
    adapter = load_adapter(str(folder))

    result = merge([adapter], MergeConfig(merger="ta", lam=1.0, space=space))

    assert sorted(result.modules) == sorted(adapter.modules)
    for path, delta in merged_deltas(result).items():
        assert relative_error(delta, adapter.modules[path].delta()) < 1e-6, path
        assert result.modules[path].fan_in_fan_out == (family == "gpt2")


@slow
def test_llama_merge_loads_in_peft_and_matches_hand_patched_weights(llama_task_dirs, tmp_path):
    adapters = [load_adapter(f"{name}={folder}") for name, folder in llama_task_dirs.items()]
    result = merge(adapters, MergeConfig(merger="ta"))  # λ = 1/T
    assert result.settings.lam == 0.5
    out = write_merged_adapter(result, adapters, tmp_path / "merged")

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is False
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]  # no --head: the first task's
    loaded = load_merged("llama", out)
    inputs = token_inputs()
    with torch.no_grad():
        logits = loaded(**inputs).logits

    deltas = reference_deltas(adapters, [1.0, 1.0], 0.5)
    head = {"score.weight": adapters[0].heads["score.weight"]}
    expected = patched_forward(BUILDERS["llama"](), deltas, inputs, head=head)
    base = patched_forward(BUILDERS["llama"](), {}, inputs, head=head)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert (expected - base).abs().max() > 1e-2  # the merged update really changes the output
    for path, delta in deltas.items():  # and PEFT's own view of each module's update agrees
        layer = loaded.base_model.model.get_submodule(path)
        torch.testing.assert_close(layer.get_delta_weight("default").double(), delta, rtol=1e-5, atol=1e-6)


@slow
def test_head_option_serves_that_tasks_head(llama_task_dirs, tmp_path):
    adapters = [load_adapter(f"{name}={folder}") for name, folder in llama_task_dirs.items()]
    result = merge(adapters, MergeConfig(merger="ta", weights=[0.8, 1.3], lam=1.0))
    out = write_merged_adapter(result, adapters, tmp_path / "merged", head="mnli")

    loaded = load_merged("llama", out)
    score = loaded.base_model.model.score
    active_head = score.modules_to_save[score.active_adapter].weight
    mnli_head = adapters[1].heads["score.weight"]
    torch.testing.assert_close(active_head, mnli_head, rtol=0, atol=0)
    assert not torch.equal(mnli_head, adapters[0].heads["score.weight"])

    inputs = token_inputs(seed=1)
    with torch.no_grad():
        logits = loaded(**inputs).logits
    deltas = reference_deltas(adapters, [0.8, 1.3], 1.0)
    expected = patched_forward(BUILDERS["llama"](), deltas, inputs, head={"score.weight": mnli_head})
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert sorted(p.name for p in (out / "heads").iterdir()) == ["mnli.safetensors", "rte.safetensors"]


@slow
def test_gpt2_conv1d_merge_loads_in_peft_and_matches_hand_patched_weights(gpt2_task_dirs, tmp_path):
    adapters = [load_adapter(f"{name}={folder}") for name, folder in gpt2_task_dirs.items()]
    result = merge(adapters, MergeConfig(merger="ta", weights=[0.7, -0.4], lam=1.0))
    out = write_merged_adapter(result, adapters, tmp_path / "merged")

    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    loaded = load_merged("gpt2", out)
    inputs = token_inputs(seed=2)
    with torch.no_grad():
        logits = loaded(**inputs).logits

    deltas = reference_deltas(adapters, [0.7, -0.4], 1.0)
    expected = patched_forward(BUILDERS["gpt2"](), deltas, inputs)  # Conv1D weights get ΔWᵀ
    base = patched_forward(BUILDERS["gpt2"](), {}, inputs)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert (expected - base).abs().max() > 1e-2


@slow
def test_ta_merge_equals_peft_add_weighted_adapter_cat(tmp_path):
    from peft import PeftModel

    folders = {
        name: save_lora("llama", tmp_path / name, seed, r=rank, lora_alpha=alpha, target_modules=targets)
        for name, seed, rank, alpha, targets in [
            ("a", 31, 4, 8.0, ["q_proj", "v_proj", "o_proj"]),
            ("b", 32, 2, 5.0, ["q_proj", "v_proj", "up_proj"]),  # different ranks and partly different targets
        ]
    }
    weights = [0.6, 1.7]
    adapters = [load_adapter(f"{name}={folder}") for name, folder in folders.items()]
    ours = write_merged_adapter(merge(adapters, MergeConfig(merger="ta", weights=weights, lam=1.0)), adapters,
                                tmp_path / "ours")

    peer = PeftModel.from_pretrained(BUILDERS["llama"](), str(folders["a"]), adapter_name="a")
    peer.load_adapter(str(folders["b"]), adapter_name="b")
    peer.add_weighted_adapter(["a", "b"], weights, "merged", combination_type="cat")
    peer.set_adapter("merged")
    peer.eval()
    inputs = token_inputs(seed=3)
    with torch.no_grad():
        expected = peer(**inputs).logits
        logits = load_merged("llama", ours)(**inputs).logits

    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert (expected - patched_forward(BUILDERS["llama"](), {}, inputs)).abs().max() > 1e-2


def _dare_config(**overrides) -> MergeConfig:
    # out_rank = min(m, n): the dense DARE sum is kept whole, so factors compare exactly.
    return MergeConfig(merger="dare", drop_rate=0.4, seed=7, lam=1.0, out_rank=20, **overrides)


def test_dare_is_independent_of_module_order_and_of_other_tasks_pruning():
    shapes = attention_shapes(blocks=2, m=20, n=24)
    adapters = [random_adapter(name, shapes, rank=3, seed=seed) for seed, name in enumerate(["a", "b", "c"])]

    full = merged_deltas(merge(adapters, _dare_config()))

    # The dense reference: each task's ΔW with its own (seed, task, module) mask, summed.
    for path, delta in full.items():
        expected = sum(elementwise.dare(a.modules[path].delta(), 0.4, 7, a.name, path) for a in adapters)
        assert relative_error(delta, expected) < 1e-10, path
        assert not torch.allclose(delta, sum(a.modules[path].delta() for a in adapters))

    # Fewer modules (a different processing order and set) give the same result per module.
    last = "model.layers.1.self_attn.v_proj"
    alone = [replace(a, modules={last: a.modules[last]}) for a in adapters]
    torch.testing.assert_close(merged_deltas(merge(alone, _dare_config()))[last], full[last], rtol=1e-12, atol=1e-12)

    # Pruning task c in block 1 leaves a's and b's masks there untouched: block 1 equals merging a and b alone.
    table = ones_table(adapters)
    table.weights[2][table.units.index("model.layers.1")] = 0.0
    pruned = merged_deltas(merge(adapters, _dare_config(), table=table))
    pair = merged_deltas(merge(adapters[:2], _dare_config()))
    for path in shapes:
        if path.startswith("model.layers.1."):
            torch.testing.assert_close(pruned[path], pair[path], rtol=1e-12, atol=1e-12)
        else:
            torch.testing.assert_close(pruned[path], full[path], rtol=1e-12, atol=1e-12)


def _build_tiny_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "build_tiny.py"
    spec = importlib.util.spec_from_file_location("build_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@slow
def test_tiny_example_is_deterministic_merges_and_loads(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from loramerge_cli.adapters.peft_reader import load_adapters

    build_tiny = _build_tiny_module()
    first = build_tiny.build(tmp_path / "one")
    second = build_tiny.build(tmp_path / "two")
    names = ["rte", "mnli", "qnli"]
    adapters = load_adapters([str(first / "adapters" / name) for name in names])
    again = load_adapters([str(second / "adapters" / name) for name in names])
    assert [a.name for a in adapters] == names
    assert [a.source.sha256 for a in adapters] == [a.source.sha256 for a in again]
    assert adapters[0].base_model == str(first / "base")
    assert adapters[2].modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(6 / 8**0.5)
    assert all(float(m.lora_B.abs().min()) > 0 for a in adapters for m in a.modules.values())

    result = merge(adapters, MergeConfig(merger="ta"))
    out = write_merged_adapter(result, adapters, tmp_path / "merged", head="rte")
    base = AutoModelForSequenceClassification.from_pretrained(str(first / "base")).eval()
    inputs = {"input_ids": torch.arange(3, 11).reshape(2, 4)}
    with torch.no_grad():
        before = base(**inputs).logits
        merged = PeftModel.from_pretrained(base, str(out)).eval()(**inputs).logits
    assert torch.isfinite(merged).all()
    assert (merged - before).abs().max() > 1e-2
