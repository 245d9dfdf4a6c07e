"""Task spec YAML (docs/tasks.md): load, validate against the JSON Schema, match tasks to adapters.

Every problem is one line naming the file and the field (`tasks.yaml: tasks[1].data: ...`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from loramerge_cli.errors import LoramergeError, UsageError
from loramerge_cli.evaluation.task_types import DEFAULT as DEFAULT_TASK_TYPE
from loramerge_cli.evaluation.task_types import TASK_TYPES, TaskType

FROM_ADAPTER = "from-adapter"
NO_HEAD = "none"
SPEC_MAX_BYTES = 64 << 20  # a task spec names its data files: a few KiB


@dataclass
class TaskSpec:
    """One evaluation task. Paths are absolute (resolved against the spec file's folder)."""

    name: str
    index: int  # position in the file, for error messages (`tasks[index]`)
    data: dict[str, str]  # split -> file or image folder
    text: list[str] = field(default_factory=list)
    image: str | None = None
    label: str | None = None
    labels: list[str] | None = None
    num_labels: int | None = None
    masked_labels: list[int] = field(default_factory=list)
    head: str = FROM_ADAPTER
    prompt: str | None = None
    choices: list[str] | None = None
    length_normalize: bool = False
    max_length: int | None = None
    limit: int | None = None
    adapter: str | None = None
    given: frozenset[str] = frozenset()  # the fields the entry names (a false or empty value is still given)

    @property
    def class_count(self) -> int | None:
        """Number of classes when the spec says it (choices, num_labels or label names)."""
        if self.choices:
            return len(self.choices)
        if self.num_labels is not None:
            return self.num_labels
        return len(self.labels) if self.labels else None

    @property
    def where(self) -> str:
        return f"tasks[{self.index}]"

    def length_normalized(self, flag: bool) -> bool:
        """Whether a choice's log-likelihood is divided by its token count: the task's `length_normalize` where it
        gives one (`false` too), else the command's --length-normalize (as a task's max_length wins)."""
        return self.length_normalize if "length_normalize" in self.given else flag

    def describe(self) -> dict:
        """Every field that changes a score, for cache keys."""
        return {
            key: getattr(self, key)
            for key in ("name", "text", "image", "label", "labels", "num_labels", "masked_labels", "head",
                        "prompt", "choices", "length_normalize", "max_length")
        }


@dataclass
class TaskFile:
    path: Path
    model_type: str
    tasks: list[TaskSpec]
    base_model: str | None = None

    def task(self, name: str) -> TaskSpec:
        for task in self.tasks:
            if task.name == name:
                return task
        raise LoramergeError(f"{self.path}: no task named {name!r}")

    @property
    def type(self) -> TaskType:
        return TASK_TYPES[self.model_type]

    @property
    def names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def error(self, where: str, message: str) -> LoramergeError:
        return LoramergeError(f"{self.path}: {where}: {message}")

    def inputs(self, adapters: bool = True) -> list[Path]:
        """The local files and folders this spec reads, as it names them: itself, each split's data (a file
        or a folder), head files and (`adapters`) `adapter:` sources. An output must never go over or into one."""
        named = [self.path]
        for task in self.tasks:
            named += [Path(data) for data in task.data.values()]
            named += [Path(task.head)] if task.head not in (FROM_ADAPTER, NO_HEAD) else []
            named += [Path(task.adapter)] if adapters and task.adapter and not task.adapter.startswith("hf://") else []
        return [path for path in dict.fromkeys(named) if path.exists()]

    def check_covers(self, names: list[str]) -> None:
        """Every adapter has a task of its name, and every task an adapter (one line naming the first gap)."""
        missing = [name for name in names if name not in self.names]
        if missing:
            raise LoramergeError(f"{self.path}: no task for adapter(s) {', '.join(missing)}")
        for task in self.tasks:
            if task.name not in names:
                raise self.error(f"{task.where}.name", f"no adapter named {task.name!r} (adapters: "
                                 f"{', '.join(names) or 'none given'}): the spec names one task per adapter given")


def schema() -> dict:
    """The shipped tasks.schema.json, its model_type enum the registered task types (a type added in
    TASK_TYPES is accepted without editing the file; a test keeps the file's list equal to the built-ins)."""
    text = resources.files("loramerge_cli").joinpath("schemas/tasks.schema.json").read_text(encoding="utf-8")
    document = json.loads(text)
    document["properties"]["model_type"]["enum"] = list(TASK_TYPES)
    return document


def load_task_file(path: str | Path) -> TaskFile:
    """Read and validate a tasks.yaml; relative data and head paths are taken from its folder."""
    import yaml

    from loramerge_cli.atomic import TooLarge, read_small_file
    from loramerge_cli.yaml_documents import load_yaml, yaml_problem

    if not isinstance(path, (str, os.PathLike)):
        raise UsageError(f"the task spec is given by its file's path (tasks.yaml), not as {type(path).__name__}: "
                         "its data paths are read from its folder")
    path = Path(path)
    try:
        document = load_yaml(read_small_file(path, SPEC_MAX_BYTES).decode("utf-8"))
    except TooLarge as error:
        raise LoramergeError(f"{path}: {error}: not a task spec") from None
    except OSError as error:
        raise LoramergeError(f"{path}: cannot read task spec ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise LoramergeError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except yaml.YAMLError as error:
        raise LoramergeError(f"{path}: not valid YAML{yaml_problem(error)}") from None
    except RecursionError:
        raise LoramergeError(f"{path}: not valid YAML (nested too deep)") from None
    _validate(document, path)
    model_type = document.get("model_type", DEFAULT_TASK_TYPE)
    folder = path.parent
    tasks = [_task_from(entry, index, folder, path) for index, entry in enumerate(document["tasks"])]
    names = [task.name for task in tasks]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise LoramergeError(f"{path}: tasks[{index}].name: task {name!r} appears twice")
    task_file = TaskFile(path, model_type, tasks, _base_model(document.get("base_model"), folder))
    for task in tasks:
        _check_task(task, task_file)
    return task_file


def _validate(document, path: Path) -> None:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    error = best_match(Draft202012Validator(schema()).iter_errors(document))
    if error is None:
        return
    location = _location(list(error.absolute_path))
    if error.validator == "required":
        missing = next(name for name in error.validator_value if name not in error.instance)
        location = f"{location}.{missing}" if location else missing
        message = "required field is missing"
        if "allOf" in error.absolute_schema_path:
            message += f" (model_type {document.get('model_type')})"
    elif error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = error.schema.get("properties", {})
        unknown = sorted(key for key in error.instance if key not in allowed)
        message = f"unknown field {unknown[0]!r}" if unknown else error.message
    elif error.validator == "not" and isinstance(error.validator_value, dict) and \
            error.validator_value.get("required"):  # a field this model type does not read
        field = error.validator_value["required"][0]
        location = f"{location}.{field}" if location else field
        message = (f"model_type is {document.get('model_type')}, whose tasks do not read {field!r}; is the spec's "
                   "model_type right?")
    else:
        message = error.message
    raise LoramergeError(f"{path}: {location or '(top level)'}: {message}")


def _location(parts: list) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _task_from(entry: dict, index: int, folder: Path, path: Path) -> TaskSpec:
    text = entry.get("text", [])
    task = TaskSpec(
        name=entry["name"],
        index=index,
        data={split: str(_resolve(folder, file)) for split, file in entry["data"].items()},
        text=[text] if isinstance(text, str) else list(text),
        image=entry.get("image"),
        label=entry.get("label"),
        labels=entry.get("labels"),
        num_labels=_whole(entry.get("num_labels")),
        head=entry.get("head", FROM_ADAPTER),
        prompt=entry.get("prompt"),
        choices=entry.get("choices"),
        length_normalize=bool(entry.get("length_normalize", False)),
        max_length=_whole(entry.get("max_length")),
        limit=_whole(entry.get("limit")),
        adapter=entry.get("adapter"),
        given=frozenset(entry),
    )
    if task.head not in (FROM_ADAPTER, NO_HEAD):
        task.head = str(_resolve(folder, task.head))
    if task.adapter and not task.adapter.startswith("hf://") and (folder / task.adapter).exists():
        task.adapter = str(_resolve(folder, task.adapter))
    task.masked_labels = [_masked_index(value, task, path) for value in entry.get("masked_labels", [])]
    return task


def _base_model(name: str | None, folder: Path) -> str | None:
    """`base_model` as a path from the spec's folder, as its data paths, where that folder holds it (or it
    starts with ./ or ../); else as given (a Hub id, or an absolute path)."""
    if name is None or name.startswith("hf://"):
        return name
    local = _resolve(folder, name)
    if not (local.exists() or name.startswith(("./", "../"))):
        return name
    # spelled as a path (`./base`, not `base` or `specs/base`, which read as Hub ids)
    return str(local) if local.is_absolute() else os.path.join(".", local)


def _resolve(folder: Path, file: str) -> Path:
    candidate = Path(file).expanduser()
    return candidate if candidate.is_absolute() else (folder / candidate)


def _masked_index(value, task: TaskSpec, path: Path) -> int:
    """A masked class by index, or by name as a label column may name it: a name in `labels`, else a choice
    (causal LM tasks)."""
    if isinstance(value, str):
        names = task.labels or task.choices
        if not names or value not in names:
            known = f" (names: {', '.join(map(repr, names))}; or give an index)" if names else " (no labels or " \
                "choices name the classes: give an index)"
            raise LoramergeError(f"{path}: {task.where}.masked_labels: unknown label name {value!r}{known}")
        return names.index(value)
    return _whole(value)


def _whole(value):
    """An integer field's value as an int: the schema's `integer` takes 4.0 (JSON Schema counts it as one)."""
    return int(value) if isinstance(value, float) else value


def _check_task(task: TaskSpec, task_file: TaskFile) -> None:
    """Cross-field rules the schema cannot say."""
    where = task.where
    if task.labels and task.num_labels is not None and len(task.labels) > task.num_labels:
        raise task_file.error(f"{where}.labels", f"{len(task.labels)} names but num_labels is {task.num_labels}")
    if task.labels and task.num_labels is not None and task_file.type.classifier:
        unnamed = range(len(task.labels), task.num_labels)  # a wider head: classes without a name are masked
        task.masked_labels += [index for index in unnamed if index not in task.masked_labels]
    classes = task.class_count
    for value in task.masked_labels:
        if value < 0 or (classes is not None and value >= classes):
            upper = f"0..{classes - 1}" if classes is not None else ">= 0"
            raise task_file.error(f"{where}.masked_labels", f"label {value} is out of range {upper}")
    if classes is not None and len(set(task.masked_labels)) >= classes:  # every prediction would be class 0
        raise task_file.error(f"{where}.masked_labels", f"every one of the {classes} classes is masked")
    task_file.type.check_task(task, task_file)
    if task.head not in (FROM_ADAPTER, NO_HEAD) and not Path(task.head).is_file():
        raise task_file.error(f"{where}.head", f"no such file {task.head}")
    from loramerge_cli.adapters.sources import HUB_ID, safetensors_header

    if task.head not in (FROM_ADAPTER, NO_HEAD) and safetensors_header(task.head) is None:
        raise task_file.error(f"{where}.head", f"{task.head} is not a readable safetensors file")
    # a source the loader would read as neither a local path nor a Hub id (its rule: org/name[@revision])
    hub = task.adapter and (task.adapter.startswith("hf://") or (HUB_ID.match(task.adapter)
                                                                  and not task.adapter.startswith((".", "/"))))
    if task.adapter and not hub and not os.path.lexists(Path(task.adapter).expanduser()):
        raise task_file.error(f"{where}.adapter", f"no such file or folder {task.adapter} (a Hub id looks like "
                              "org/name[@revision])")


def match_adapters(task_file: TaskFile, adapters: list, allow_pickle: bool = False) -> dict:
    """Task name -> the Adapter of the same name; a task's `adapter:` source must be the same weights."""
    from loramerge_cli.adapters.sources import resolve, sha256_file

    by_name = {adapter.name: adapter for adapter in adapters}
    matched = {}
    for task in task_file.tasks:
        adapter = by_name.get(task.name)
        if adapter is None:
            known = ", ".join(by_name) or "none given"
            raise task_file.error(f"{task.where}.name", f"no adapter named {task.name!r} (adapters: {known})")
        if task.adapter:
            digest = sha256_file(resolve(task.adapter, allow_pickle=allow_pickle).weights_file)
            if digest != adapter.source.identity:
                raise task_file.error(
                    f"{task.where}.adapter",
                    f"{task.adapter} is not the same weights as adapter {adapter.name!r} ({adapter.source.spec}"
                    + (f", {adapter.source.modified})" if adapter.source.modified else ")"),
                )
        matched[task.name] = adapter
    return matched
