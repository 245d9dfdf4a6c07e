"""Write adapters as PEFT folders: merged results (scale folded, lora_alpha = r) and plain adapters.

Every folder is written into a temporary sibling and renamed into place only when complete, so a
failure never leaves a half-written output and `force` replaces an existing one only at the end.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from loramerge_cli import __version__, atomic
from loramerge_cli.adapters.card import (
    RECIPE_NAME,
    is_stream_path,
    relative_path,
    model_card,
    portable_base,
    portable_command,
    portable_inputs,
    portable_path,
    portable_source,
)
from loramerge_cli.adapters.compat import same_base
from loramerge_cli.adapters.model import Adapter, saved_whole
from loramerge_cli.adapters.peft_reader import PEFT_PREFIX
from loramerge_cli.adapters.sources import base_reference, check_names, hub_repo_folder
from loramerge_cli.adapters.units import unit_sort_key
from loramerge_cli.errors import LoramergeError, UsageError
from loramerge_cli.merging.merge import MergeResult
from loramerge_cli.outputs import (
    ADAPTERS_MARKER,
    HEADS_FOLDER,
    MARKER,
    UNRECORDED,
    check_finite,
    guard_output,
    output_digest,
    staged_folder,
)

LOGGER = logging.getLogger(__name__)
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
HEAD_TASK_TYPES = {"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"}  # PEFT task types that wrap a head module
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def output_dtype(adapters: list[Adapter], requested: str | torch.dtype | None = None) -> torch.dtype:
    """`requested`, else the inputs' common dtype, float32 when they differ."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested is not None:
        if requested not in DTYPES:
            raise LoramergeError(f"--dtype must be one of {', '.join(DTYPES)} (got {requested!r})")
        return DTYPES[requested]
    dtypes = {adapter.dtype for adapter in adapters if adapter.dtype is not None}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def check_output_dir(out_dir: str | Path, force: bool = False, inputs=()) -> Path:
    """Fail early: see outputs.guard_output (not an input, replaceable only with `force` when loramerge
    wrote it, a writable ancestor)."""
    return guard_output(out_dir, inputs=inputs, force=force, kind="folder")


def adapter_files(adapters: list[Adapter], base: str | os.PathLike | None = None) -> list[str]:
    """The files the adapters were read from, the folder of each adapter read as a folder (local or a Hub
    snapshot), and the folders of the base models their configs (and `base`, --base) name: an output must never
    replace or hold one, nor lie inside such a folder."""
    from loramerge_cli.outputs import base_model_folders

    files = [path for a in adapters for path in (a.source.weights_file, a.source.config_file) if path]
    folders = [str(Path(a.source.weights_file).parent) for a in adapters if a.source.kind in ("dir", "hub")]
    for adapter in adapters:  # a Hub input's whole cached repository: its blobs hold the bytes, its refs name them
        repository = hub_repo_folder(adapter.source.weights_file) if adapter.source.kind == "hub" else None
        if repository is not None:
            folders.append(str(repository))
    return files + folders + [str(folder) for folder in base_model_folders([base, *(a.base_model for a in adapters)])]


def lora_config(
    ranks: dict[str, int],
    alphas: dict[str, float],
    *,
    fan_in_fan_out: bool,
    base_model: str | None,
    task_type: str | None,
    modules_to_save: list[str] | None,
    revision: str | None = None,
    auto_mapping: dict | None = None,
) -> dict:
    """The adapter_config.json PEFT writes for LoRA, with exact module paths as targets.

    `r`/`lora_alpha` are those of the most common rank; other modules go in rank_pattern/alpha_pattern.
    """
    counts = Counter(ranks.values())
    r = max(counts, key=lambda rank: (counts[rank], rank))
    alpha_counts = Counter(alphas[path] for path, rank in ranks.items() if rank == r)
    lora_alpha = max(alpha_counts, key=lambda alpha: (alpha_counts[alpha], alpha))
    paths = sorted(ranks, key=unit_sort_key)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "revision": revision,  # the base model's (PEFT loads that commit or branch of base_model_name_or_path)
        "r": r,
        "lora_alpha": _number(lora_alpha),
        "target_modules": paths,
        "rank_pattern": {path: ranks[path] for path in paths if ranks[path] != r},
        "alpha_pattern": {
            path: _number(alphas[path]) for path in paths if ranks[path] != r or alphas[path] != lora_alpha
        },
        "use_rslora": False,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "lora_dropout": 0.0,
        "modules_to_save": modules_to_save or None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "lora_bias": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        **({"auto_mapping": auto_mapping} if auto_mapping else {}),  # the class AutoPeftModel builds (task_type null)
    }


