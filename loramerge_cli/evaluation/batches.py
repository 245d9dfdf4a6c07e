"""Turn examples into device batches once (sorted by length, deterministic), and score them.

Classifiers give one logit row per example. Causal LMs give, per example, the summed log-probability
of each choice's tokens after the prompt (optionally divided by the choice's token count).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loramerge_cli.errors import LoramergeError


@dataclass
class Batch:
    indices: torch.Tensor  # which examples (classifiers) or (example, choice) pairs (causal LM) it holds
    inputs: dict[str, torch.Tensor]  # model keyword arguments, on the device
    # causal LM only: for every choice token, its batch row, its position, its id, and its pair
    rows: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    owners: torch.Tensor | None = None


@dataclass
class PreparedTask:
    count: int  # examples
    batches: list[Batch]
    choice_lengths: torch.Tensor | None = None  # causal LM: tokens per (example, choice) pair
    choices: int = 0


def _chunks(order: list[int], size: int) -> list[list[int]]:
    return [order[start : start + size] for start in range(0, len(order), size)]


def _padded(sequences: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def _longest_first(lengths: list[int]) -> list[int]:
    """Indices by decreasing length, ties by index: the biggest batch runs first, order is fixed."""
    return sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))


def prepare_text(inputs: list[tuple], tokenizer, pad_id: int, batch_size: int, max_length: int, device) -> PreparedTask:
    """Single texts or text pairs, tokenised with the tokenizer's own (pair) template."""
    encoded = [tokenizer(*texts, truncation=True, max_length=max_length)["input_ids"] for texts in inputs]
    batches = []
    for chunk in _chunks(_longest_first([len(ids) for ids in encoded]), batch_size):
        batches.append(Batch(torch.tensor(chunk), _padded([encoded[i] for i in chunk], pad_id, device)))
    return PreparedTask(len(inputs), batches)


def prepare_choices(
    prompts: list[str], choices: list[str], tokenizer, pad_id: int, batch_size: int, max_length: int, device
) -> PreparedTask:
    """One sequence per (example, choice): prompt tokens, then the choice's tokens (left-truncated)."""
    choice_ids = [tokenizer(choice, add_special_tokens=False)["input_ids"] for choice in choices]
    for choice, ids in zip(choices, choice_ids):
        if not ids:
            raise LoramergeError(f"choice {choice!r} has no tokens")
        if len(ids) >= max_length:
            raise LoramergeError(f"choice {choice!r} is longer than max_length {max_length}")
    sequences, lengths = [], []
    for prompt in prompts:
        context = tokenizer(prompt)["input_ids"]
        for ids in choice_ids:
            sequences.append((context + ids)[-max_length:])
            lengths.append(len(ids))
    batches = []
    for chunk in _chunks(_longest_first([len(ids) for ids in sequences]), batch_size):
        rows, positions, targets, owners = [], [], [], []
        for row, pair in enumerate(chunk):
            ids, tail = sequences[pair], lengths[pair]
            for position in range(len(ids) - tail, len(ids)):
                rows.append(row)
                positions.append(position)
                targets.append(ids[position])
                owners.append(pair)
        batch = Batch(torch.tensor(chunk), _padded([sequences[i] for i in chunk], pad_id, device))
        batch.rows, batch.positions = torch.tensor(rows, device=device), torch.tensor(positions, device=device)
        batch.targets, batch.owners = torch.tensor(targets, device=device), torch.tensor(owners)
        batches.append(batch)
    return PreparedTask(len(prompts), batches, torch.tensor(lengths, dtype=torch.float64), len(choices))


def open_image(value):
    try:
        from PIL import Image
    except ImportError:
        raise LoramergeError("image tasks need pillow (pip install loramerge[image])") from None
    import io

    try:
        source = io.BytesIO(value) if isinstance(value, (bytes, bytearray)) else value
        with Image.open(source) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        where = "image bytes" if isinstance(value, (bytes, bytearray)) else str(value)
        raise LoramergeError(f"{where}: cannot read image ({error})") from None


def prepare_images(images: list, processor, batch_size: int, device, dtype: torch.dtype) -> PreparedTask:
    """Images decoded and preprocessed once, in file order."""
    batches = []
    for chunk in _chunks(list(range(len(images))), batch_size):
        pixels = processor(images=[open_image(images[i]) for i in chunk], return_tensors="pt")["pixel_values"]
        batches.append(Batch(torch.tensor(chunk), {"pixel_values": pixels.to(device=device, dtype=dtype)}))
    return PreparedTask(len(images), batches)


def classifier_scores(model, task: PreparedTask) -> torch.Tensor:
    """(examples × classes) float32 logits, in example order."""
    parts, order = [], []
    with torch.inference_mode():
        for batch in task.batches:
            parts.append(model(**batch.inputs).logits.float().cpu())
            order.append(batch.indices)
    logits = torch.cat(parts)
    out = torch.empty_like(logits)
    out[torch.cat(order)] = logits
    return out


def choice_scores(model, task: PreparedTask, length_normalize: bool) -> torch.Tensor:
    """(examples × choices) float64: Σ log p(choice token | everything before it)."""
    totals = torch.zeros(task.count * task.choices, dtype=torch.float64)
    with torch.inference_mode():
        for batch in task.batches:
            logits = model(**batch.inputs).logits
            picked = logits[batch.rows, batch.positions - 1].float().log_softmax(dim=-1)
            log_probs = picked.gather(1, batch.targets[:, None]).squeeze(1).double().cpu()
            totals.index_add_(0, batch.owners, log_probs)
    if length_normalize:
        totals = totals / task.choice_lengths
    return totals.reshape(task.count, task.choices)
