"""Task heads: the tensors swapped into the base model before each task (modules_to_save)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from loramerge_cli.errors import LoramergeError
from loramerge_cli.evaluation.specs import FROM_ADAPTER, NO_HEAD, TaskFile, TaskSpec

PEFT_PREFIX = "base_model.model."


def head_key(key: str) -> str:
    """A PEFT modules_to_save key as the base model's parameter name (`score.weight`)."""
    bare = key.removeprefix(PEFT_PREFIX)
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", bare).replace(".original_module.", ".")


def read_head_file(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    from loramerge_cli.atomic import read_safetensors

    try:
        tensors = read_safetensors(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise LoramergeError(f"{path}: not a readable .safetensors head file ({error})") from None
    return {head_key(key): tensor for key, tensor in tensors.items()}


def task_head(task_file: TaskFile, task: TaskSpec, adapter) -> dict[str, torch.Tensor]:
    """The head tensors of one task: the expert's modules_to_save, a file, or none."""
    if task.head == NO_HEAD:
        return {}
    if task.head == FROM_ADAPTER:
        if not adapter.heads and task_file.type.classifier:
            raise task_file.error(
                f"{task.where}.head",
                f"adapter {adapter.name!r} carries no head (modules_to_save); give a .safetensors file or 'none'",
            )
        return {head_key(key): tensor for key, tensor in adapter.heads.items()}
    return read_head_file(task.head)


def check_head(task_file: TaskFile, task: TaskSpec, head: dict, parameters: dict) -> None:
    """Every head tensor must name a parameter of the base model with the same shape."""
    for key, tensor in head.items():
        if key not in parameters:
            raise task_file.error(f"{task.where}.head", f"{key} is not a parameter of the base model")
        expected = tuple(parameters[key].shape)
        if tuple(tensor.shape) != expected:
            shape = "×".join(map(str, tensor.shape))
            raise task_file.error(
                f"{task.where}.head", f"{key} is {shape} but the model's is {'×'.join(map(str, expected))}"
            )