def balanced_factors(lora_B: torch.Tensor, lora_A: torch.Tensor, dtype: torch.dtype, path: str = "",
                     zeroed: dict | None = None):
    """(B, A) in `dtype`. Where the cast would lose a rank-1 component's digits (a factor's largest entry past
    half the dtype's largest, or below its smallest normal / eps, so that its entries turn subnormal or zero), B's
    column is divided and A's row multiplied by the power of two that brings their largest entries together: B·A
    is unchanged (exact in binary). A merge puts every magnitude in B (λ, S of an SVD): in float16 (largest
    65504, subnormal below 6e-5) that is the common case; in float32 a tiny λ or update. A module whose update is
    still written as zero (a cancelling merge's rounding noise, λ = 1e-200) goes into `zeroed` ({path: its
    largest entry}; zeroed_warning says them all in one line)."""
    info = torch.finfo(dtype)
    B, A = lora_B.double(), lora_A.double()
    largest_B, largest_A = B.abs().amax(dim=0), A.abs().amax(dim=1)
    present = (largest_B > 0) & (largest_A > 0) & torch.isfinite(largest_B) & torch.isfinite(largest_A)
    lost = (torch.minimum(largest_B, largest_A) < info.tiny / info.eps) | \
        (torch.maximum(largest_B, largest_A) > info.max / 2)
    shift = torch.where(present & lost, torch.round(torch.log2(largest_B / largest_A) / 2), 0.0)
    if bool(shift.any()):
        B, A = B * torch.exp2(-shift)[None, :], A * torch.exp2(shift)[:, None]
    written_B, written_A = B.to(dtype), A.to(dtype)
    if zeroed is not None and bool(present.any()) and not bool(
            ((written_B.abs().amax(dim=0) > 0) & (written_A.abs().amax(dim=1) > 0) & present).any()):
        zeroed[path] = float((largest_B * largest_A)[present].max())
    return written_B, written_A


def zeroed_warning(zeroed: dict, dtype: torch.dtype, owner: str = "") -> str | None:
    """One line for the modules balanced_factors found written as zero (None when there are none)."""
    if not zeroed:
        return None
    paths = sorted(zeroed, key=unit_sort_key)
    named = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    return (f"{owner}{len(paths)} module{'s' if len(paths) > 1 else ''} ({named}): the update B·A (entries up to "
            f"about {max(zeroed.values()):.3g}) is below the range of {str(dtype).removeprefix('torch.')}: "
            "written as zero")


def as_written(module, dtype: torch.dtype, zeroed: dict | None = None):
    """A merged module with its factors as the writer writes them in `dtype` (balanced), its update B·A
    checked against `dtype`'s range first; `zeroed` as balanced_factors'."""
    if module.rank == 0:
        return module
    check_updates_in_range({module.path: module}, dtype)
    lora_B, lora_A = balanced_factors(module.lora_B, module.lora_A, dtype, module.path, zeroed)
    return replace(module, lora_B=lora_B, lora_A=lora_A)


