"""The input Gram matrices RegMean needs: for every task and LoRA-targeted module, G = XᵀX / N over the
task's inputs to that module (padding tokens left out), computed through the task's own expert (base +
its adapter), as the RegMean paper defines them."""

from __future__ import annotations

import torch

from loramerge_cli.errors import LoramergeError
from loramerge_cli.evaluation.batches import model_inputs_of


def collect_grams(engine, adapters: list, paths: list[str], report=None) -> dict[str, list[torch.Tensor | None]]:
    """{module path: [G_t, one per adapter (None where the adapter lacks the module)]}, float64 on the CPU.
    `engine` is an Evaluator over the adapters' tasks (one task per adapter, same names)."""
    from loramerge_cli.evaluation.engine import adapter_deltas
    from loramerge_cli.events import stage

    grams: dict[str, list] = {path: [None] * len(adapters) for path in paths}
    with stage(report, "RegMean input statistics", len(adapters)) as step:
        for index, adapter in enumerate(adapters):
            own = [path for path in paths if path in adapter.modules]
            for path, gram in _task_grams(engine, adapter.name, adapter_deltas(adapter), own).items():
                grams[path][index] = gram
            step(adapter.name)
    return grams


def _task_grams(engine, task: str, deltas: dict, paths: list[str]) -> dict[str, torch.Tensor]:
    """Each module's XᵀX is computed where the model runs (float64), once per input tensor (a block's query, key
    and value projections read one, one after the other), and summed on the CPU. Only the last input's Gram is
    kept, with a weak reference to the input: no activation lives longer than the model keeps it."""
    import weakref

    sums = {path: None for path in paths}
    counts = dict.fromkeys(paths, 0)
    mask_of_batch: list[torch.Tensor | None] = [None]
    last: list = [None]  # (weak reference to the input, its Gram, its rows)

    def hook(path):
        def record(module, inputs):
            x = inputs[0].detach()
            seen = last[0]
            if seen is None or seen[0]() is not inputs[0]:
                mask = mask_of_batch[0]
                if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
                    x = x[mask.bool()]
                x = x.reshape(-1, x.shape[-1]).to(torch.float64)
                seen = last[0] = (weakref.ref(inputs[0]), (x.T @ x).cpu(), x.shape[0])
            _, gram, rows = seen
            sums[path] = gram.clone() if sums[path] is None else sums[path].add_(gram)
            counts[path] += rows
        return record

    handles = [engine.modules[path].register_forward_pre_hook(hook(path)) for path in paths]
    try:
        engine.use_head(task)
        with engine.apply(deltas), torch.inference_mode(), model_inputs_of(task):
            for batch in engine.prepared[task].batches:
                mask_of_batch[0] = batch.inputs.get("attention_mask")
                engine.model(**batch.inputs)
    finally:
        last[0] = None
        for handle in handles:
            handle.remove()
    missing = [path for path in paths if not counts[path]]
    if missing:
        raise LoramergeError(f"RegMean: task {task}'s inputs never reach module {missing[0]}")
    return {path: sums[path] / counts[path] for path in paths}
