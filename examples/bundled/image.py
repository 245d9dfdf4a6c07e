"""The image setting on scikit-learn's digits: a small ViT pretrained on upright digits, three tasks that
read the same digits drawn another way (rotated, mirrored, inverted), LoRA experts, PNG trees, tasks.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from examples.bundled import common

CLASS_NAMES = [str(digit) for digit in range(10)]
TRANSFORMS = {
    "rotated": lambda images: np.rot90(images, k=1, axes=(1, 2)),
    "mirrored": lambda images: images[:, :, ::-1],
    "inverted": lambda images: 255 - images,
}
LORA_SHAPES = {"rotated": (8, 16), "mirrored": (4, 4), "inverted": (8, 8)}  # (rank, alpha)


@dataclass(frozen=True)
class ImageSettings:
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    patch: int = 2
    pretrain_steps: int = 400
    pretrain_lr: float = 2e-3
    adapter_steps: int = 250
    adapter_lr: float = 3e-3
    batch: int = 64
    validation_examples: int = 256
    test_examples: int = 256
    seed: int = 23


def build(out: Path, settings: ImageSettings, log=lambda message: None) -> dict:
    """Write base/, adapters/<task>/, data/<task>/{validation,test}/<digit>/*.png and tasks.yaml under `out`."""
    splits = _digit_splits(settings)
    base = (out / "base").resolve()
    processor = _processor()
    processor.save_pretrained(base)
    log("image: pretraining the base model")
    model = _pretrain(processor, splits["train"], settings)
    model.save_pretrained(base)
    report = {}
    tasks = []
    for index, (name, transform) in enumerate(TRANSFORMS.items()):
        log(f"image: training adapter {name} ({index + 1} of {len(TRANSFORMS)})")
        task_splits = {split: (np.ascontiguousarray(transform(images)), labels)
                       for split, (images, labels) in splits.items()}
        for split in ("validation", "test"):
            _write_tree(out / "data" / name / split, *task_splits[split])
        report[name] = _train_adapter(base, processor, name, task_splits, settings, settings.seed * 100 + index)
        tasks.append({
            "name": name,
            "data": {"validation": f"data/{name}/validation", "test": f"data/{name}/test"},
            "labels": CLASS_NAMES, "num_labels": len(CLASS_NAMES), "head": "from-adapter",
        })
    common.write_tasks_yaml(out / "tasks.yaml", str(base), "image-classification", tasks)
    return report


def _digit_splits(settings: ImageSettings) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """RGB uint8 digits (n, 8, 8, 3) and labels, split by a seeded permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(settings.seed)).numpy()
    validation = order[: settings.validation_examples]
    test = order[settings.validation_examples: settings.validation_examples + settings.test_examples]
    train = order[settings.validation_examples + settings.test_examples:]
    return {split: (images[rows], digits.target[rows]) for split, rows in
            (("train", train), ("validation", validation), ("test", test))}


def _processor():
    import transformers

    processor_class = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    return processor_class(size={"height": 8, "width": 8}, do_resize=False, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def pixels(processor, images: np.ndarray) -> torch.Tensor:
    from PIL import Image

    return processor([Image.fromarray(image) for image in images], return_tensors="pt")["pixel_values"]


def _pretrain(processor, train: tuple[np.ndarray, np.ndarray], settings: ImageSettings):
    """Classify upright digits; the whole model (with its 10-way classifier) becomes the base."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8, patch_size=settings.patch, num_channels=3, hidden_size=settings.hidden,
        num_hidden_layers=settings.layers, num_attention_heads=settings.heads, intermediate_size=2 * settings.hidden,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=len(CLASS_NAMES),
        id2label=dict(enumerate(CLASS_NAMES)), label2id={name: i for i, name in enumerate(CLASS_NAMES)},
    )
    torch.manual_seed(settings.seed)  # weight init reads the global generator
    model = ViTForImageClassification(config)
    _fit(model, pixels(processor, train[0]), torch.as_tensor(train[1]), settings.pretrain_steps,
         settings.pretrain_lr, settings.batch, settings.seed)
    return model


def _fit(model, images: torch.Tensor, labels: torch.Tensor, steps: int, lr: float, batch_size: int, seed: int):
    def batch(generator):
        picks = torch.randint(len(images), (batch_size,), generator=generator)
        return {"pixel_values": images[picks]}, labels[picks]

    def loss_of(model, inputs, targets):
        return torch.nn.functional.cross_entropy(model(**inputs).logits, targets)

    return common.train(model, batch, loss_of, steps, lr, seed)


def _write_tree(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from PIL import Image

    for index, (image, label) in enumerate(zip(images, labels)):
        target = folder / CLASS_NAMES[int(label)]
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target / f"{index:04d}.png")


def load_classifier(base: Path | str, seed: int):
    from transformers import AutoModelForImageClassification

    torch.manual_seed(seed)
    return AutoModelForImageClassification.from_pretrained(str(base))


def _train_adapter(base: Path, processor, name: str, splits: dict, settings: ImageSettings, seed: int) -> dict:
    rank, alpha = LORA_SHAPES[name]
    model = common.add_lora(load_classifier(base, seed), rank, alpha, "classifier")
    images, labels = splits["train"]
    _fit(model, pixels(processor, images), torch.as_tensor(labels), settings.adapter_steps, settings.adapter_lr,
         settings.batch, seed)
    model.save_pretrained(base.parent / "adapters" / name)
    report = {}
    for split in ("validation", "test"):
        inputs = pixels(processor, splits[split][0])
        batches = [({"pixel_values": inputs}, torch.as_tensor(splits[split][1]))]
        report[split] = round(common.accuracy(lambda x: model(**x).logits, batches), 2)
    return report
