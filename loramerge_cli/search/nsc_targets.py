"""Which modules the NSC ratio is measured at (docs/algorithms.md, NSC targets).

Default: the last ⌈L/4⌉ blocks that carry LoRA; in each, the attention's value projection if it has
LoRA (`v_proj`, `value`: where the paper's code measures on LLMs, and the better choice on both bundled
settings, docs/differences.md), else its output projection if that has LoRA, else the block's last LoRA
attention module in module order. Attention modules and their output projection are found from the
model's structure (a submodule whose class name says Attention; its last weight matrix in module order);
only the value projection is known by name.
"""

from __future__ import annotations

import math

from loramerge_cli.adapters.units import sorted_units, unit_of
from loramerge_cli.errors import LoramergeError

HINT = "choose them with --target-blocks and --target-modules"
VALUE_PROJECTIONS = ("v_proj", "value")  # leaf names of the attention's value projection


def resolve_targets(
    model_modules: list[tuple[str, object]],
    lora_paths: list[str],
    blocks: list[str] | None = None,
    modules: list[str] | None = None,
) -> list[str]:
    """Targeted module paths, in module order. `model_modules` is `list(model.named_modules())`."""
    lora = set(lora_paths)
    units = sorted_units(unit_of(path) for path in lora if unit_of(path) is not None)
    if not units:
        raise LoramergeError(f"NSC: no LoRA module lies in a transformer block; {HINT}")
    chosen = _chosen_blocks(units, blocks)
    _check_modules(lora, chosen, modules)
    order = [name for name, _ in model_modules]
    targets = []
    for unit in chosen:
        in_block = [name for name in order if name in lora and unit_of(name) == unit]
        if modules:
            targets += [name for name in in_block if any(_ends_with(name, suffix) for suffix in modules)]
        else:
            targets += _default_targets(unit, model_modules, lora)
    if not targets:
        what = f"modules {', '.join(modules)}" if modules else "an attention module with LoRA"
        raise LoramergeError(f"NSC: no targeted module: blocks {', '.join(chosen)} have no {what}; {HINT}")
    return targets


def check_target_blocks(request) -> None:
    """--target-blocks and --target-modules against the adapters' LoRA modules, read from their safetensors
    headers before any model loads (a pickled adapter is checked when it loads)."""
    from loramerge_cli.adapters.sources import header_module_paths

    if not request.nsc.target_blocks and not request.nsc.target_modules:
        return
    paths = header_module_paths(request.adapters, request.allow_pickle)
    units = sorted_units(unit_of(path) for path in paths or () if unit_of(path) is not None)
    if units:
        _check_modules(paths, _chosen_blocks(units, request.nsc.target_blocks), request.nsc.target_modules)


def _check_modules(lora_paths, chosen: list[str], modules: list[str] | None) -> None:
    """Every --target-modules entry names a LoRA module of the chosen blocks (a typo is not silently dropped)."""
    in_blocks = [path for path in lora_paths if unit_of(path) in chosen]
    for entry in modules or ():
        if not any(_ends_with(path, entry) for path in in_blocks):
            leaves = sorted({path.rsplit(".", 1)[-1] for path in in_blocks})
            raise LoramergeError(f"--target-modules: {entry!r} names no LoRA module of blocks {', '.join(chosen)} "
                                 f"(their LoRA modules end in: {', '.join(leaves)}); {HINT}")


def _ends_with(path: str, suffix: str) -> bool:
    return path == suffix or path.endswith("." + suffix)


def _chosen_blocks(units: list[str], blocks: list[str] | None) -> list[str]:
    if not blocks:
        return units[len(units) - math.ceil(len(units) / 4):]
    chosen = []
    for entry in blocks:
        matched = [u for u in units if u == entry or (entry.isdigit() and u.rsplit(".", 1)[-1] == entry)]
        if not matched:
            known = f"{units[0]} … {units[-1]}"
            raise LoramergeError(f"--target-blocks: {entry!r} is no block with LoRA (blocks: {known})")
        chosen += [u for u in matched if u not in chosen]
    return sorted_units(chosen)


def _default_targets(unit: str, model_modules: list[tuple[str, object]], lora: set[str]) -> list[str]:
    """The block's value projection if it has LoRA, else its attention output projection if that has LoRA,
    else its last LoRA attention module; of its first attention, the self-attention (an encoder-decoder's
    decoder block has a cross-attention after it, whose value projection reads the encoder's output, the same
    in every block)."""
    attention_roots: list[str] = []
    matrices: list[str] = []
    for name, module in model_modules:
        if unit_of(name) != unit or name == unit:
            continue
        inside = any(name.startswith(root + ".") for root in attention_roots)
        if not inside and "attention" in type(module).__name__.lower():
            attention_roots.append(name)
            continue
        weight = getattr(module, "weight", None)
        if inside and weight is not None and getattr(weight, "dim", lambda: 0)() == 2:
            matrices.append(name)
    matrices = [name for name in matrices if attention_roots and name.startswith(attention_roots[0] + ".")]
    if not matrices:
        return []
    values = [name for name in matrices if name in lora and name.rsplit(".", 1)[-1] in VALUE_PROJECTIONS]
    if values:
        return values[-1:]
    if matrices[-1] in lora:
        return [matrices[-1]]
    with_lora = [name for name in matrices if name in lora]
    return with_lora[-1:]
