"""Task data: jsonl / csv / parquet rows or an image folder tree, labels mapped to indices, capped.

The cap (`limit`, or `--val-limit` on the validation split) keeps a seeded random subset in file
order, so the same seed always gives the same examples.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from loramerge_cli.adapters.sources import read_into
from loramerge_cli.errors import LoramergeError, first_line
from loramerge_cli.evaluation.specs import TaskFile, TaskSpec, load_task_file

@dataclass
class Examples:
    """One task's split, ready for the engine. `inputs` depends on the model type:
    text tuples (classification), prompt strings (causal-lm) or image paths/bytes (images)."""

    task: str
    split: str
    inputs: list
    labels: list[int] | None
    fingerprint: str  # sha256 of the data files, the selection and the task's settings
    rows: int | None = None  # the split's rows before the cap
    limit: int | None = None  # the cap asked for (`--val-limit` on the validation split, else the task's `limit`)
    limit_name: str = "limit"  # what set the cap, as the user wrote it
    selected: list[int] = field(default_factory=list)  # each example's row in the split, counted from 0
    lines: list[int | None] = field(default_factory=list)  # each example's line in its file (JSONL, CSV), if any
    source: str = ""  # the split's file or folder

    def __len__(self) -> int:
        return len(self.inputs)

    def row_of(self, index: int) -> str:
        """Where example `index` comes from, as the data's other errors say it: `line 5 of data/v.jsonl` (a CSV
        row's last line), else `row 5 of data/v.parquet` (rows counted from 1)."""
        if len(self.selected) != len(self.inputs):
            return f"example {index + 1} of those scored"
        line = self.lines[index] if len(self.lines) == len(self.inputs) else None
        return f"line {line} of {self.source}" if line is not None else f"row {self.selected[index] + 1} of " \
            f"{self.source}"

    def above_cap(self) -> bool:
        """The cap is above the split's rows: every row is used (the record names the cap, not the count)."""
        return self.limit is not None and self.rows is not None and self.limit > self.rows


def load_examples(
    task_file: TaskFile, task: TaskSpec, split: str, val_limit: int | None = None, seed: int = 0
) -> Examples:
    """Read one split of one task; every problem names the file and the field."""
    rows_read, class_names, source = _split_rows(task_file, task, split)
    by_val_limit = split == "validation" and val_limit is not None
    limit = val_limit if by_val_limit else task.limit
    selected = _subsample(len(rows_read), limit, seed)
    rows = [rows_read[index] for index in selected]
    inputs = [task_file.type.read_input(row, source, task_file, task) for row in rows]
    labels = None
    if task.label is not None or source.is_dir():
        labels = [_label_of(row, task_file, task, class_names, source) for row in rows]
    digest = hashlib.sha256()
    digest.update(json.dumps({"task": task.describe(), "split": split, "selected": selected}).encode())
    digest.update(_content_hash(source).encode())
    named = dict.fromkeys(str(value) for value in (inputs if task_file.type.inputs_name_files else ())
                          if isinstance(value, (str, Path)) and Path(value).is_file())
    for value in named:  # the files a listing names (images): each one's content, as a folder's images
        digest.update(os.fsencode(value) + b":" + _content_hash(Path(value)).encode())
    return Examples(task.name, split, inputs, labels, digest.hexdigest(), len(rows_read), limit,
                    "--val-limit" if by_val_limit else "limit", list(selected),
                    [getattr(row, "line", None) for row in rows], str(source))


def require_module(module: str, extra: str, reason: str, load=None) -> None:
    """Import an optional library now (`load`, else importlib's import of `module`): a missing one is one line
    naming the pip extra that brings it, said before any work."""
    import importlib

    try:
        (load or (lambda: importlib.import_module(module)))()
    except ImportError:
        raise LoramergeError(f"{reason} needs {module}: pip install 'loramerge[{extra}]'") from None


def check_type_extras(task_file: TaskFile) -> None:
    """The optional libraries the spec's task type declares (`extras`: module, pip extra), imported now."""
    for module, extra in task_file.type.extras:
        require_module(module, extra, f"{task_file.model_type} tasks")


