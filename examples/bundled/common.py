"""What the text and image builders share: determinism, the training loop, the LoRA config, jsonl/yaml I/O."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

THREADS = 1  # fixed, so that a build repeats bit for bit (same machine type and library versions)


@contextmanager
def deterministic():
    """One thread and deterministic kernels while building; the caller's settings come back after."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(strict)


def train(
    model: torch.nn.Module,
    batch: Callable[[torch.Generator], tuple[dict, torch.Tensor | dict]],
    loss_of: Callable[[torch.nn.Module, dict, object], torch.Tensor],
    steps: int,
    lr: float,
    seed: int,
) -> float:
    """AdamW on the trainable parameters with linear warm-up and cosine decay; returns the last loss."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + torch.cos(torch.tensor(progress * torch.pi)).item())

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        inputs, targets = batch(generator)
        loss = loss_of(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    return float(loss.detach())


def attention_projections(model: torch.nn.Module) -> list[str]:
    """Names of the linear layers inside the attention blocks (`q_proj`, …), read from the model."""
    return sorted({
        path.rsplit(".", 1)[-1] for path, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and any(part in path for part in (".attention.", ".self_attn."))
    })


def add_lora(model: torch.nn.Module, rank: int, alpha: int, head: str, task_type: str | None = None):
    """The PEFT model with LoRA on every attention projection and the task head trained and saved whole."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=attention_projections(model),
        modules_to_save=[head], task_type=task_type,
    )
    return get_peft_model(model, config)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_tasks_yaml(path: Path, base_model: str, model_type: str, tasks: list[dict]) -> None:
    import yaml

    document = {"base_model": base_model, "model_type": model_type, "tasks": tasks}
    path.write_text(yaml.safe_dump(document, sort_keys=False))


@torch.no_grad()
def accuracy(logits_of: Callable[[dict], torch.Tensor], batches: list[tuple[dict, torch.Tensor]]) -> float:
    """Percentage of examples whose arg-max logit is the label."""
    correct = total = 0
    for inputs, labels in batches:
        correct += int((logits_of(inputs).argmax(-1) == labels).sum())
        total += len(labels)
    return 100.0 * correct / total
