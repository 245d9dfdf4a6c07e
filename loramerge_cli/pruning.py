"""apply-mask: one pruned copy per adapter, for tools that take plain LoRA adapters."""

from __future__ import annotations

from dataclasses import replace

from loramerge_cli.adapters.model import Adapter
from loramerge_cli.masks import WeightTable


def apply_table(adapter: Adapter, table: WeightTable, task_index: int) -> Adapter:
    """Task `task_index`'s row applied to `adapter`: lora_B × weight, zero-weight modules removed.

    Scales and the config are kept, so the written adapter computes weight · ΔW per module.
    """
    modules = {}
    for path, module in adapter.modules.items():
        weight = table.weight(task_index, path)
        if weight == 0.0:
            continue
        modules[path] = module if weight == 1.0 else replace(module, lora_B=module.lora_B * weight)
    return replace(adapter, modules=modules)