def check_data(task_file: TaskFile, splits: list[str] | None = None, labelled: bool = True
               ) -> dict[tuple[str, str], int]:
    """Read every row of every task's splits (all of them, or `splits` where the task has them) and check
    its input columns and labels: the errors `load_examples` would raise, before any model loads; `labelled`:
    every split must have labels (accuracy is scored on it). Returns the rows of each (task, split). The
    libraries the task type declares (`extras`) are imported first."""
    check_type_extras(task_file)
    counts = {}
    for task in task_file.tasks:
        for split in splits or list(task.data):
            rows, class_names, source = _split_rows(task_file, task, split)
            for number, row in enumerate(rows, start=1):
                try:
                    task_file.type.read_input(row, source, task_file, task)
                    if task.label is not None or source.is_dir():
                        _label_of(row, task_file, task, class_names, source)
                except LoramergeError as error:  # which row of which file: data sets have thousands
                    line = getattr(row, "line", None)
                    position = f"line {line}" if line is not None else f"row {number}"
                    where = position if str(source) in str(error) else f"{position} of {source}"
                    raise LoramergeError(f"{error} ({where})") from None
            if labelled and task.label is None and not source.is_dir():
                hint = "; the rows have a 'label' column: add `label: label`" if "label" in rows[0] else ""
                raise task_file.error(f"{task.where}.label", f"required field is missing (accuracy needs labels{hint})")
            counts[task.name, split] = len(rows)
    return counts


def listed_files(task_file: TaskFile, splits=None) -> list[Path]:
    """The files the rows of the spec's data files name (an image listing's images): the data too, so a resumed
    search hashes them and no output goes over one. A data file that cannot be read names none (check_data
    reports it). `splits`: only those splits' data files (None: every split)."""
    if not task_file.type.inputs_name_files:  # (text rows name no file: nothing to read)
        return []
    files = []
    for task in task_file.tasks:
        for split, data in task.data.items():
            source = Path(data)
            if not source.is_file() or (splits is not None and split not in splits):
                continue
            key = (task_file.type.name, task.image, str(source), file_version(source))
            if key not in _NAMED_FILES:  # read once per version of the file (a plan asks several times)
                try:
                    rows = _read_rows(source, task_file, f"{task.where}.data.{split}")
                except (LoramergeError, OSError, UnicodeDecodeError):
                    continue
                if len(_NAMED_FILES) >= 64:
                    _NAMED_FILES.clear()
                _NAMED_FILES[key] = task_file.type.named_files(rows, source, task)
            files += _NAMED_FILES[key]
    return list(dict.fromkeys(files))


_NAMED_FILES: dict[tuple, list[Path]] = {}  # listed_files' reading of each data file, by its version


def file_version(path) -> str:
    """A file's version as its metadata tells it, for what is kept of a file read once (an image's decode check, a
    listing's named files): size, modification and change times, inode (an edit that keeps the size and restores
    the mtime, `cp -p` or `touch -r`, still changes the change time; a file swapped in by `mv`, the inode)."""
    stat = os.stat(path)
    return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino}"


def check_task_file(path, splits: list[str] | None = None, labelled: bool = True) -> TaskFile:
    """Load and validate a task spec and read its data files (`check_data`; `labelled`: the command scores
    accuracy, so every split needs labels): the cheap checks a command runs before loading any adapter or
    model."""
    task_file = load_task_file(path)
    check_data(task_file, splits, labelled)
    return task_file


def _split_rows(task_file: TaskFile, task: TaskSpec, split: str) -> tuple[list[dict], list[str] | None, Path]:
    where = f"{task.where}.data"
    if split not in task.data:
        raise task_file.error(where, f"no {split!r} split (has: {', '.join(task.data)})")
    source = Path(task.data[split])
    where = f"{where}.{split}"
    folder_rows = task_file.type.folder_rows(source, task_file, task, where) if source.is_dir() else None
    if folder_rows is not None:
        rows, class_names = folder_rows, None
    elif source.is_file():
        try:
            rows, class_names = _read_rows(source, task_file, where), task.labels
        except UnicodeDecodeError as error:
            raise task_file.error(where, f"{source} is not UTF-8 text (byte {error.start})") from None
    elif source.is_dir():
        raise task_file.error(where, f"{source} is a folder; this task type reads a file (jsonl, csv, parquet)")
    else:
        raise task_file.error(where, f"no such file {source}")
    if not rows:
        raise task_file.error(where, f"split is empty ({source})")
    return rows, class_names, source


