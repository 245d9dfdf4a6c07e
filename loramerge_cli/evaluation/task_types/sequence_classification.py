"""`sequence-classification`: one text (or a text pair) per row, a class head on the base."""

from __future__ import annotations

from pathlib import Path

from loramerge_cli.evaluation.task_types.base import TaskType, text_setup


class SequenceClassification(TaskType):
    name = "sequence-classification"
    model_class = "AutoModelForSequenceClassification"
    peft_task_types = ("SEQ_CLS",)
    trained_head = "ForSequenceClassification"
    reads = frozenset({"text", "max_length"})

    def check_task(self, task, task_file) -> None:
        super().check_task(task, task_file)
        if not task.text:
            raise task_file.error(f"{task.where}.text", "required field is missing (the input column(s))")

    def read_input(self, row: dict, source: Path, task_file, task) -> tuple[str, ...]:
        missing = [column for column in task.text if column not in row]
        if missing:
            raise task_file.error(f"{task.where}.text", f"column {missing[0]!r} not in {source}")
        for column in task.text:  # a null or a list would be scored as the words "None" or "['…']"
            if not isinstance(row[column], (str, int, float)) or isinstance(row[column], bool):
                raise task_file.error(f"{task.where}.text", f"column {column!r} holds {row[column]!r} in a row of "
                                      f"{source}: expected text")
        return tuple(str(row[column]) for column in task.text)

    def prepare(self, inputs, task, preprocessor, model, settings, device, dtype, accepted):
        from loramerge_cli.evaluation.batches import prepare_text

        pad_id, max_length = text_setup(task, preprocessor, model, settings)
        return prepare_text(inputs, preprocessor, pad_id, settings.batch_size, max_length, device, accepted), \
            max_length
