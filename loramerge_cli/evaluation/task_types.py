"""The task types a task spec's `model_type` names: what model class loads the base, whether tasks are
classified by a head or scored by choices, and whether inputs are images. The one place to add a type
(docs/contributing.md, "Adding a task type"); code asks a type what it does, never compares its name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskType:
    name: str  # the spec's model_type
    model_class: str  # the transformers Auto class of the base model
    choices: bool = False  # scored by the log-likelihood of each choice after a prompt (no class head)
    images: bool = False  # inputs are images (an image processor, image folders as splits)

    @property
    def classifier(self) -> bool:
        """Tasks predict a class with a head (num_labels, modules_to_save heads, entropy objective)."""
        return not self.choices


TASK_TYPES: dict[str, TaskType] = {
    "sequence-classification": TaskType("sequence-classification", "AutoModelForSequenceClassification"),
    "causal-lm": TaskType("causal-lm", "AutoModelForCausalLM", choices=True),
    "image-classification": TaskType("image-classification", "AutoModelForImageClassification", images=True),
}
DEFAULT = "sequence-classification"