def _subsample(count: int, limit: int | None, seed: int) -> list[int]:
    if limit is None or limit >= count:
        return list(range(count))
    import torch

    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(count, generator=generator)[:limit].tolist())


def _read_rows(path: Path, task_file: TaskFile, where: str) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line, object_pairs_hook=_Pairs)
            except (ValueError, RecursionError) as error:  # not JSON; a number of over 4,300 digits; deep nesting
                reason = "" if isinstance(error, json.JSONDecodeError) else f" ({first_line(error)})"
                raise task_file.error(where, f"{path} line {number} is not JSON{reason}") from None
            if not isinstance(row, dict):
                raise task_file.error(where, f"{path} line {number} is not a JSON object")
            if row.twice is not None:  # a column given twice: json keeps the last value without a word (YAML and
                # CSV refuse it); nested objects, which no task reads, may repeat theirs
                raise task_file.error(where, f"{path} line {number}: column {row.twice!r} appears twice")
            rows.append(_Row(row, line=number))
        return rows
    if suffix == ".csv":
        return _read_csv(path, task_file, where)
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            hint = "pip install loramerge[parquet]"
            raise task_file.error(where, f"{path}: reading parquet needs pyarrow ({hint})") from None
        import pyarrow

        try:
            names = parquet.read_schema(str(path)).names
            repeated = [name for index, name in enumerate(names) if name in names[:index]]
            if repeated:  # (as in a CSV header or a JSON object: one of the two would be read without a word)
                raise task_file.error(where, f"{path}: column {repeated[0]!r} appears twice")
            table = parquet.read_table(str(path))
        except (pyarrow.ArrowException, OSError) as error:  # no parquet file, cut short, an unknown encoding
            raise task_file.error(where, f"{path} is not a readable parquet file ({first_line(error)})") from None
        columns = [_parquet_values(table.column(index)) for index in range(table.num_columns)]
        if not columns:
            return [{} for _ in range(table.num_rows)]
        return [dict(zip(names, values)) for values in zip(*columns)]
    raise task_file.error(where, f"{path}: unsupported data format {suffix or '(none)'} (jsonl, csv, parquet)")


class Unreadable:
    """A parquet value Python has no type for (a nanosecond timestamp, a date past year 9999): a column no task
    reads may hold them; one it reads is refused, naming this."""

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"a value Python cannot read ({self.reason})"


def _parquet_values(column) -> list:
    """A parquet column's values as JSON would give them: a float32 or float16 as the decimal it was written as
    (0.1, not 0.10000000149011612), a value Python cannot read as Unreadable."""
    import math

    import numpy
    import pyarrow

    try:
        values = column.to_pylist()
    except (pyarrow.ArrowException, OverflowError, ValueError) as error:
        return [Unreadable(first_line(error))] * len(column)
    if pyarrow.types.is_floating(column.type) and column.type.bit_width < 64:  # (a whole number is exact as it is:
        narrow = numpy.float32 if column.type.bit_width == 32 else numpy.float16  # 65504, not 65500)
        values = [value if value is None or not math.isfinite(value) or value.is_integer()
                  else float(str(narrow(value))) for value in values]
    return values


class _Pairs(dict):
    """A JSON object, and the first key it gives twice (None if none)."""

    def __init__(self, pairs: list[tuple[str, object]]):
        super().__init__(pairs)
        seen: set[str] = set()
        self.twice = next((key for key, _ in pairs if key in seen or seen.add(key)), None)


class _Row(dict):
    """A data row and the file line it ends on (for errors: a JSON Lines file may hold blank lines, a CSV field
    several lines)."""

    def __init__(self, values: dict, line: int):
        super().__init__(values)
        self.line = line


