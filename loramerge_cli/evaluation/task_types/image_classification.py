"""`image-classification`: an image per row (a path, bytes, or a datasets image struct), or a split given
as a folder tree `split/class_name/*.png`; a class head on the base."""

from __future__ import annotations

import functools
from pathlib import Path

from loramerge_cli.evaluation.task_types.base import TaskType, named_task

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def class_folders(folder: Path) -> set[str]:
    """The class folders of a split (hidden ones, .ipynb_checkpoints or .git, are no classes: one would shift
    every label)."""
    return {entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith(".")}


def _index_names(names: list[str], count: int) -> bool:
    """Class folders named by their indices (`0`, `1`, … below `count`), whose sorted order is their numeric
    order (no `10` sorted before `2`)."""
    return _numbers(names) and all(int(name) < count for name in names) and sorted(names) == sorted(names, key=int)


def _numbers(names: list[str]) -> bool:
    """Every name is a number written plainly (`7`, not `07` or `٧`)."""
    return all(name.isdecimal() and str(int(name)) == name for name in names)


def _image_value(value, source: Path):
    """A row's image cell as a path (relative to a listing file's folder) or bytes (Hugging Face datasets' image
    struct gives either); anything else as it is (read_input refuses it)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str) and not Path(value).is_absolute():
        value = str(source.parent / value) if source.is_file() else value
    return value


@functools.lru_cache(maxsize=65536)
def _checked_file(path: str, version: str) -> tuple[int, int]:
    """`check_image` of a file (its size), once per path and version (data.file_version: a copy that kept the
    mtime is checked again; an error is raised again: it is not cached)."""
    from loramerge_cli.evaluation.batches import check_image

    return check_image(path)


def _image_size(value) -> tuple[int, int]:
    """(width, height) of a checked image input (a path, or bytes)."""
    from loramerge_cli.evaluation.batches import check_image
    from loramerge_cli.evaluation.data import file_version

    return _checked_file(value, file_version(value)) if isinstance(value, str) else check_image(value)


class ImageClassification(TaskType):
    name = "image-classification"
    model_class = "AutoModelForImageClassification"
    peft_task_types = ("SEQ_CLS",)
    trained_head = "ForImageClassification"
    preprocessor_class = "AutoImageProcessor"
    extras = (("PIL", "image"),)
    inputs_name_files = True
    reads = frozenset({"image"})

    def folder_rows(self, folder: Path, task_file, task, where: str) -> list[dict]:
        """`folder/class_name/*.png` -> rows {image: path, label: index}, sorted by class then file. Without
        `labels`, the classes are the class folders of all the task's folder splits, in sorted order: one
        numbering for every split, even where a split lacks a class; folders named by index (`0` … `8`) with a
        `num_labels` (10) above their count keep their indices."""
        classes = sorted(class_folders(folder))
        if not classes:
            raise task_file.error(where, f"{folder} has no class folders (expected {folder}/class_name/*.png)")
        names = task.labels
        if not names:
            splits = [Path(path) for path in task.data.values() if Path(path).is_dir()]
            names = sorted(set().union(*(class_folders(split) for split in splits)))
            if _numbers(names) and names != sorted(names, key=int):  # `10` sorts before `2` as text
                shown = ", ".join(names[:4]) + (", …" if len(names) > 4 else "")
                raise task_file.error(
                    f"{task.where}.labels", f"the class folders are numbers whose order as text ({shown}) is not "
                    "their order as numbers, and a head may have been trained on either (torchvision's "
                    "ImageFolder numbers them as text): name the classes in labels, in the head's order")
            if task.num_labels is not None and len(names) < task.num_labels and _index_names(names, task.num_labels):
                names = [str(index) for index in range(task.num_labels)]  # folders 0 … 8 of a 10-wide head: the
                # folder names are the class indices (their sorted order agrees), whatever class no split holds
            if task.num_labels is not None and len(names) != task.num_labels:
                raise task_file.error(
                    f"{task.where}.labels", f"without labels, the classes are the {len(names)} class folders of "
                    f"the task's splits in sorted order, but num_labels is {task.num_labels}: name the classes in "
                    "labels, in the head's order")
        rows = []
        for class_name in classes:
            if class_name not in names:
                raise task_file.error(f"{task.where}.labels", f"unknown label name {class_name!r} (folder in {folder})")
            files = sorted(p for p in (folder / class_name).iterdir()  # (not ._x.png: a Mac's resource fork)
                           if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
            rows.extend({task.image or "image": str(p), task.label or "label": names.index(class_name)} for p in files)
        return rows

    def folder_class_count(self, task) -> int | None:
        if task.labels or task.num_labels is not None:
            return None
        splits = [Path(path) for path in task.data.values() if Path(path).is_dir()]
        names = sorted(set().union(*(class_folders(split) for split in splits)), key=lambda name: (len(name), name))
        if not splits or names == [str(index) for index in range(len(names))]:  # 0 … k−1: their own indices
            return None
        return len(names)

    def read_input(self, row: dict, source: Path, task_file, task):
        column = task.image or "image"
        if column not in row:
            raise task_file.error(f"{task.where}.image", f"column {column!r} not in {source}")
        value = _image_value(row[column], source)
        if isinstance(value, (bytes, bytearray)):
            named = f"image bytes in a row of {source}"
        elif not isinstance(value, str):
            raise task_file.error(f"{task.where}.image", f"column {column!r} holds {value!r} in a row of {source}: "
                                  "expected an image path or bytes")
        elif not Path(value).is_file():
            raise task_file.error(f"{task.where}.image", f"no such image file {value} (a row of {source})")
        else:
            named = value
        try:  # decoded before any model loads: a file that is no image, or is cut short (verify misses a short
            from loramerge_cli.evaluation.batches import UnusableImage  # GIF or BMP), is found now

            _image_size(value)  # (a listing may name one file many times: checked once)
        except ImportError:
            pass  # the missing pillow is reported by the extras check, in one line
        except UnusableImage as error:
            raise task_file.error(f"{task.where}.image", f"{named}: {error}") from None
        return value

    def named_files(self, rows: list[dict], source: Path, task) -> list[Path]:
        """The image files a listing's rows name (its bytes rows name none)."""
        values = [_image_value(row.get(task.image or "image"), source) for row in rows]
        return [Path(value) for value in values if isinstance(value, str) and Path(value).is_file()]

    def check_inputs(self, examples, task, preprocessor, config, settings) -> None:
        """Images the processor could not batch or the model's forward would refuse (batches.check_image_batches)."""
        import transformers

        from loramerge_cli.evaluation.batches import check_image_batches, model_inputs_of
        from loramerge_cli.evaluation.loading import quiet_transformers

        with named_task(task), model_inputs_of(task.name), quiet_transformers():
            check_image_batches([_image_size(value) for value in examples.inputs], preprocessor,
                                settings.batch_size, getattr(transformers, self.model_class), config)

    def prepare(self, inputs, task, preprocessor, model, settings, device, dtype, accepted):
        from loramerge_cli.evaluation.batches import prepare_images

        with named_task(task):
            return prepare_images(inputs, preprocessor, settings.batch_size, device, dtype, accepted), None
