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


RUN_ORDER = {"encoder": 0, "decoder": 1}  # an encoder-decoder's towers, in the order its forward runs them


def unit_sort_key(unit: str) -> tuple:
    """Natural order: `layers.2` before `layers.10`, towers grouped by their prefix, an encoder's blocks
    before its decoder's (the order they run: T5's `encoder.block.N`, BART's `model.encoder.layers.N`)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, RUN_ORDER.get(p, 2), p) for p in unit.split("."))


def sorted_units(units) -> list[str]:
    return sorted(set(units), key=unit_sort_key)
