"""Units: the transformer block a LoRA module belongs to (docs/algorithms.md, Inputs)."""

from __future__ import annotations


def unit_of(module_path: str) -> str | None:
    """The module path prefix up to and including its first all-digit component.

    `model.layers.3.self_attn.q_proj` -> `model.layers.3`; `transformer.h.0.attn.c_attn` ->
    `transformer.h.0`; a module outside any block (`lm_head`, a pooler) has no unit (None).
    """
    parts = module_path.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return None


def unit_sort_key(unit: str) -> tuple:
    """Natural order: `layers.2` before `layers.10`, towers grouped by their prefix."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in unit.split("."))


def sorted_units(units) -> list[str]:
    return sorted(set(units), key=unit_sort_key)
