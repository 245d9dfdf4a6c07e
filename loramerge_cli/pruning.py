"""apply-mask: one pruned copy per adapter, for tools that take plain LoRA adapters."""

from __future__ import annotations

from dataclasses import replace

from loramerge_cli.adapters.model import Adapter, content_sha256
from loramerge_cli.errors import LoramergeError, expect, plain_value
from loramerge_cli.masks import WeightTable


def apply_table(adapter: Adapter, table: WeightTable, task_index: int) -> Adapter:
    """Task `task_index`'s row applied to `adapter`: lora_B × weight, zero-weight modules removed.

    Scales and the config are kept, so the written adapter computes weight · ΔW per module. The product is
    kept in float64 (in float16 a lora_B × 2 can overflow, in bfloat16 it would be rounded twice): the writer
    rounds it once, to the output's dtype. The row must be the adapter's (the table's task of that name:
    `masks.align_table` orders a table's rows as the adapters are).

    Nothing is copied that the row leaves as it is: the result shares the kept modules' tensors, the heads and
    the base copies with `adapter` (an adapter of gigabytes is not held twice); clone a tensor before changing
    it in place.
    """
    from loramerge_cli.masks import check_table_type, table_problem

    expect(adapter, Adapter, "apply_table takes a loaded adapter (api.load_adapter)")
    check_table_type(table)
    problem = table_problem(table)
    if problem is not None:
        raise LoramergeError(f"the table: {problem}")
    rows = len(table.tasks)
    task_index = plain_value(task_index)  # (np.int64(0) is row 0)
    if isinstance(task_index, bool) or not isinstance(task_index, int) or not 0 <= task_index < rows:
        raise LoramergeError(f"task index {task_index!r} is not a row of the table (0 to {rows - 1})")
    if table.tasks[task_index] != adapter.name:
        raise LoramergeError(f"the table's row {task_index} is task {table.tasks[task_index]!r}, not adapter "
                             f"{adapter.name!r}")
    modules = {}
    for path, module in adapter.modules.items():
        weight = table.weight(task_index, path)
        if weight == 0.0:
            continue
        if weight != 1.0:
            lora_B = module.lora_B.double() * weight
            if not bool(lora_B.to(module.lora_B.dtype).isfinite().all()):
                raise LoramergeError(f"the table's weight {weight:g} for task {adapter.name!r} at {path} makes its "
                                     f"lora_B overflow {str(module.lora_B.dtype).removeprefix('torch.')}; nothing "
                                     "written")
            module = replace(module, lora_B=lora_B)
        modules[path] = module
    pruned = replace(adapter, modules=modules)
    if modules.keys() == adapter.modules.keys() and all(modules[path] is adapter.modules[path] for path in modules):
        return pruned  # the row keeps every module as it is
    return replace(pruned, source=replace(adapter.source, modified="a weight table applied in memory",
                                          modified_sha256=content_sha256(pruned)))
