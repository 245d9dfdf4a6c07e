"""Review of the library and the command line (session 17): each test failed before its fix."""

from dataclasses import replace

import pytest

from factories import invoke_cli
from loramerge_cli import api
from loramerge_cli.errors import LoramergeError


def test_a_table_made_on_adapters_pruned_in_memory_fits_their_written_copies(folders, tmp_path):
    """A table recorded the sha256 of the pruned tensors (lora_B × weight in float64, the full config) and the
    copies apply-mask writes (lora_B in their dtype, target_modules listed in full) hashed otherwise: `merge
    --mask` refused the very adapters the table was searched on, once written. The originals stay refused."""
    adapters = api.load_adapters([f"{name}={folder}" for name, folder in folders.items()])
    weights = [[1.0] * len(api.ones_table(adapters).units) for _ in adapters]
    weights[0][1], weights[1][0] = 0.0, 0.37  # a pruned unit and a fractional weight
    table = replace(api.ones_table(adapters), weights=weights)
    pruned = [api.apply_table(adapter, table, index) for index, adapter in enumerate(adapters)]
    assert pruned[0].source.modified and pruned[1].source.modified
    made_on_pruned = api.ones_table(pruned)
    api.write_adapters(pruned, tmp_path / "pruned")
    copies = api.load_adapters([f"{a.name}={tmp_path / 'pruned' / a.name}" for a in pruned])
    assert [c.source.identity for c in copies][:2] != [p.source.identity for p in pruned][:2]
    api.check_table(made_on_pruned, copies)
    with pytest.raises(LoramergeError, match="sha256 mismatch"):
        api.check_table(made_on_pruned, adapters)

    table_file = tmp_path / "made_on_pruned.json"
    made_on_pruned.save(table_file)
    result = invoke_cli(["merge", "--adapters", *[f"{c.name}={tmp_path / 'pruned' / c.name}" for c in copies],
                         "--mask", table_file, "--merger", "ta", "--out", tmp_path / "merged"])
    assert result.exit_code == 0, result.stderr
    refused = invoke_cli(["merge", "--adapters", *[f"{a.name}={folders[a.name]}" for a in adapters], "--mask",
                          table_file, "--merger", "ta", "--out", tmp_path / "merged2"])
    assert refused.exit_code == 1 and "sha256 mismatch" in refused.stderr
