"""Weight tables (masks and coefficients; docs/algorithms.md, "Weight tables"): JSON I/O, validation, lookup.

`weights[t][u]` is task t's weight on unit u: 0 removes the task from every module of the unit
("prune, then align"), any other value multiplies its ΔW before the method.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from loramerge_cli.adapters.model import Adapter, content_sha256
from loramerge_cli.adapters.units import sorted_units, unit_of
from loramerge_cli.atomic import TooLarge, read_small_file, write_text
from loramerge_cli.errors import LoramergeError, UsageError, expect, expect_adapters, first_line

FORMAT = "loramerge.mask/v1"
TABLE_MAX_BYTES = 256 << 20  # a table with a long search history is a few MiB


@dataclass
class WeightTable:
    """A task × unit table of weights: row t scales task t's LoRA update in each unit (0 prunes it), with the
    adapters it was made for (source, sha256), the merge it was searched for and the search's provenance."""

    tasks: list[str]
    units: list[str]
    weights: list[list[float]]
    unit: str = "block"  # "block" (units are block prefixes) or "module" (units are module paths)
    adapters: list[dict] = field(default_factory=list)  # [{"source": …, "sha256": …}] in task order
    scale: float | None = None
    merger: dict | None = None
    provenance: dict = field(default_factory=dict)
    origin: str | None = field(default=None, compare=False, repr=False)  # the file it was read from (not written)

    def __post_init__(self) -> None:
        # weight() is on the search's hot path (units that are no list are refused by check_table)
        units = self.units if isinstance(self.units, (list, tuple)) else []
        self._columns = {name: index for index, name in enumerate(units)}

    def weight(self, task_index: int, module_path: str) -> float:
        """The weight of task `task_index` on a module; modules outside the table's units get 1."""
        key = unit_of(module_path) if self.unit == "block" else module_path
        column = self._columns.get(key) if key is not None else None
        return 1.0 if column is None else float(self.weights[task_index][column])

    def pruned_count(self) -> int:
        return sum(1 for row in self.weights for value in row if value == 0)

    def to_json(self) -> dict:
        out = {
            "format": FORMAT,
            "tasks": self.tasks,
            "adapters": self.adapters,
            "unit": self.unit,
            "units": self.units,
            "weights": self.weights,
        }
        if self.scale is not None:
            out["scale"] = self.scale
        if self.merger is not None:
            out["merger"] = self.merger
        if self.provenance:
            out["provenance"] = self.provenance
        return out

    def text(self) -> str:
        """The table file's text."""
        return json.dumps(self.to_json(), indent=2) + "\n"

    def save(self, path: str | Path) -> None:
        """Write atomically (temporary file, then rename)."""
        write_text(path, self.text())


def units_of(adapters: list[Adapter]) -> list[str]:
    """The unit list: the sorted union of the adapters' block prefixes (natural order)."""
    return sorted_units(unit for adapter in adapters for unit in adapter.units)


def check_table_type(table) -> None:
    """A usage error unless `table` is None or a WeightTable (a path is read by load_table first)."""
    if table is not None:
        expect(table, WeightTable, "table must be a WeightTable (api.load_table reads a file)")


def ones_table(adapters: list[Adapter]) -> WeightTable:
    """The table that keeps every unit of every adapter (all weights 1)."""
    units = units_of(adapters)
    return WeightTable(
        tasks=[a.name for a in adapters],
        units=units,
        weights=[[1.0] * len(units) for _ in adapters],
        adapters=adapter_records(adapters),
    )


def adapter_records(adapters: list[Adapter]) -> list[dict]:
    """What a table records of its adapters: the source as given (a Hub adapter's commit beside it), the sha256
    that identifies each (its file's, or its tensors' once changed in memory) and the sha256 of its tensors, which a
    copy written by apply-mask or a merge keeps."""
    return [{"source": a.source.spec, **a.source.hub_record(), "sha256": a.source.identity,
             "content_sha256": content_sha256(a)} for a in adapters]


