"""Accuracy and normalized accuracy (docs/algorithms.md, Normalized accuracy)."""

from __future__ import annotations

import torch


def accuracy(scores: torch.Tensor, labels: list[int], masked_labels: list[int] = ()) -> float:
    """Fraction of rows whose best score (masked classes set to -inf) is the label."""
    if masked_labels:
        scores = scores.clone()
        scores[:, list(masked_labels)] = float("-inf")
    predictions = scores.argmax(dim=-1)
    return float((predictions == torch.tensor(labels, device=predictions.device)).double().mean())


def normalized_accuracy(
    merged: dict[str, float], experts: dict[str, float]
) -> tuple[dict[str, float | None], list[str]]:
    """normacc_t = 100 · acc_t(merged) / acc_t(expert); an expert at 0 gives None and a warning."""
    out, warnings = {}, []
    for task, value in merged.items():
        expert = experts.get(task)
        if not expert:
            out[task] = None
            warnings.append(f"task {task}: the expert scores 0, so its normalized accuracy is undefined")
        else:
            out[task] = 100.0 * (value / expert)  # exactly 100 where the merge scores as the expert
    return out, warnings


def check_experts(experts: dict[str, float], chosen: str) -> list[str]:
    """What a choice made on mean normalized accuracy (`chosen`: "λ", "the table") rests on: one warning per
    task whose expert scores 0 (its normalized accuracy is undefined, so the mean leaves it out); an error when
    every expert does (the mean is undefined everywhere: there would be nothing to choose on)."""
    from loramerge_cli.errors import LoramergeError

    zero = [task for task, value in experts.items() if not value]
    if zero and len(zero) == len(experts):
        raise LoramergeError(f"every expert scores 0 on its own task's examples ({', '.join(zero)}), so normalized "
                             f"accuracy is undefined and {chosen} cannot be chosen on it: score more examples "
                             "(--val-limit, a task's limit) or check the tasks' labels and heads")
    return [f"task {task}: the expert scores 0 on its examples, so its normalized accuracy is undefined: {chosen} "
            "is chosen on the other tasks" for task in zero]


def mean_defined(values: dict[str, float | None]) -> float | None:
    """Mean over the defined values (None for tasks left out); None if none is defined."""
    defined = [value for value in values.values() if value is not None]
    return sum(defined) / len(defined) if defined else None
