"""What every task type provides (subclass TaskType, override what differs), and the text helpers the
tokenised types share."""

from __future__ import annotations

import contextlib
from pathlib import Path


INPUT_FIELDS = ("text", "image", "prompt", "choices", "length_normalize", "max_length")  # type-specific fields


class TaskType:
    """One `model_type`: its base model class, its data rules, its batching and its scoring."""

    name: str = ""  # the spec's model_type
    model_class: str = ""  # the transformers Auto class of the base model
    preprocessor_class: str = "AutoTokenizer"  # the transformers Auto class that prepares its inputs
    classifier: bool = True  # predicts a class with a head (num_labels, heads, the entropy objective)
    choices: bool = False  # scored by the log-likelihood of each choice after a prompt (no class head)
    extras: tuple[tuple[str, str], ...] = ()  # (module, pip extra) it imports: checked before any work
    inputs_name_files: bool = False  # an input given as text is a file's path (its size and mtime are data)
    peft_task_types: tuple[str, ...] = ()  # PEFT `task_type`s of adapters trained for this kind of model
    trained_head: str | None = None  # classifiers: a base architecture ending so has a trained head
    reads: frozenset[str] = frozenset()  # the input fields of a spec entry (INPUT_FIELDS) this type reads

    def check_task(self, task, task_file) -> None:
        """Cross-field rules of one task spec entry that the schema cannot say (raise task_file.error). Here: an
        input field of another type is refused (it would be ignored without a word)."""
        for name in INPUT_FIELDS:
            if (name in task.given or getattr(task, name)) and name not in self.reads:  # `length_normalize: false`
                raise task_file.error(f"{task.where}.{name}", f"model_type is {self.name}, whose tasks do not read "
                                      f"{name!r}; is the spec's model_type right?")

    def folder_rows(self, folder: Path, task_file, task, where: str) -> list[dict] | None:
        """Rows of a split given as a folder, or None when this type reads files only."""
        return None

    def folder_class_count(self, task) -> int | None:
        """The classes a task whose classes are its folders has, where numbering them moves an index (None: the
        spec says them, no folders, or folders named 0 … k−1)."""
        return None

    def read_input(self, row: dict, source: Path, task_file, task):
        """The model input of one data row (what `prepare` receives), or task_file.error naming the field."""
        raise NotImplementedError

    def label_names(self, task) -> list[str] | None:
        """Names a label column may use instead of indices."""
        return task.labels

    def named_files(self, rows: list[dict], source: Path, task) -> list[Path]:
        """The files a data file's rows name (an image listing's images): data too, hashed and protected as the
        data file is. None by default."""
        return []

    def check_inputs(self, examples, task, preprocessor, config, settings) -> None:
        """Refuse inputs (`examples.inputs`) the model could not score, with the preprocessor and the base's
        config alone (before the weights load), naming an example by `examples.row_of(index)`."""

    def prepare(self, inputs: list, task, preprocessor, model, settings, device, dtype, accepted: frozenset[str]):
        """(PreparedTask, token cap or None): the task's inputs as device batches, built once."""
        raise NotImplementedError

    def scores(self, model, prepared, task, settings):
        """(examples × classes or choices) scores of the current weights, in example order."""
        from loramerge_cli.evaluation.batches import classifier_scores

        return classifier_scores(model, prepared)

    def metric(self, scores, labels: list[int], task) -> float:
        """The task's score in [0, 1] from `scores` (higher is better), reported as its accuracy: the fraction of
        examples whose best class or choice (masked classes left out) is the label. Another metric must stay a
        mean over examples: the searches' validation subsets add up their examples' scores."""
        from loramerge_cli.evaluation.metrics import accuracy

        return accuracy(scores, labels, task.masked_labels)


DEFAULT_MAX_LENGTH = 2048  # when neither the tokenizer nor the model config states a limit


def model_max_length(tokenizer, config) -> int:
    """The smaller of the tokenizer's model_max_length and the model's max_position_embeddings, those
    that are sane (a tokenizer that states none reports about 1e30); 2048 when neither is."""
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(limit) for limit in limits if isinstance(limit, (int, float)) and 0 < limit < 10**7]
    return min(limits) if limits else DEFAULT_MAX_LENGTH


def text_value(row: dict, column: str, field: str, source, task, task_file) -> str:
    """A row's column as text: a string or a finite number; a null, a list, an object, a bool, NaN or
    Infinity would be scored as the words "None", "['…']", "nan" (refused, naming the spec's `field`)."""
    import math

    value = row[column]
    if not isinstance(value, (str, int, float)) or isinstance(value, bool) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise task_file.error(f"{task.where}.{field}", f"column {column!r} holds {value!r} in a row of {source}: "
                              "expected text")
    return str(value)


@contextlib.contextmanager
def named_task(task):
    """A refusal while a task's inputs are prepared names the task."""
    from loramerge_cli.errors import LoramergeError

    try:
        yield
    except LoramergeError as error:
        if str(error).startswith(f"task {task.name}:"):
            raise
        raise LoramergeError(f"task {task.name}: {error}") from None


def text_setup(task, preprocessor, model, settings) -> tuple[int, int]:
    """(pad id, token cap) of a tokenised task: the model's pad id (else the tokenizer's, recorded on the
    model), and the task's token cap (token_cap)."""
    pad_id = model.config.pad_token_id
    if pad_id is None:
        pad_id = model.config.pad_token_id = preprocessor.pad_token_id
    return pad_id, token_cap(task, preprocessor, model.config, settings)


def token_cap(task, tokenizer, config, settings) -> int:
    """The task's max_length, else --max-length, else the tokenizer's and the model's limit; refused when the
    model has fewer positions or the tokenizer's special tokens leave no room for text. Needs the model's
    config, not its weights: the engine calls it before the base loads."""
    from loramerge_cli.errors import LoramergeError

    cap = task.max_length or settings.max_length or model_max_length(tokenizer, config)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and 0 < positions < cap:  # longer inputs index past the position table
        given = "its max_length" if task.max_length else "--max-length"
        raise LoramergeError(f"task {task.name}: {given} {cap} is more than the model's {positions} positions "
                             f"(max_position_embeddings); give at most {positions}")
    special = getattr(tokenizer, "num_special_tokens_to_add", None)
    specials = special(pair=len(task.text or ()) > 1) if special else 0
    if cap <= specials:  # the tokenizer would not truncate at all (it only warns)
        raise LoramergeError(f"task {task.name}: max_length {cap} leaves no room for text (the tokenizer adds "
                             f"{specials} special tokens); give at least {specials + 1}")
    return cap