def from_pruned_indices(adapters: list[Adapter], indices: list[int]) -> WeightTable:
    """A 0/1 table from the ENMP reference's flat list of pruned units, i = u·T + t."""
    table = ones_table(adapters)
    task_count, unit_count = len(adapters), len(table.units)
    for index in indices:
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < task_count * unit_count:
            raise LoramergeError(
                f"--indices: {index!r} is not a flat index in [0, {task_count * unit_count}) "
                f"({unit_count} units × {task_count} tasks)"
            )
        unit, task = divmod(index, task_count)
        table.weights[task][unit] = 0.0
    return table


def shortened(text: str, limit: int = 200) -> str:
    """A value shown in an error line, cut to `limit` characters (a table's 10⁵ units are not repeated back)."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def parse_indices(text: str | list[int]) -> list[int]:
    """--indices (JSON text, or a list of integers from the library) as a list of flat (task, unit) indices; a
    malformed value (or a negative index) is a usage error, an index past the adapters' units a data error
    (found once they are read)."""
    if isinstance(text, (list, tuple)):
        from loramerge_cli.errors import plain_value

        values = [plain_value(value) for value in text]  # (numpy's integers too: np.argsort(...)[:k])
    else:
        try:
            values = json.loads(text) if isinstance(text, (str, bytes)) else None
        except (ValueError, RecursionError):  # not JSON, an integer of over 4,300 digits, nesting too deep
            values = None
    if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise UsageError(f"--indices: expected a JSON list of integers >= 0 like \"[3, 17]\", got "
                         f"{shortened(repr(text))}")
    return values


STANDARD_INPUT = "-"  # the Unix spelling of standard input: `search-mask --json ... | merge --mask -`
STANDARD_INPUT_ORIGIN = "standard input"  # a table's origin when read from there (errors name it)


def _standard_input() -> str:
    """The whole of standard input as UTF-8 text; a terminal, a closed or an empty one is one line."""
    import sys

    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:
        raise LoramergeError("--mask -: standard input is closed; pipe the table in (search-mask ... --json | "
                             "loramerge merge ... --mask -)")
    if sys.stdin.isatty():  # a read would wait for typing, without a word
        raise LoramergeError("--mask -: standard input is a terminal; pipe the table in (search-mask ... --json | "
                             "loramerge merge ... --mask -) or give its file")
    try:
        text = read_small_file(stream, TABLE_MAX_BYTES).decode("utf-8")
    except (OSError, ValueError) as error:  # not readable, too large, not UTF-8
        raise LoramergeError(f"{STANDARD_INPUT_ORIGIN}: not a readable JSON mask ({first_line(error)})") from None
    if not text.strip():
        raise LoramergeError(f"--mask -: {STANDARD_INPUT_ORIGIN} is empty (did the command before the pipe fail?)")
    return text


def load_table(path: str | Path) -> WeightTable:
    """Read and structurally validate a weight-table JSON file (the text `-`: standard input; Path("-") is a
    file)."""
    if isinstance(path, str) and path == STANDARD_INPUT:
        return table_from_text(_standard_input(), STANDARD_INPUT_ORIGIN)
    expect(path, (str, os.PathLike), "load_table reads a file: give its path")
    path = Path(path)
    try:
        text = read_small_file(path, TABLE_MAX_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise LoramergeError(f"{path}: mask file not found") from None
    except TooLarge as error:
        raise LoramergeError(f"{path}: {error}: not a weight table") from None
    except (OSError, UnicodeDecodeError) as error:
        raise LoramergeError(f"{path}: not a readable JSON mask ({error})") from None
    return table_from_text(text, path)


def table_from_text(text: str, path: str | Path) -> WeightTable:
    """The weight table of a table file's text (`path`: where it was read, for errors), validated."""
    try:  # a key given twice: json keeps the last value without a word (a second `weights` hides the first)
        data = json.loads(text, object_pairs_hook=_object_without_repeats)
    except (ValueError, RecursionError) as error:  # not JSON, a number of over 4,300 digits, nesting too deep
        raise LoramergeError(f"{path}: not a readable JSON mask ({str(error) or 'nested too deep'})") from None
    problem = _structure_problem(data)
    if problem:
        raise LoramergeError(f"{path}: {problem}")
    return WeightTable(
        tasks=list(data["tasks"]),
        units=list(data["units"]),
        weights=[[float(v) for v in row] for row in data["weights"]],
        unit=data.get("unit", "block"),
        adapters=list(data.get("adapters", [])),
        scale=data.get("scale"),
        merger=data.get("merger"),
        provenance=data.get("provenance", {}),
        origin=str(path),
    )