def check_updates_in_range(modules: dict, dtype: torch.dtype, owner: str = "") -> None:
    """Each module's update (scale)·B·A (a merged module's scale is 1) within `dtype`'s range, else one line
    naming the module (and `owner`, the adapter of a plain copy): finite factors can multiply past it (PEFT
    would then compute Inf and NaN). ‖B‖·‖A‖ bounds every entry, so the exact product (in float64, a slice of
    rows at a time) is needed only where the bound is past it."""
    limit = torch.finfo(dtype).max
    for path, module in modules.items():
        B, A, scale = module.lora_B.double(), module.lora_A.double(), abs(float(getattr(module, "scale", 1.0)))
        if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
            continue  # non-finite factors: check_finite names them as it writes
        if scale * float(torch.linalg.matrix_norm(B)) * float(torch.linalg.matrix_norm(A)) <= limit:
            continue  # (the scale applied last, as a Python float: scale·B past float64 is inf, not skipped)
        largest = scale * max(float((rows @ A).abs().max()) for rows in B.split(1024))
        if not largest <= limit:
            what = f"{owner}module {path}: the update scale·B·A" if owner else f"module {path}: the merged update B·A"
            raise LoramergeError(f"{what} reaches {largest:.3g}, beyond the range of "
                                 f"{str(dtype).removeprefix('torch.')}; nothing written")


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    check_finite(tensors)
    atomic.save_safetensors({key: tensor.contiguous() for key, tensor in tensors.items()}, path, {"format": "pt"})


def _write_json(data: dict, path: Path) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def check_head(adapters: list[Adapter], head: str | None) -> Adapter | None:
    """The adapter whose head `--head TASK` names (None without --head); it must carry a head."""
    if head is None:
        return None
    by_name = {adapter.name: adapter for adapter in adapters}
    if head not in by_name:
        raise LoramergeError(f"--head {head}: no adapter of that name (tasks: {', '.join(by_name)})")
    if not by_name[head].heads:
        raise LoramergeError(f"--head {head}: that adapter has no task head (no modules_to_save weights)")
    return by_name[head]


def check_head_holds_no_update(adapters: list[Adapter], head: str | None, paths=None) -> None:
    """The served head (`head`: a task's name, as default_head gives it) saves no module whole that carries a
    merged update (`paths`: the merged modules, else every input's): PEFT puts no LoRA on a module named in
    modules_to_save, so that update would be dropped as it loads, without a word."""
    served = next((adapter for adapter in adapters if adapter.name == head), None)
    if served is None or not served.heads:
        return
    names = served.head_modules
    updated = paths if paths is not None else {path for adapter in adapters for path in adapter.modules}
    clash = sorted(path for path in updated if saved_whole(names, path))
    if clash:
        owner = next(adapter.name for adapter in adapters if clash[0] in adapter.modules)
        raise LoramergeError(f"task {head}'s head, served by the merge (modules_to_save: {', '.join(names)}), saves "
                             f"{clash[0]} whole, and {owner} has a LoRA update on it: PEFT puts no LoRA on a module it "
                             "saves whole, so that update would be lost; serve another task's head (--head TASK) or "
                             "merge without that adapter's update there (a weight table)")


def default_head(adapters: list[Adapter], head: str | None) -> str | None:
    """--head, else the first task that has one when the inputs' task type makes PEFT expect a head (SEQ_CLS,
    TOKEN_CLS, QUESTION_ANS: so that AutoPeftModelFor<Task> loads the merge) or names none (an image
    classifier's: PEFT has no task type for it, and without a head the merge would serve the base's)."""
    task_types = {a.config.get("task_type") or None for a in adapters}
    if head is not None or not (task_types == {None} or _common(list(task_types)) in HEAD_TASK_TYPES):
        return head
    return next((adapter.name for adapter in adapters if adapter.heads), None)


def _merged_task_type(adapters: list[Adapter], head_adapter: Adapter | None) -> str | None:
    """The inputs' common task type, unless it makes PEFT expect a head that is not written:
    PeftModelForSequenceClassification and friends add `score`/`classifier` to modules_to_save
    and fail to load without their weights."""
    task_type = _common([a.config.get("task_type") for a in adapters])
    return None if head_adapter is None and task_type in HEAD_TASK_TYPES else task_type


