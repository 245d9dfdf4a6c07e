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
        """The prompt filled in with the row's columns as text (str.format: a field names a column; `{my-q}` too,
        but no attribute or index lookup, `{q.upper}`, which would write a method's address)."""
        try:
            fields = _fields(task.prompt)
        except ValueError as error:
            raise task_file.error(f"{task.where}.prompt", f"bad format string ({error})") from None
        plain = {name for name in fields if name and not name.isdecimal() and not any(mark in name for mark in ".[")}
        if fields - plain:  # (a number is a position, {} too: format would look for it among no arguments)
            raise task_file.error(f"{task.where}.prompt", f"bad format string ({{{sorted(fields - plain)[0]}}}: a "
                                  "field names a column, as {question}, with no lookup in it)")
        row = {**row, **{name: text_value(row, name, "prompt", source, task, task_file) for name in plain
                         if name in row}}
        try:
            return task.prompt.format(**row)
        except KeyError as error:
            raise task_file.error(f"{task.where}.prompt", f"column {error.args[0]!r} not in {source}") from None
        except (IndexError, ValueError, AttributeError, TypeError) as error:
            raise task_file.error(f"{task.where}.prompt", f"bad format string ({error})") from None

    def label_names(self, task) -> list[str] | None:
        return task.labels or task.choices

    def check_inputs(self, examples, task, preprocessor, config, settings) -> None:
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


def _fields(text: str) -> set[str]:
    """The field names of a format string, those inside a field's format spec too (`{q:>{width}}`)."""
    import string

    names = set()
    for _, name, spec, _ in string.Formatter().parse(text):
        if name is not None:
            names.add(name)
        if spec:
            names |= _fields(spec)
    return names