def _object_without_repeats(pairs: list[tuple[str, object]]) -> dict:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice in one object")
        seen.add(key)
    return dict(pairs)


def _structure_problem(data) -> str | None:
    """What is wrong with a parsed mask file: the shipped schema (schemas/mask.schema.json), then the rules
    it cannot say (row lengths, finite numbers: JSON's Infinity and NaN parse as floats)."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return f'not a loramerge mask (expected "format": "{FORMAT}")'
    error = best_match(Draft202012Validator(mask_schema()).iter_errors(data))
    if error is not None:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
        return f"{where or 'mask'}: {shortened(error.message)}"
    return weights_problem(data["weights"], len(data["tasks"]), len(data["units"]), data.get("scale"))


def mask_schema() -> dict:
    """The weight-table JSON schema shipped with the package."""
    return json.loads(resources.files("loramerge_cli").joinpath("schemas/mask.schema.json").read_text(encoding="utf-8"))


def align_table(table: WeightTable, adapters: list[Adapter]) -> WeightTable:
    """The table with its rows in the adapters' order when it names the same tasks in another order
    (a table is matched to the adapters by task name). A malformed table is refused."""
    problem = table_problem(table)
    if problem is not None:
        raise LoramergeError(f"{table.origin or 'mask'}: {problem}")
    names = [a.name for a in adapters]
    if table.tasks == names or sorted(table.tasks) != sorted(names) or len(set(names)) != len(names):
        return table
    from loramerge_cli.merging.registry import PARAMETERS

    order = [table.tasks.index(name) for name in names]
    per_adapter = {"weights"} | {name for name, parameter in PARAMETERS.items() if parameter.per_adapter}
    merger = table.merger
    if isinstance(merger, dict):  # recorded per-adapter values follow their tasks
        merger = {key: [value[i] for i in order] if key in per_adapter and isinstance(value, list)
                  and len(value) == len(order) else value for key, value in merger.items()}
    recorded = [table.adapters[i] for i in order] if len(table.adapters) == len(order) else table.adapters
    provenance = table.provenance  # a search's record (flat indices, history) stays in the order it ran in, named
    if isinstance(provenance, dict) and provenance and "task_order" not in provenance:
        provenance = {**provenance, "task_order": list(table.tasks)}
    return replace(table, tasks=names, weights=[table.weights[i] for i in order], adapters=recorded, merger=merger,
                   provenance=provenance)


def weights_problem(weights, task_count: int, unit_count: int, scale) -> str | None:
    """What is wrong with a table's weights and scale (a row per task, one finite real per unit, in any
    sequence: a file's lists, or numpy values built in code), or None."""

    def finite(value) -> bool:
        try:
            return not isinstance(value, (str, bytes, bool)) and math.isfinite(float(value))
        except (TypeError, ValueError, OverflowError):
            return False

    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        return "'weights' must be a list of rows, one per task"
    if len(weights) != task_count:
        return f"'weights' has {len(weights)} rows for {task_count} tasks"
    for row in weights:
        if isinstance(row, (str, bytes)) or not hasattr(row, "__len__") or len(row) != unit_count:
            return f"every row of 'weights' needs {unit_count} numbers (one per unit)"
        if not all(finite(value) for value in row):
            return "'weights' holds a value that is not a finite number"
    if scale is not None and not finite(scale):
        return "'scale' must be a finite number"
    return None


