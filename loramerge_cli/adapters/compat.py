"""Checks that a set of adapters can be merged: one base model, equal shapes, one layout per module."""

from __future__ import annotations

from loramerge_cli.adapters.model import Adapter
from loramerge_cli.errors import LoramergeError


def compatibility_problems(adapters: list[Adapter], allow_base_mismatch: bool = False) -> list[str]:
    """Every reason a merge of these adapters would be refused (empty if none)."""
    from loramerge_cli.adapters.sources import name_problems

    problems = name_problems([a.name for a in adapters])  # (adapters built or renamed in code)
    bases = [a.base_model for a in adapters if a.base_model]  # `…/base/` and `…/./base` name one folder
    if any(not same_base(str(bases[0]), str(other)) for other in bases[1:]) and not allow_base_mismatch:
        listed = ", ".join(f"{a.name}: {a.base_model}" for a in adapters if a.base_model)
        problems.append(f"adapters come from different base models ({listed}); --allow-base-mismatch overrides")
    revisions = revision_problem(adapters) if not allow_base_mismatch else None
    if revisions:
        problems.append(revisions)
    shapes: dict[str, tuple[str, tuple[int, int]]] = {}  # (fan_in_fan_out need not agree: PEFT orients each
    for adapter in adapters:  # module by its type, whatever a config says)
        for path, module in adapter.modules.items():
            seen = shapes.setdefault(path, (adapter.name, module.shape))
            if seen[1] != module.shape:
                problems.append(
                    f"module {path} is {seen[1][0]}×{seen[1][1]} in {seen[0]} but "
                    f"{module.shape[0]}×{module.shape[1]} in {adapter.name}"
                )
    for path, (owner, _) in shapes.items():  # PEFT matches targets by suffix: both names would target one
        parts = path.split(".")  # module, and the longer name's weights would not load (without a word)
        for start in range(1, len(parts)):
            suffix = ".".join(parts[start:])
            if suffix in shapes and shapes[suffix][0] != owner:
                problems.append(f"module {path} in {owner} is {suffix} in {shapes[suffix][0]}: the adapters name "
                                "their modules from different model classes (one with a prefix)")
    copies: dict[str, Adapter] = {}
    for adapter in adapters:  # one merged adapter holds one copy of each base weight PEFT saved beside the factors
        for key, tensor in adapter.base_copies.items():
            first = copies.setdefault(key, adapter)
            if first is not adapter and not same_weights(first.base_copies[key], tensor):
                problems.append(f"the saved base weight {key} differs between {first.name} and {adapter.name}: PEFT "
                                "loads a whole tensor that modules_to_save does not name over the base's (saved by "
                                "save_embedding_layers after a vocabulary resize, or a head missing from the config's "
                                "modules_to_save?), and one merged adapter can carry only one")
    return problems


def same_weights(first, second) -> bool:
    """The same weights, one perhaps rounded to a narrower dtype (a copy saved from a bfloat16-loaded base), on
    `second`'s device."""
    import torch

    first = first.to(second.device)
    return first.shape == second.shape and (torch.equal(first.to(second.dtype), second)
                                            or torch.equal(second.to(first.dtype), first))


def check_compatible(adapters: list[Adapter], allow_base_mismatch: bool = False) -> None:
    problems = compatibility_problems(adapters, allow_base_mismatch)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise LoramergeError(problems[0] + more)


def same_base(first: str, second: str) -> bool:
    """Equal ids, or local paths naming the same folder (on this machine, or spelled alike: `…/base/` and
    `…/./base` are `…/base` on the machine an adapter was trained on too)."""
    import os
    from pathlib import Path

    if first == second or os.path.normpath(first) == os.path.normpath(second):
        return True
    a, b = Path(first).expanduser(), Path(second).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def trained_revision(adapter: Adapter) -> str | None:
    """The revision of its base an adapter's config names; None for none and for the default branch by name (the
    loaders read `main`, huggingface_hub's DEFAULT_REVISION, where none is given)."""
    from huggingface_hub.constants import DEFAULT_REVISION

    revision = adapter.config.get("revision") or None
    return None if revision == DEFAULT_REVISION else revision


def revision_problem(adapters: list[Adapter]) -> str | None:
    """Adapters that name different revisions of their base (another commit of a base is another base; none or
    `main`: the default branch, which need not be the pinned one), as a refusal's text."""
    revisions = {trained_revision(a) for a in adapters}
    if len(revisions) < 2:
        return None
    listed = ", ".join(f"{a.name}: {a.config.get('revision') or 'the default branch'}" for a in adapters)
    return f"adapters come from different revisions of their base model ({listed}); --allow-base-mismatch overrides"


