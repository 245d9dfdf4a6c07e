"""Reading real PEFT adapters (docs/algorithms.md, Inputs): paths, scales, patterns, key variants, heads,
Conv1D, refusals.

Every adapter here is made by PEFT itself (`get_peft_model(...).save_pretrained`) on a tiny model
built in-process; the live PEFT model is the oracle for scales, ranks and ΔW.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import BUILDERS, peft_lora, save_lora

from loramerge_cli.adapters.peft_reader import load_adapter
from loramerge_cli.errors import LoramergeError

pytestmark = pytest.mark.slow


def live_lora_layers(peft_model, adapter_name: str = "default") -> dict:
    """Module path (relative to the base model) -> PEFT LoraLayer, for every layer carrying the adapter."""
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix("base_model.model."): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    }


def assert_matches_live(adapter, peft_model, adapter_name: str = "default") -> None:
    """Same module paths, ranks, scales and ΔW as the live PEFT model (PEFT's ΔW is in W0's layout)."""
    live = live_lora_layers(peft_model, adapter_name)
    assert sorted(adapter.modules) == sorted(live)
    for path, layer in live.items():
        ours = adapter.modules[path]
        assert ours.rank == layer.r[adapter_name], path
        assert ours.scale == pytest.approx(layer.scaling[adapter_name], rel=1e-12), path
        expected = layer.get_delta_weight(adapter_name).double()
        delta = ours.delta().T if ours.fan_in_fan_out else ours.delta()
        torch.testing.assert_close(delta, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_llama_paths_scales_and_patterns_match_peft(tmp_path, use_rslora):
    config = dict(
        r=4,
        lora_alpha=8,
        use_rslora=use_rslora,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 3},
        alpha_pattern={"v_proj": 5, "^model.layers.0.mlp.down_proj": 7},
    )
    peft_model = peft_lora(BUILDERS["llama"](), seed=3, **config)
    peft_model.save_pretrained(str(tmp_path))

    adapter = load_adapter(str(tmp_path))

    assert adapter.name == tmp_path.name
    assert adapter.source.kind == "dir"
    assert_matches_live(adapter, peft_model)
    # The patterns really produced different ranks and scales, so the comparison above means something.
    assert adapter.modules["model.layers.1.self_attn.q_proj"].rank == 2
    assert adapter.modules["model.layers.0.mlp.down_proj"].rank == 3
    assert adapter.modules["model.layers.0.mlp.down_proj"].alpha == 7
    assert adapter.modules["model.layers.1.mlp.down_proj"].alpha == 8
    def divisor(rank: int) -> float:
        return rank**0.5 if use_rslora else rank

    assert adapter.modules["model.layers.1.self_attn.v_proj"].scale == pytest.approx(5 / divisor(4))
    assert adapter.modules["model.layers.1.mlp.down_proj"].scale == pytest.approx(8 / divisor(3))
    assert adapter.units == ["model.layers.0", "model.layers.1"]


def test_llama_task_head_is_read_from_modules_to_save(tmp_path):
    peft_model = peft_lora(BUILDERS["llama"](), seed=4, r=2, target_modules=["q_proj"], task_type="SEQ_CLS")
    peft_model.save_pretrained(str(tmp_path))

    adapter = load_adapter(f"rte={tmp_path}")

    assert adapter.name == "rte"
    assert list(adapter.heads) == ["score.weight"]
    assert adapter.head_modules == ["score"]
    trained = peft_model.base_model.model.score.modules_to_save["default"].weight
    torch.testing.assert_close(adapter.heads["score.weight"], trained.detach(), rtol=0, atol=0)
    assert not torch.equal(adapter.heads["score.weight"], BUILDERS["llama"]().score.weight)
    assert_matches_live(adapter, peft_model)


def _rekey(key: str, variant: str) -> str:
    if ".lora_" not in key:
        return key
    head, tail = key.split(".lora_", 1)
    factor, param = tail.split(".", 1)
    if variant == "adapter_name":  # as in a full PeftModel state_dict
        return f"{head}.lora_{factor}.default.{param}"
    if variant == "base_layer":  # the LoRA factors hanging off a `base_layer` path
        return f"{head}.base_layer.lora_{factor}.{param}"
    if variant == "no_prefix":  # keys relative to the base model
        return f"{head.removeprefix('base_model.model.')}.lora_{factor}.{param}"
    raise AssertionError(variant)


@pytest.mark.parametrize("variant", ["adapter_name", "base_layer", "no_prefix"])
def test_key_variants_read_the_same_modules(llama_task_dirs, tmp_path, variant):
    original = load_adapter(str(llama_task_dirs["rte"]))
    tensors = load_file(str(llama_task_dirs["rte"] / "adapter_model.safetensors"))
    rekeyed = {_rekey(key, variant): value for key, value in tensors.items()}
    save_file(rekeyed, str(tmp_path / "adapter_model.safetensors"))
    shutil.copy(llama_task_dirs["rte"] / "adapter_config.json", tmp_path / "adapter_config.json")

    adapter = load_adapter(str(tmp_path))

    assert list(adapter.modules) == list(original.modules)
    for path, module in adapter.modules.items():
        assert torch.equal(module.lora_A, original.modules[path].lora_A)
        assert torch.equal(module.lora_B, original.modules[path].lora_B)
        assert module.scale == original.modules[path].scale == 2.0
    assert list(adapter.heads) == ["score.weight"]


def test_non_default_adapter_name_saved_by_peft(tmp_path):
    peft_model = peft_lora(
        BUILDERS["llama"](), seed=5, adapter_name="sst2", r=3, lora_alpha=6, target_modules=["k_proj"]
    )
    peft_model.save_pretrained(str(tmp_path))
    folder = tmp_path / "sst2"  # PEFT puts every adapter but "default" in a subfolder
    assert (folder / "adapter_model.safetensors").is_file()

    adapter = load_adapter(str(folder))

    assert adapter.name == "sst2"
    assert_matches_live(adapter, peft_model, "sst2")


def test_several_adapters_in_one_file_are_refused(llama_task_dirs, tmp_path):
    tensors = load_file(str(llama_task_dirs["rte"] / "adapter_model.safetensors"))
    both = {}
    for name in ("one", "two"):
        renamed = {_rekey(key, "adapter_name").replace(".default.", f".{name}."): v for key, v in tensors.items()}
        both.update({key: value.clone() for key, value in renamed.items()})  # safetensors refuses shared storage
    save_file(both, str(tmp_path / "adapter_model.safetensors"))
    shutil.copy(llama_task_dirs["rte"] / "adapter_config.json", tmp_path / "adapter_config.json")

    with pytest.raises(LoramergeError, match="several adapters"):
        load_adapter(str(tmp_path))


def test_gpt2_conv1d_delta_matches_peft(tmp_path):
    peft_model = peft_lora(
        BUILDERS["gpt2"](), seed=6, r=3, lora_alpha=5, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
    )
    peft_model.save_pretrained(str(tmp_path))

    adapter = load_adapter(str(tmp_path))

    c_attn = adapter.modules["transformer.h.0.attn.c_attn"]
    assert c_attn.fan_in_fan_out
    assert c_attn.shape == (48, 16)  # Linear orientation (d_out, d_in), although Conv1D stores (16, 48)
    assert adapter.modules["transformer.h.1.mlp.c_fc"].shape == (64, 16)
    assert adapter.units == ["transformer.h.0", "transformer.h.1"]
    assert_matches_live(adapter, peft_model)


def test_vit_adapter_paths_and_head(tmp_path):
    peft_model = peft_lora(
        BUILDERS["vit"](), seed=7, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
        modules_to_save=["classifier"],
    )
    peft_model.save_pretrained(str(tmp_path))

    adapter = load_adapter(str(tmp_path))

    assert adapter.units == ["vit.layers.0", "vit.layers.1"]
    assert sorted(adapter.heads) == ["classifier.bias", "classifier.weight"]
    assert_matches_live(adapter, peft_model)


def test_single_safetensors_file_with_and_without_config(llama_task_dirs, tmp_path):
    weights = llama_task_dirs["rte"] / "adapter_model.safetensors"
    with_config = load_adapter(str(weights))  # adapter_config.json lies beside it
    assert with_config.source.kind == "file"
    assert with_config.source.config_file is not None
    assert with_config.name == "adapter_model"
    assert {m.scale for m in with_config.modules.values()} == {2.0}  # α = 8, r = 4

    alone = tmp_path / "rte_only.safetensors"
    shutil.copy(weights, alone)
    bare = load_adapter(str(alone))
    assert bare.name == "rte_only"
    assert bare.source.config_file is None
    assert bare.config == {}
    assert {m.scale for m in bare.modules.values()} == {1.0}  # no config: α = r
    assert list(bare.modules) == list(with_config.modules)
    for path, module in bare.modules.items():
        assert torch.equal(module.lora_B, with_config.modules[path].lora_B)
    assert bare.source.sha256 == with_config.source.sha256


def test_config_rank_disagreeing_with_weights_is_refused(llama_task_dirs, tmp_path):
    shutil.copy(llama_task_dirs["rte"] / "adapter_model.safetensors", tmp_path / "adapter_model.safetensors")
    config = json.loads((llama_task_dirs["rte"] / "adapter_config.json").read_text())
    config["r"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))

    with pytest.raises(LoramergeError, match="disagree"):
        load_adapter(str(tmp_path))


# Adapters PEFT can build but loramerge cannot merge exactly: (model, PEFT config, words the error names).
REFUSED = {
    "dora": ("llama", dict(r=2, target_modules=["q_proj"], use_dora=True), "use_dora"),
    "lora_bias": ("llama", dict(r=2, target_modules=["q_proj"], lora_bias=True), "lora_bias"),
    "target_parameters": (
        "llama", dict(r=2, target_modules=[], target_parameters=["mlp.up_proj.weight"]), "target_parameters"
    ),
    "trainable_tokens": (
        "llama", dict(r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3, 4]}),
        "trainable_token_indices",
    ),
    "layer_replication": (
        "llama", dict(r=2, target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]]), "layer_replication"
    ),
    "embedding": ("llama", dict(r=2, target_modules=["embed_tokens", "q_proj"]), "embedding LoRA"),
    "conv2d": ("convnet", dict(r=2, target_modules=["conv", "proj"]), "convolution LoRA"),
    "ia3": (
        "llama", dict(kind="IA3", target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]), "IA3"
    ),
    "loha": ("llama", dict(kind="LOHA", r=2, target_modules=["q_proj"]), "LOHA"),
}


def _build_refused(case: str, folder):
    from peft import IA3Config, LoHaConfig

    model_kind, config, named = REFUSED[case]
    config = dict(config)
    config_class = {"IA3": IA3Config, "LOHA": LoHaConfig}.get(config.pop("kind", None))
    save_lora(model_kind, folder, seed=8, config_class=config_class, **config)
    return named


@pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT warns about some of these while building them
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_peft_features_are_refused_by_name(tmp_path, case):
    named = _build_refused(case, tmp_path)

    with pytest.raises(LoramergeError, match=named) as error:
        load_adapter(str(tmp_path))

    assert "\n" not in str(error.value)
    assert "not supported" in str(error.value)


# Without adapter_config.json the weights alone must still give the feature away.
REFUSED_BY_KEYS = {
    "dora": "DoRA",
    "lora_bias": "LoRA bias",
    "trainable_tokens": "trainable tokens",
    "embedding": "embedding LoRA",
    "conv2d": "convolution LoRA",
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", sorted(REFUSED_BY_KEYS))
def test_unsupported_weights_are_refused_without_a_config(tmp_path, case):
    _build_refused(case, tmp_path / "peft")
    alone = tmp_path / "weights.safetensors"
    shutil.copy(tmp_path / "peft" / "adapter_model.safetensors", alone)

    with pytest.raises(LoramergeError, match=REFUSED_BY_KEYS[case]):
        load_adapter(str(alone))