def structure_problem(table: WeightTable) -> str | None:
    """What is wrong with the types of a table built in code (a file's are its schema's), or None."""
    for name in ("tasks", "units"):
        value = getattr(table, name)
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
            return f"'{name}' must be a list of names"
    if not isinstance(table.adapters, (list, tuple)) or not all(isinstance(item, dict) for item in table.adapters):
        return "'adapters' must be a list of objects ({'source': …, 'sha256': …})"
    if not isinstance(table.provenance, dict) or not isinstance(table.merger, (dict, type(None))):
        return "'provenance' and 'merger' must be objects"
    if table.unit not in ("block", "module"):
        return f"'unit' must be 'block' or 'module' (got {table.unit!r})"
    return None


def table_problem(table: WeightTable) -> str | None:
    """What is wrong with a table in itself (its fields' types, its weights and scale), or None."""
    return structure_problem(table) or weights_problem(table.weights, len(table.tasks), len(table.units), table.scale)


def check_table(table: WeightTable, adapters: list[Adapter], origin: str = "mask") -> None:
    """The table must be well formed (one finite weight per task and unit) and name the same tasks, units and
    adapter weights (sha256) as the inputs."""
    expect(table, WeightTable, "check_table takes a WeightTable (api.load_table reads a file)")
    expect_adapters(adapters, "check_table")
    problem = table_problem(table)  # (built in code too)
    if problem is not None:
        raise LoramergeError(f"{origin}: {problem}")
    names = [a.name for a in adapters]
    if table.tasks != names:
        raise LoramergeError(f"{origin}: tasks {shortened(str(table.tasks))} do not match the adapters "
                             f"{shortened(str(names))}")
    if table.unit == "block":
        expected = units_of(adapters)
    else:
        expected = sorted({path for a in adapters for path in a.modules})
    seen: set[str] = set()
    twice = next((u for u in table.units if u in seen or seen.add(u)), None)
    if twice is not None:  # (a file's schema says so; a table built in code too)
        raise LoramergeError(f"{origin}: lists unit {twice} twice")
    known = set(expected)  # (a module table of a mixture of experts: tens of thousands of units)
    missing = [u for u in table.units if u not in known]
    # a module table lists every module, in any order (a module left out would keep weight 1 unsaid)
    if missing or (table.units != expected if table.unit == "block" else seen != known):
        absent = [u for u in expected if u not in seen]
        count = f"{len(table.units)} of the adapters' {len(expected)} units"
        extra = (f"unknown units {missing[:3]}" if missing else f"lists {count} (missing: {absent[:3]})" if absent
                 else f"lists the adapters' {len(expected)} units in another order (theirs: {expected[:3]}…)")
        raise LoramergeError(f"{origin}: {extra}")
    if table.adapters and len(table.adapters) != len(table.tasks):  # (a table written by hand may name none)
        raise LoramergeError(f"{origin}: lists {len(table.adapters)} adapters for its {len(table.tasks)} tasks")
    for recorded, adapter in zip(table.adapters, adapters):
        # the file's sha256, or the tensors' (a copy of the adapter, apply-mask's or one pruned in memory, has the
        # same tensors): either recorded one identifies it
        digests = {recorded.get(key) for key in ("sha256", "content_sha256")} - {None, ""} \
            if isinstance(recorded, dict) else set()
        if digests and adapter.source.identity not in digests and content_sha256(adapter) not in digests:
            raise LoramergeError(
                f"{origin}: adapter {adapter.name!r} differs from the one the table was made for (sha256 mismatch)"
            )