def _common_mapping(adapters: list[Adapter]) -> dict | None:
    """The inputs' PEFT `auto_mapping` (the model class they were trained on, which AutoPeftModel builds when the
    task type is null: an image classifier), when every input has the same one."""
    mappings = {json.dumps(a.config.get("auto_mapping"), sort_keys=True) for a in adapters}
    mapping = json.loads(mappings.pop()) if len(mappings) == 1 else None
    if not isinstance(mapping, dict) or not mapping.get("base_model_class"):
        return None
    return {key: value for key, value in mapping.items() if _strict_json(value)}  # (Python reads NaN; JSON has none)


def _strict_json(value) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


def _common(values: list):
    """The one non-empty value all inputs agree on, else None."""
    distinct = {value for value in values if value}
    return distinct.pop() if len(distinct) == 1 else None


def table_files(table) -> list[Path]:
    """The file a weight table was read from (an input, like the adapters' files), if it was read from one (not
    from standard input)."""
    return [Path(table.origin)] if table is not None and table.origin and Path(table.origin).exists() else []


def write_merged_adapter(
    result: MergeResult,
    adapters: list[Adapter],
    out_dir: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    head: str | None = None,
    command: str | None = None,
    force: bool = False,
    table=None,
    base_model: str | None = None,
    extra_provenance: dict | None = None,
    recipe: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write a merge result as a PEFT LoRA folder; returns the folder. `recipe` (YAML text)
    becomes loramerge.yaml, embedded in the card; text files name local inputs relative to the folder."""
    check_names([adapter.name for adapter in adapters])  # each task's head is written as heads/<name>.safetensors
    if result.tasks is not None and result.tasks != [adapter.name for adapter in adapters]:
        raise LoramergeError(f"the merge result is of the tasks {', '.join(result.tasks)}, not of the adapters given "
                             f"({', '.join(adapter.name for adapter in adapters)}): write it with the adapters it "
                             "merged, in their order")
    out_dtype = output_dtype(adapters, dtype)
    head = default_head(adapters, head)
    head_adapter = check_head(adapters, head)
    check_output_dir(out_dir, force, adapter_files(adapters, base_model) + table_files(table))
    modules = {path: module for path, module in result.modules.items() if module.rank > 0}
    check_head_holds_no_update(adapters, head, modules)
    if not modules or result.settings.lam == 0:  # λ = 0 scales every module to zero
        raise LoramergeError("the merge is empty: every module was pruned or merged to zero"
                             + (" (λ = 0)" if modules else "") + "; nothing to write")
    check_updates_in_range(modules, out_dtype)
    bases = [a.base_model for a in adapters if a.base_model]  # (`…/base/` and `…/base` are one base: written
    # in its plain spelling, whatever the adapters' order)
    inputs_base = None if not bases or not all(same_base(bases[0], other) for other in bases) else \
        bases[0] if len(set(bases)) == 1 else os.path.normpath(bases[0])
    base, revision = base_reference(base_model) if base_model else (inputs_base, None)
    tensors, zeroed = {}, {}
    for path, module in modules.items():
        lora_B, lora_A = balanced_factors(module.lora_B, module.lora_A, out_dtype, path, zeroed)
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = lora_A
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = lora_B
    if zeroed:  # (a plan's merge found them as it finished each module, and said so in its result)
        LOGGER.warning(zeroed_warning(zeroed, out_dtype))
    heads = head_adapter.head_modules if head_adapter is not None else None
    for key, tensor in head_adapter.heads.items() if head_adapter is not None else ():  # in its own dtype (the
        # copy in heads/ too), --dtype's if given
        tensors[f"{PEFT_PREFIX}{key}"] = tensor.to(out_dtype) if dtype is not None and tensor.is_floating_point() \
            else tensor
    tensors.update(base_copy_tensors(adapters, modules, heads))  # in their own dtype: PEFT copies them into the base
    ranks = {path: module.rank for path, module in modules.items()}
    config = lora_config(
        ranks,
        {path: float(rank) for path, rank in ranks.items()},  # lora_alpha = r: every scale is 1
        # PEFT orients each module by its type (Conv1D or not) and warns when this flag disagrees: an input
        # read from a bare file says False for GPT-2's Conv1D, so any module saying True speaks for them
        fan_in_fan_out=any(module.fan_in_fan_out for module in modules.values()),
        base_model=base,
        task_type=_merged_task_type(adapters, head_adapter),
        modules_to_save=heads,
        # --base's revision, else the inputs' base revision unless --base names another base
        revision=revision or (_common([a.config.get("revision") for a in adapters]) if base == inputs_base else None),
        auto_mapping=_common_mapping(adapters),
    )
    inputs = adapter_files(adapters, base_model) + table_files(table)
    table = portable_table(table, out_dir, adapters)  # (as the folder holds it)
    hub_revision = config["revision"] if base and not Path(base).expanduser().is_dir() else None  # (a folder's is
    # no commit: its path stays a path, made relative to the output)
    provenance = merge_provenance(result, adapters, modules, out_dtype, head, command, table,
                                  f"{base}@{hub_revision}" if hub_revision else base)
    provenance.update(extra_provenance or {})
    provenance = portable_provenance(provenance, out_dir)
    task_type = config["task_type"]
    with staged_folder(out_dir, force, inputs) as staging:
        _write_json(config, staging / CONFIG_NAME)
        _save_safetensors(tensors, staging / WEIGHTS_NAME)
        _write_heads(adapters, staging / HEADS_FOLDER, out_dtype if dtype is not None else None)
        if table is not None:
            table.save(staging / "mask.json")
        if recipe is not None:
            (staging / RECIPE_NAME).write_text(recipe, encoding="utf-8", errors="surrogateescape")
        (staging / "README.md").write_text(model_card(
            result, adapters, title=Path(out_dir).name, base=base, task_type=task_type, head=head, table=table,
            recipe=recipe, tuning=provenance.get("lambda_tuning"), repo_id=repo_id,
            base_revision=config.get("revision"), command=provenance.get("command")), encoding="utf-8",
            errors="surrogateescape")  # a path decoded from bytes in an ASCII locale (PYTHONUTF8=0): its bytes
        _write_json({**provenance, "files": file_digests(staging)}, staging / MARKER)  # last: it records the rest
    return Path(out_dir)


def file_digests(folder: Path) -> dict[str, str]:
    """{path relative to `folder`: sha256} of every file a command wrote there but loramerge.json and the recipe
    (outputs.UNRECORDED): a later --force refuses to replace a file edited since (outputs.edited_files)."""
    return {path.relative_to(folder).as_posix(): output_digest(path) for path in sorted(folder.rglob("*"))
            if path.is_file() and path.relative_to(folder).as_posix() not in UNRECORDED}


def base_copy_tensors(adapters: list[Adapter], modules: dict, heads: list[str] | None = None) -> dict:
    """The base weights PEFT saved beside the inputs' factors (save_embedding_layers), keyed as PEFT loads them
    over the base's: `<module>.base_layer.weight` for a module written with LoRA, `<module>.weight` for one
    without, none for a module the output saves whole (`heads`, its modules_to_save: the head is what it
    loads). The inputs agree on them (compat); the most precise copy is written (others may be bfloat16)."""
    tensors = {}
    for adapter in adapters:
        for key, tensor in adapter.base_copies.items():
            module, parameter = key.rsplit(".", 1)
            if saved_whole(heads or (), module):
                continue
            name = f"{PEFT_PREFIX}{module}.base_layer.{parameter}" if module in modules else f"{PEFT_PREFIX}{key}"
            if name not in tensors or (tensor.is_floating_point() and tensors[name].is_floating_point()
                                       and torch.finfo(tensor.dtype).eps < torch.finfo(tensors[name].dtype).eps):
                tensors[name] = tensor
    return tensors


def _write_heads(adapters: list[Adapter], folder: Path, dtype: torch.dtype | None = None) -> None:
    """Each task's head as folder/<task>.safetensors: in its own dtype, or `dtype` (--dtype) when given."""
    with_heads = [adapter for adapter in adapters if adapter.heads]
    if with_heads:
        folder.mkdir()
    for adapter in with_heads:
        heads = {key: tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
                 for key, tensor in adapter.heads.items()}
        _save_safetensors(heads, folder / f"{adapter.name}.safetensors")


def _inputs(adapters: list[Adapter]) -> list[dict]:
    """Provenance records of the adapters; a local one's source is its absolute path (made relative to the
    output folder as it is written: right whatever folder the caller is in by then)."""
    return [{"name": a.name, **a.source.describe(), "base_model": a.base_model,
             **({"source": a.source.local_path} if a.source.kind in ("dir", "file") else {})} for a in adapters]


def portable_table(table, folder: str | Path, adapters: list[Adapter]):
    """A weight table as an output folder holds it (mask.json, loramerge.json's weight_table): each task's source
    is the one this output's own records give its adapter (relative to `folder`, whatever folder the search
    ran in), and the absolute paths of the search's command lines are made relative to `folder` (those it was
    given relative stay relative to where it ran)."""
    from dataclasses import replace

    if table is None:
        return None
    sources = {record["name"]: record["source"] for record in portable_inputs(_inputs(adapters), folder)}
    records = [{**record, "source": sources.get(task, portable_source(str(record.get("source", "")), folder))}
               for task, record in zip(table.tasks, table.adapters)]
    provenance = dict(table.provenance or {})
    for key in ("command", "resumed_with"):
        if isinstance(provenance.get(key), str):
            provenance[key] = portable_command(provenance[key], folder)
    data = provenance.get("data")
    if isinstance(data, dict) and isinstance(data.get("tasks"), str):  # relative to the table file it was read from
        tasks = data["tasks"]
        if table.origin and not os.path.isabs(os.path.expanduser(tasks)):
            piped = is_stream_path(table.origin) or not Path(table.origin).is_file()  # relative to the working folder
            tasks = os.path.abspath(tasks) if piped else os.path.join(os.path.dirname(os.path.abspath(table.origin)),
                                                                      tasks)
        provenance["data"] = {**data, "tasks": portable_path(tasks, folder)}
    return replace(table, adapters=records, provenance=provenance)


def table_file(table, out: str | Path):
    """A search's table as its --out file holds it: each adapter source (and the task spec it read) given as a
    local path relative to the working folder, relative to the file's folder instead (so that it names the
    adapter from there, wherever the search ran); an absolute path or a Hub id as given."""
    from dataclasses import replace

    folder = Path(os.path.abspath(Path(out).expanduser())).parent

    def named_from_the_file(spec: str) -> str:
        local = spec and not os.path.isabs(os.path.expanduser(spec)) and os.path.exists(os.path.expanduser(spec))
        return relative_path(spec, folder) if local else spec

    provenance = dict(table.provenance or {})
    if isinstance(provenance.get("data"), dict) and isinstance(provenance["data"].get("tasks"), str):
        provenance["data"] = {**provenance["data"], "tasks": named_from_the_file(provenance["data"]["tasks"])}
    return replace(table, adapters=[{**record, "source": named_from_the_file(str(record.get("source", "")))}
                                    for record in table.adapters], provenance=provenance)


def table_file_text(text: str, out: str | Path) -> str:
    """The text of `table_file` of a table's text (a finished run's best.json)."""
    from loramerge_cli.masks import table_from_text

    return table_file(table_from_text(text, Path(out)), out).text()


def portable_provenance(provenance: dict, folder: str | Path) -> dict:
    """The command and local input paths relative to the output folder (no absolute paths are published)."""
    out = {**provenance, "command": portable_command(provenance.get("command"), folder),
           "inputs": portable_inputs(provenance["inputs"], folder)}
    if out.get("base_model"):
        out["base_model"] = portable_base(out["base_model"], folder)
    for key in ("lambda_tuning", "input_statistics"):  # the task spec read: a local file (as given: relative to
        read = out.get(key)  # the working folder, or absolute) relative to the folder
        if isinstance(read, dict) and read.get("tasks"):
            out[key] = {**read, "tasks": relative_path(str(read["tasks"]), folder),
                        **({"base_model": _read_base(read["base_model"], folder)} if read.get("base_model") else {})}
    return out


def _read_base(base: str, folder: str | Path) -> str:
    """The base a merge read to tune λ or gather statistics: a folder here (`./org/name` too) relative to the
    output folder, a Hub base (`org/name@commit`) as it is."""
    return relative_path(base, folder) if os.path.isdir(os.path.expanduser(base)) else base


def merge_provenance(result, adapters, modules, out_dtype, head, command, table, base) -> dict:
    """loramerge.json: what was merged, how, with which values, and what it cost in accuracy of ΔW."""
    settings = result.settings
    truncation = {
        path: {"rank": module.rank, "relative_error": module.truncation_error, "capped": module.capped}
        for path, module in modules.items()
        if module.truncation_error is not None
    }
    return {
        "format": "loramerge.provenance/v1",
        "version": __version__,
        "command": command,
        "base_model": base,
        "inputs": _inputs(adapters),
        "merger": settings.merger,
        "method": settings.method.name,
        "space": settings.space,
        "parameters": settings.describe(),
        "seed": settings.seed,
        "weight_table": table.to_json() if table is not None else None,
        "output": {
            "dtype": str(out_dtype).removeprefix("torch."),
            "modules": len(modules),
            "ranks": {path: module.rank for path, module in modules.items()},
            "omitted": sorted(set(result.omitted) | (set(result.modules) - set(modules)), key=unit_sort_key),
            "head": head,
        },
        "truncation": truncation or None,
        "warnings": list(result.warnings),
    }


def write_adapter(adapter: Adapter, out_dir: str | Path, force: bool = False, command: str | None = None,
                  dtype: str | torch.dtype | None = None) -> Path:
    """Write one plain adapter (raw B, its own scales) as a PEFT folder."""
    with staged_folder(out_dir, force, adapter_files([adapter])) as staging:
        write_adapter_files(adapter, staging, command, dtype)
    return Path(out_dir)


def write_adapters(adapters: list[Adapter], out_dir: str | Path, force: bool = False, command: str | None = None,
                   dtype: str | torch.dtype | None = None, table=None, recipe: str | None = None) -> Path:
    """Write several plain adapters as `out_dir/<name>/`, all or nothing; `table` and `recipe` (YAML text) go to
    out_dir/mask.json and out_dir/loramerge.yaml. Without a table, out_dir/.loramerge-adapters.json (hidden:
    `out_dir/*` names the adapters) names the tasks instead: either marks the folder as one `force` may replace.
    An adapter with no module left (its table row prunes everything) has no folder, since PEFT loads no LoRA
    adapter without modules; its task head, if any, goes to out_dir/heads/<name>.safetensors, as a merge keeps
    each task's."""
    check_task_folder_names(adapters)
    if not any(adapter.modules for adapter in adapters):
        raise LoramergeError("every adapter has no modules left; nothing to write")
    headless = [adapter for adapter in adapters if not adapter.modules and adapter.heads]
    inputs = adapter_files(adapters) + table_files(table)
    table = portable_table(table, out_dir, adapters)  # (as the folder holds it)
    with staged_folder(out_dir, force, inputs) as staging:
        _write_heads(headless, staging / HEADS_FOLDER, output_dtype(headless, dtype) if dtype is not None else None)
        if table is not None:
            table.save(staging / "mask.json")
        if recipe is not None:
            (staging / RECIPE_NAME).write_text(recipe, encoding="utf-8", errors="surrogateescape")
        if table is None:  # (the table names the tasks otherwise)
            _write_json({"format": "loramerge.adapters/v1", "tasks": [adapter.name for adapter in adapters]},
                        staging / ADAPTERS_MARKER)
        beside = file_digests(staging)  # the table and the heads, recorded in every task folder's loramerge.json
        for adapter in adapters:
            if not adapter.modules:
                continue
            folder = staging / adapter.name
            folder.mkdir()
            write_adapter_files(adapter, folder, command, dtype, beside)
    return Path(out_dir)


def check_task_folder_names(adapters: list[Adapter]) -> None:
    """Each adapter's name can name its folder in `write_adapters`' output: a task name, none twice, and not a
    file written beside the task folders (the table, the recipe, loramerge's record) nor, when a task is pruned
    entirely, the folder of its head."""
    check_names([adapter.name for adapter in adapters])
    headless = any(not adapter.modules and adapter.heads for adapter in adapters)
    for adapter in adapters:
        if adapter.name in ("mask.json", RECIPE_NAME, MARKER):  # (a name given with name=source: usage)
            raise UsageError(f"task name {adapter.name!r} is the name of a file apply-mask writes beside the task "
                             "folders; name the adapter otherwise (name=source)")
        if adapter.name == HEADS_FOLDER and adapter.modules and headless:
            raise LoramergeError(f"task {HEADS_FOLDER!r} would share its folder with the pruned tasks' heads; "
                                 "rename it")


def write_adapter_files(adapter: Adapter, folder: Path, command: str | None = None,
                        dtype: str | torch.dtype | None = None, beside: dict[str, str] | None = None) -> None:
    """adapter_config.json (the input's, targets narrowed to the modules present), weights, provenance; `beside`:
    the files written beside the folder ({path relative to its parent: sha256}), recorded with its own."""
    if not adapter.modules:
        raise LoramergeError(f"adapter {adapter.name!r} has no modules left; nothing to write")
    out_dtype = output_dtype([adapter], dtype)
    check_updates_in_range(adapter.modules, out_dtype, owner=f"adapter {adapter.name!r}: ")
    tensors, zeroed = {}, {}
    for path, module in adapter.modules.items():
        lora_B, lora_A = balanced_factors(module.lora_B, module.lora_A, out_dtype, path, zeroed)
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = lora_A
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = lora_B
    if zeroed:
        LOGGER.warning(zeroed_warning(zeroed, out_dtype, owner=f"adapter {adapter.name!r}: "))
    for key, tensor in adapter.heads.items():  # in their own dtype (a copy changes no head), --dtype's if given
        tensors[f"{PEFT_PREFIX}{key}"] = tensor.to(out_dtype) if dtype is not None and tensor.is_floating_point() \
            else tensor
    tensors.update(base_copy_tensors([adapter], adapter.modules, adapter.head_modules))
    paths = sorted(adapter.modules, key=unit_sort_key)
    if {"r", "lora_alpha"} <= set(adapter.config):
        config = {**adapter.config, "target_modules": paths}
    else:  # a bare .safetensors file (its scales were α = r), or a config built without r or lora_alpha:
        # they are written from the modules, since PEFT would read their absence as its defaults (8)
        kept = {key: value for key, value in adapter.config.items()
                if key not in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules")}
        config = {**kept, **lora_config(
            {path: adapter.modules[path].rank for path in paths},
            {path: adapter.modules[path].alpha for path in paths},
            fan_in_fan_out=all(m.fan_in_fan_out for m in adapter.modules.values()),
            base_model=adapter.config.get("base_model_name_or_path"), task_type=adapter.config.get("task_type"),
            modules_to_save=adapter.config.get("modules_to_save") or adapter.head_modules or None,
        )}
    _write_json(config, folder / CONFIG_NAME)
    _save_safetensors(tensors, folder / WEIGHTS_NAME)
    _write_json(
        {"format": "loramerge.provenance/v1", "version": __version__, "command": portable_command(command, folder),
         "inputs": portable_inputs(_inputs([adapter]), folder),
         "output": {"dtype": str(out_dtype).removeprefix("torch."), "modules": len(paths)},
         "files": file_digests(folder), **({"beside_files": beside} if beside is not None else {})},
        folder / MARKER,
    )