def _read_csv(path: Path, task_file: TaskFile, where: str) -> list[dict]:
    """Rows of a CSV file by its header; a repeated column name or a row longer than the header is an error
    (either would silently score some other column). Fields may be any length (a long passage)."""
    limit = csv.field_size_limit(2**31 - 1)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # a BOM (Excel) is no part of a name
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            repeated = [name for index, name in enumerate(header) if name in header[:index]]
            if repeated:
                raise task_file.error(where, f"{path}: column {repeated[0]!r} appears twice in the header")
            rows = []
            for row in reader:
                if None in row:  # DictReader's key for the fields past the header
                    raise task_file.error(where, f"{path} line {reader.line_num} has {len(header) + len(row[None])} "
                                                 f"fields; the header names {len(header)}")
                if None in row.values():  # DictReader's value for the fields a short row lacks
                    fields = sum(value is not None for value in row.values())
                    raise task_file.error(where, f"{path} line {reader.line_num} has {fields} field"
                                                 f"{'s' if fields != 1 else ''}; the header names {len(header)}")
                rows.append(_Row(row, line=reader.line_num))
            return rows
    except csv.Error as error:
        raise task_file.error(where, f"{path} is not readable CSV ({error})") from None
    finally:
        csv.field_size_limit(limit)


NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)  # a number as a CSV cell writes one


def _label_from_text(text: str):
    """A CSV cell as the value JSON would have given: "2" and "2.0" are 2, "True"/"False" (as pandas writes
    booleans) are 1/0; anything else stays text (a name to look up)."""
    word = text.strip()
    if word.lower() in ("true", "false"):
        return int(word.lower() == "true")
    if not NUMBER.fullmatch(word):  # (float() also reads `1_0` as 10, `inf` and ` nan`)
        return text
    number = float(word)
    return int(number) if number.is_integer() else text


def _label_of(row: dict, task_file: TaskFile, task: TaskSpec, names: list[str] | None, source: Path) -> int:
    where = f"{task.where}.label"
    column = task.label or "label"
    if column not in row:
        raise task_file.error(where, f"column {column!r} missing in a row of {source}")
    value = row[column]
    names = names or task_file.type.label_names(task)
    if isinstance(value, str):
        if names and value in names:
            if source.suffix.lower() == ".csv":  # (a CSV cell is text: `1` may be a name or an index)
                _check_unambiguous(_label_from_text(value), names, task_file, where, source)
            return names.index(value)
        value = _label_from_text(value)
        if isinstance(value, str):
            known = f" (labels: {', '.join(names)})" if names else ""
            raise task_file.error(where, f"unknown label name {value!r}{known}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool):  # BoolQ-style answers: false, true are classes 0, 1
        value = int(value)
    if not isinstance(value, int):
        raise task_file.error(where, f"label {value!r} is neither an index nor a name")
    classes = task.class_count
    if value < 0 or (classes is not None and value >= classes):
        upper = f"0..{classes - 1}" if classes is not None else ">= 0"
        raise task_file.error(where, f"label {value} is out of range {upper}")
    return value


def _check_unambiguous(value, names: list[str] | None, task_file: TaskFile, where: str, source: Path) -> None:
    """A CSV cell that is a number and also the name of another class (`1` with labels `['1', '2', '3']`: index 1
    is '2', the name '1' is class 0) is refused: CSV has no types to tell a name from an index (JSON Lines and
    parquet do: a number is an index, a string a name), so the same rows would read otherwise in another format."""
    if not isinstance(value, int) or isinstance(value, bool) or not names or str(value) not in names:
        return
    named = names.index(str(value))
    if named != value and 0 <= value < len(names):
        raise task_file.error(where, f"label {value} in {source} is ambiguous: class {value} is {names[value]!r}, and "
                                     f"{str(value)!r} names class {named}; write the labels as names that are no "
                                     "numbers, or the data as JSON Lines or parquet (a number is an index there)")


def _content_hash(source: Path) -> str:
    """sha256 of a data file, or of every file name and content under an image folder."""
    digest = hashlib.sha256()
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for file in files:
        digest.update(os.fsencode(file.relative_to(source)) if file != source else b"")  # (any name's bytes)
        read_into(digest, file)
    return digest.hexdigest()
