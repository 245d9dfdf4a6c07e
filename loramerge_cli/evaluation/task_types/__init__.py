"""The task types a task spec's `model_type` names, one module each: how a row becomes an input, how
inputs become batches, and how the model's output becomes per-example scores. The one place to add a type
(docs/contributing.md, "Adding a task type"); code asks a type what to do, never compares its name.
Torch-free at import (specs are checked before torch loads).
"""

from __future__ import annotations

from loramerge_cli.evaluation.task_types.base import TaskType
from loramerge_cli.evaluation.task_types.causal_lm import CausalLM
from loramerge_cli.evaluation.task_types.image_classification import ImageClassification
from loramerge_cli.evaluation.task_types.sequence_classification import SequenceClassification

TASK_TYPES: dict[str, TaskType] = {
    task_type.name: task_type for task_type in (SequenceClassification(), CausalLM(), ImageClassification())
}
DEFAULT = "sequence-classification"

__all__ = ["DEFAULT", "TASK_TYPES", "TaskType"]