def check_spec_base(task_file, adapters: list[Adapter], allow_base_mismatch: bool = False) -> None:
    """A task spec's base_model must be the base the adapters record (unless --allow-base-mismatch): adapters
    scored on another base give meaningless accuracies. A Hub id is compared without `hf://`, and its revision
    where both name one."""
    from loramerge_cli.adapters.sources import base_reference

    spec_base = getattr(task_file, "base_model", None)
    if not spec_base or allow_base_mismatch:
        return
    spec_name, spec_revision = base_reference(str(spec_base))
    for adapter in adapters:
        revision = trained_revision(adapter)
        if adapter.base_model and (not same_base(spec_name, base_reference(str(adapter.base_model))[0]) or (
                spec_revision and revision and spec_revision != revision)):
            trained = adapter.base_model + (f" at revision {revision}" if revision else "")
            raise LoramergeError(
                f"{task_file.path}: base_model {spec_base} differs from the base adapter {adapter.name!r} was "
                f"trained on ({trained}); --allow-base-mismatch overrides"
            )


def check_base_kind(engine) -> None:
    """The model kind the tasks are scored with must fit the adapters and the base: an adapter whose PEFT
    `task_type` belongs to another task type (a causal-LM adapter scored as a classifier, or the other way
    round) is refused, and a classification task scored with the base's own head needs a base that has a
    trained one (a causal LM loaded as a classifier gets a random head). The task types declare both."""
    from loramerge_cli.evaluation.model_fit import check_task_type

    task_file = engine.task_file
    task_type = task_file.type
    for task in task_file.tasks:
        adapter = engine.experts[task.name]
        check_task_type(task_file, adapter.name, adapter.config)
    if not task_type.classifier:
        return
    architectures = getattr(engine.model.config, "architectures", None) or []
    trained_head = bool(task_type.trained_head) and any(name.endswith(task_type.trained_head) for name in architectures)
    headless = [task.name for task in task_file.tasks if not engine.heads.get(task.name)]
    if architectures and headless and not trained_head:
        raise LoramergeError(
            f"{engine.base}: a {architectures[0]} has no trained classification head, and task {headless[0]} "
            "scores with the base's head: its accuracy would be chance; give the task a head (from-adapter or a "
            "file) or a classifier base"
        )


def configless_warnings(adapters: list[Adapter]) -> list[str]:
    """One line per adapter read from a bare .safetensors file: without its config, each module's scale is
    α/r = 1, which is the trained one only if it was trained with lora_alpha = r."""
    return [f"adapter {adapter.name!r} ({adapter.source.spec}) has no adapter_config.json beside it: read with "
            "lora_alpha = r (scale 1); if it was trained with another lora_alpha, put its config beside the file"
            for adapter in adapters if adapter.source.config_file is None]


def check_merged_base(task_file, experts: list[Adapter], merged: list[Adapter], base: str | None = None,
                      allow_base_mismatch: bool = False) -> None:
    """Each merged adapter must record a base these tasks are scored with: the spec's, one the experts record, or
    `base` (--base), unless --allow-base-mismatch. A merge of another model is refused before the model loads."""
    from loramerge_cli.adapters.sources import base_reference

    known = [str(b) for b in (getattr(task_file, "base_model", None), *(a.base_model for a in experts), base) if b]
    if not known or allow_base_mismatch:
        return
    for adapter in merged:  # (a Hub id without its `hf://` and revision: merged_revision_warnings looks at those)
        if adapter.base_model and not any(same_base(base_reference(name)[0], base_reference(str(adapter.base_model))[0])
                                          for name in known):
            raise LoramergeError(f"--merged {adapter.source.spec}: made for the base {adapter.base_model}, not "
                                 f"{known[0] if base is None else base}, which these tasks are scored on; "
                                 "--allow-base-mismatch overrides")


def merged_revision_warnings(merged: list[Adapter], scored_on: str) -> list[str]:
    """A merged adapter whose config names a revision of the Hub base that is not the commit the tasks were scored
    on (`scored_on`, `org/name@commit`): PEFT would load it on that revision."""
    from loramerge_cli.adapters.sources import base_reference, pinned_base

    name, commit = base_reference(scored_on)
    warnings = []
    for adapter in merged:
        revision = adapter.config.get("revision")
        if not commit or not revision or base_reference(str(adapter.base_model or ""))[0] != name:
            continue
        try:
            named = pinned_base(f"{name}@{revision}")
        except LoramergeError:
            named = None
        if named != scored_on:
            warnings.append(f"--merged {adapter.source.spec}: its config names revision {revision} of {name}, which "
                            f"PEFT loads it on; it was scored on commit {commit}")
    return warnings
