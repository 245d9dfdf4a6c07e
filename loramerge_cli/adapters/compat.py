"""Checks that a set of adapters can be merged: one base model, equal shapes, one layout per module."""

from __future__ import annotations

from loramerge_cli.adapters.model import Adapter
from loramerge_cli.errors import LoramergeError


def compatibility_problems(adapters: list[Adapter], allow_base_mismatch: bool = False) -> list[str]:
    """Every reason a merge of these adapters would be refused (empty if none)."""
    problems = []
    bases = {a.base_model for a in adapters if a.base_model}
    if len(bases) > 1 and not allow_base_mismatch:
        listed = ", ".join(f"{a.name}: {a.base_model}" for a in adapters if a.base_model)
        problems.append(f"adapters come from different base models ({listed}); --allow-base-mismatch overrides")
    shapes: dict[str, tuple[str, tuple[int, int], bool]] = {}
    for adapter in adapters:
        for path, module in adapter.modules.items():
            seen = shapes.setdefault(path, (adapter.name, module.shape, module.fan_in_fan_out))
            if seen[1] != module.shape:
                problems.append(
                    f"module {path} is {seen[1][0]}×{seen[1][1]} in {seen[0]} but "
                    f"{module.shape[0]}×{module.shape[1]} in {adapter.name}"
                )
            elif seen[2] != module.fan_in_fan_out:
                problems.append(f"module {path}: fan_in_fan_out differs between {seen[0]} and {adapter.name}")
    return problems


def check_compatible(adapters: list[Adapter], allow_base_mismatch: bool = False) -> None:
    problems = compatibility_problems(adapters, allow_base_mismatch)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise LoramergeError(problems[0] + more)
