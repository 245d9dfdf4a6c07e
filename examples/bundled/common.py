"""What the text and image builders share: determinism, the training loop, the LoRA config, jsonl/yaml I/O."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

THREADS = 1  # fixed so that builds are bit-for-bit repeatable on any machine


def make_deterministic() -> None:
    """One thread and deterministic kernels: the same bytes on every build."""
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)


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


def lora_config(target_modules: str, rank: int, alpha: int, head: str):
    """LoRA on the attention projections (`target_modules` is a regex), the task head saved whole."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules, modules_to_save=[head],
        init_lora_weights=True,
    )


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
