"""The PEFT writer (merged and plain adapters), apply_table, the inspect summary and the mask schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from factories import attention_shapes, random_adapter, write_peft_folder
from safetensors.torch import load_file

from loramerge_cli import api
from loramerge_cli.adapters import writer
from loramerge_cli.adapters.peft_reader import load_adapter
from loramerge_cli.errors import LoramergeError
from loramerge_cli.masks import WeightTable, ones_table
from loramerge_cli.merging.merge import MergeConfig, merge

SHAPES = {**attention_shapes(blocks=3, m=8, n=6), "pooler.dense": (5, 6)}


def _adapters(dtype=torch.float32, ranks=(2, 3, 4)):
    adapters = [
        random_adapter(name, SHAPES, rank=rank, alpha=2.0 + i, seed=i, dtype=dtype)
        for i, (name, rank) in enumerate(zip("abc", ranks))
    ]
    adapters[0].heads = {"score.weight": torch.arange(18, dtype=torch.float32).reshape(3, 6)}
    adapters[2].heads = {"score.weight": -torch.ones(3, 6)}
    for adapter in adapters:
        adapter.config["task_type"] = "SEQ_CLS"
    return adapters


def _pruning_table(adapters) -> WeightTable:
    """Every task leaves block 1's modules; task b leaves block 2; task c has weight 0.5 on block 0."""
    table = ones_table(adapters)
    for task in range(3):
        table.weights[task][1] = 0.0
    table.weights[1][2] = 0.0
    table.weights[2][0] = 0.5
    return table


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_merged_folder_reads_back_as_the_merge(tmp_path):
    adapters = _adapters()
    table = _pruning_table(adapters)
    result = merge(adapters, MergeConfig(merger="ta", lam=0.7), table)
    out = writer.write_merged_adapter(result, adapters, tmp_path / "merged", command="loramerge merge ...",
                                      table=table)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors", "heads", "loramerge.json",
                     "mask.json"]
    assert sorted(p.name for p in (out / "heads").iterdir()) == ["a.safetensors", "c.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is False
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]  # the first task's head
    assert config["base_model_name_or_path"] == "tiny/base"
    block1 = [p for p in SHAPES if p.startswith("model.layers.1.")]
    assert sorted(config["target_modules"]) == sorted(set(SHAPES) - set(block1))
    ranks = {path: module.rank for path, module in result.modules.items()}
    assert config["lora_alpha"] == config["r"]
    assert config["rank_pattern"] == config["alpha_pattern"]
    assert config["rank_pattern"] == {p: k for p, k in ranks.items() if k != config["r"]}
    assert list(ranks.values()).count(config["r"]) >= max(list(ranks.values()).count(k) for k in ranks.values())
    back = load_adapter(str(out))
    assert back.dtype == torch.float32 and set(back.modules) == set(result.modules)
    for path, merged in result.modules.items():
        assert back.modules[path].scale == 1.0
        expected = merged.lora_B @ merged.lora_A
        assert torch.allclose(back.modules[path].delta(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(back.heads["score.weight"], adapters[0].heads["score.weight"])  # AutoPeftModel loads it
    head_a = load_file(str(out / "heads" / "a.safetensors"))
    assert torch.equal(head_a["score.weight"], adapters[0].heads["score.weight"])
    provenance = json.loads((out / "loramerge.json").read_text())
    assert provenance["parameters"] == json.loads(json.dumps(result.settings.describe()))
    assert provenance["parameters"]["lambda"] == 0.7
    assert provenance["weight_table"]["weights"] == table.weights
    assert provenance["output"]["omitted"] == block1
    assert [i["sha256"] for i in provenance["inputs"]] == [a.source.sha256 for a in adapters]
    assert provenance["command"] == "loramerge merge ..."
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "tiny/base" and card.data.library_name == "peft"
    assert {"loramerge", "merge"} <= set(card.data.tags)
    assert "arXiv:2212.04089" in card.text and "units pruned before merging" in card.text
    assert _leftovers(tmp_path) == []


def test_head_is_written_as_modules_to_save(tmp_path):
    adapters = _adapters()
    result = merge(adapters, MergeConfig(merger="tsv"))
    out = writer.write_merged_adapter(result, adapters, tmp_path / "m", head="c")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["score"] and config["task_type"] == "SEQ_CLS"
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert torch.equal(tensors["base_model.model.score.weight"], adapters[2].heads["score.weight"])
    assert torch.equal(load_adapter(str(out)).heads["score.weight"], adapters[2].heads["score.weight"])
    with pytest.raises(LoramergeError, match="no task head"):
        writer.write_merged_adapter(result, adapters, tmp_path / "m2", head="b")
    with pytest.raises(LoramergeError, match="no adapter of that name"):
        writer.write_merged_adapter(result, adapters, tmp_path / "m3", head="zzz")
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists()


def test_output_dtype(tmp_path):
    same = _adapters(dtype=torch.float16)
    result = merge(same, MergeConfig())
    assert load_adapter(str(writer.write_merged_adapter(result, same, tmp_path / "f16"))).dtype == torch.float16
    mixed = _adapters()
    mixed[1] = random_adapter("b", SHAPES, rank=3, seed=1, dtype=torch.bfloat16)
    result = merge(mixed, MergeConfig())
    assert load_adapter(str(writer.write_merged_adapter(result, mixed, tmp_path / "mix"))).dtype == torch.float32
    out = writer.write_merged_adapter(result, mixed, tmp_path / "bf", dtype="bfloat16")
    assert load_adapter(str(out)).dtype == torch.bfloat16


def test_dense_results_record_their_truncation_error(tmp_path):
    adapters = _adapters(dtype=torch.float64)
    result = merge(adapters, MergeConfig(merger="ties", density=0.5, out_rank=2))
    out = writer.write_merged_adapter(result, adapters, tmp_path / "ties")
    provenance = json.loads((out / "loramerge.json").read_text())
    for path, module in result.modules.items():
        recorded = provenance["truncation"][path]
        assert recorded["rank"] == 2 and recorded["relative_error"] == pytest.approx(module.truncation_error)
    assert provenance["parameters"]["out_rank"] == 2
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2


def test_existing_output_needs_force_and_failures_leave_nothing(tmp_path, monkeypatch):
    adapters = _adapters()
    result = merge(adapters, MergeConfig())
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("old")  # what a merge writes
    (out / "loramerge.json").write_text("{}")  # a folder loramerge wrote: --force may replace it
    with pytest.raises(LoramergeError, match="already exists"):
        writer.write_merged_adapter(result, adapters, out)
    assert (out / "README.md").read_text() == "old"

    def broken(tensors, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "_save_safetensors", broken)
    with pytest.raises(LoramergeError, match="No space left"):
        writer.write_merged_adapter(result, adapters, out, force=True)
    assert (out / "README.md").read_text() == "old"  # replaced only once the new folder is complete
    with pytest.raises(LoramergeError):
        writer.write_merged_adapter(result, adapters, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    writer.write_merged_adapter(result, adapters, out, force=True)
    assert (out / "README.md").read_text() != "old" and (out / "adapter_model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


def test_unwritable_parent_is_one_line_error(tmp_path):
    adapters = _adapters()
    result = merge(adapters, MergeConfig())
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LoramergeError, match="is not a folder") as error:
        writer.write_merged_adapter(result, adapters, blocker / "sub" / "out")
    assert "\n" not in str(error.value)


def test_plain_adapter_round_trip_keeps_scales_and_patterns(tmp_path):
    adapter = random_adapter("p", SHAPES, rank={p: (2 if "q_proj" in p else 3) for p in SHAPES}, alpha=5.0, seed=4,
                             dtype=torch.float32)
    source = write_peft_folder(tmp_path / "src", adapter, config_updates={"lora_dropout": 0.1})
    loaded = load_adapter(str(source))
    out = writer.write_adapter(loaded, tmp_path / "copy")
    copied = load_adapter(str(out))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.1 and config["target_modules"] == sorted(SHAPES)
    for path, module in adapter.modules.items():
        assert copied.modules[path].scale == pytest.approx(module.scale)
        assert torch.equal(copied.modules[path].lora_B, module.lora_B)


def test_apply_table_prunes_and_scales(tmp_path):
    adapters = _adapters()
    table = _pruning_table(adapters)
    for index, adapter in enumerate(adapters):
        pruned = api.apply_table(adapter, table, index)
        for path, module in adapter.modules.items():
            weight = table.weight(index, path)
            if weight == 0:
                assert path not in pruned.modules
            else:
                assert pruned.modules[path].scale == module.scale
                assert torch.allclose(pruned.modules[path].delta(), weight * module.delta())
        assert adapter.modules.keys() == set(SHAPES)  # the input is not modified
    out = api.write_adapters([api.apply_table(a, table, i) for i, a in enumerate(adapters)], tmp_path / "pruned")
    written = load_adapter(str(out / "c"))
    assert torch.allclose(written.modules["model.layers.0.self_attn.q_proj"].delta(),
                          0.5 * adapters[2].modules["model.layers.0.self_attn.q_proj"].delta())
    assert "model.layers.1.self_attn.q_proj" not in written.modules


def test_inspect_norms_equal_dense_norms():
    adapters = _adapters(dtype=torch.float64)
    del adapters[1].modules["model.layers.2.self_attn.v_proj"]
    del adapters[1].modules["model.layers.2.self_attn.q_proj"]
    summary = api.inspect_adapters(adapters)
    norms = summary["norms"]
    assert norms["units"] == ["model.layers.0", "model.layers.1", "model.layers.2", "pooler.dense"]
    for row, unit in enumerate(norms["units"]):
        for task, adapter in enumerate(adapters):
            modules = [m for m in adapter.modules.values() if (m.unit or m.path) == unit]
            if not modules:
                assert norms["values"][row][task] is None
                continue
            dense = torch.sqrt(sum(torch.linalg.matrix_norm(m.delta()) ** 2 for m in modules))
            assert norms["values"][row][task] == pytest.approx(float(dense), rel=1e-12)
    assert summary["adapters"][0]["ranks"] == {"2": 7}
    assert summary["adapters"][0]["size_bytes"] == sum(
        t.numel() * t.element_size() for m in adapters[0].modules.values() for t in (m.lora_A, m.lora_B)) + 18 * 4
    assert all(pair["compatible"] for pair in summary["pairs"]) and summary["merge_refusals"] == []
    adapters[2].config["base_model_name_or_path"] = "other/base"
    assert "different base models" in api.inspect_adapters(adapters)["merge_refusals"][0]


def test_mask_schema_accepts_tables_and_rejects_broken_ones():
    import jsonschema

    schema_path = Path(api.__file__).parent / "schemas" / "mask.schema.json"
    schema = json.loads(schema_path.read_text())
    adapters = _adapters()
    table = _pruning_table(adapters)
    table.scale = 0.5
    table.merger = {"merger": "knots", "method": "ties", "space": "knots", "density": 0.9}
    table.provenance = {"command": "loramerge search-mask", "seed": 1}
    jsonschema.validate(table.to_json(), schema)
    broken = table.to_json()
    broken["format"] = "other"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    broken = {**table.to_json(), "weights": [[1, "x", 0]]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
