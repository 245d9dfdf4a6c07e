"""`sequence-classification`: one text (or a text pair) per row, a class head on the base."""

from __future__ import annotations

from pathlib import Path

from loramerge_cli.evaluation.task_types.base import TaskType, named_task, text_setup, text_value


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
        return tuple(text_value(row, column, "text", source, task, task_file) for column in task.text)

    def check_inputs(self, examples, task, preprocessor, config, settings) -> None:
        from loramerge_cli.evaluation.batches import refuse_empty

        with named_task(task):
            refuse_empty(examples.inputs, preprocessor, "text", "the model would classify a pad token",
                         examples.row_of)

    def prepare(self, inputs, task, preprocessor, model, settings, device, dtype, accepted):
        from loramerge_cli.evaluation.batches import prepare_text

        pad_id, max_length = text_setup(task, preprocessor, model, settings)
        with named_task(task):
            return prepare_text(inputs, preprocessor, pad_id, settings.batch_size, max_length, device, accepted), \
                max_length
