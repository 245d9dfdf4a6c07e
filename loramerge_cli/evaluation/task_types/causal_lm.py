"""`causal-lm`: a prompt per row and a fixed list of choices; the prediction is the choice whose tokens
the model finds most likely after the prompt (summed log-probabilities, optionally per token)."""

from __future__ import annotations

from pathlib import Path

from loramerge_cli.evaluation.task_types.base import TaskType, named_task, text_setup, text_value


class CausalLM(TaskType):
    name = "causal-lm"
    model_class = "AutoModelForCausalLM"
    peft_task_types = ("CAUSAL_LM",)
    classifier = False
    choices = True
    reads = frozenset({"prompt", "choices", "length_normalize", "max_length"})

    def check_task(self, task, task_file) -> None:
        from loramerge_cli.evaluation.specs import FROM_ADAPTER

        super().check_task(task, task_file)
        for name, given in (("num_labels", task.num_labels is not None), ("head", task.head != FROM_ADAPTER)):
            if given:  # a choice task has no class head: it would be ignored without a word
                raise task_file.error(f"{task.where}.{name}", f"model_type is {self.name}, scored by its choices: "
                                      f"it reads no {name!r}")
        if task.labels and len(task.labels) != len(task.choices):
            raise task_file.error(f"{task.where}.labels", f"{len(task.labels)} names for {len(task.choices)} choices")

    def read_input(self, row: dict, source: Path, task_file, task) -> str:
        """The prompt with each `{field}` filled by the row's column of that exact name (`{my-q}`, `{q.text}` as
        written: no attribute or index lookups, which would write a method's address), as text; a format spec
        applies to a number as the number (`{score:.1f}`)."""
        import string

        where = f"{task.where}.prompt"
        try:
            parts = list(string.Formatter().parse(task.prompt))
        except ValueError as error:
            raise task_file.error(where, f"bad format string ({error})") from None
        pieces = []
        for literal, name, spec, conversion in parts:
            pieces.append(literal)
            if name is None:
                continue
            if name == "":
                raise task_file.error(where, "bad format string ({}: a field names a column, as {question})")
            if name not in row:
                lookup = " (a field names a column as written: {a.b} and {a[b]} look nothing up)" \
                    if any(mark in name for mark in ".[") else ""
                raise task_file.error(where, f"column {name!r} not in {source}{lookup}")
            value = text_value(row, name, "prompt", source, task, task_file)
            if spec and isinstance(row[name], (int, float)):  # (text_value refused bools and non-finite numbers)
                value = row[name]
            if conversion:
                value = {"r": repr, "s": str, "a": ascii}[conversion](value)
            try:
                pieces.append(format(value, spec))
            except (ValueError, TypeError) as error:
                raise task_file.error(where, f"bad format string ({{{name}:{spec}}}: {error})") from None
        return "".join(pieces)

    def label_names(self, task) -> list[str] | None:
        return task.labels or task.choices

    def check_inputs(self, examples, task, preprocessor) -> None:
        from loramerge_cli.evaluation.batches import refuse_empty

        with named_task(task):
            refuse_empty([(prompt,) for prompt in examples.inputs], preprocessor, "prompt",
                         "a choice's first token would be scored with no context", examples.row_of)

    def prepare(self, inputs, task, preprocessor, model, settings, device, dtype, accepted):
        from loramerge_cli.evaluation.batches import prepare_choices

        pad_id, max_length = text_setup(task, preprocessor, model, settings)
        with named_task(task):
            prepared = prepare_choices(inputs, task.choices, preprocessor, pad_id, settings.batch_size, max_length,
                                       device, accepted)
        return prepared, max_length

    def scores(self, model, prepared, task, settings):
        from loramerge_cli.evaluation.batches import choice_scores

        return choice_scores(model, prepared, task.length_normalized(settings.length_normalize))
