"""Measure how much the bundled tasks interfere, with a plain transformers forward and nothing from loramerge:
each expert (W0 + s_t B_t A_t, its own head) against task arithmetic W0 + λ Σ_t s_t B_t A_t over the grid
λ = c / K, c = 0.1 … 2.0, each task scored with its own head. λ is chosen on validation, reported on test.

    python -m examples.bundled.check --out examples/.cache/bundled
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

GRID = [round(0.1 * step, 1) for step in range(1, 21)]  # c in λ = c / K
PEFT_PREFIX = "base_model.model."


def lora_updates(adapter: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(ΔW = s·B@A per module path, head tensors by parameter name) of a PEFT LoRA folder."""
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    deltas, heads = {}, {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        if ".lora_A." in name:
            path = name.split(".lora_A.")[0]
            B = tensors[key.replace(".lora_A.", ".lora_B.")].double()
            A = tensor.double()
            rank = A.shape[0]
            alpha = _pattern(config.get("alpha_pattern") or {}, path, config["lora_alpha"])
            scale = alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
            deltas[path] = scale * B @ A
        elif ".lora_B." not in name:
            heads[name] = tensor
    return deltas, heads


def _pattern(pattern: dict, path: str, default):
    matches = [value for key, value in pattern.items() if path == key or path.endswith("." + key)]
    return matches[0] if matches else default


def _text_batches(base: str, rows: list[dict], field: str, label: str) -> list[tuple[dict, torch.Tensor]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    out = []
    for start in range(0, len(rows), 256):
        chunk = rows[start:start + 256]
        inputs = tokenizer([r[field] for r in chunk], padding=True, return_tensors="pt", return_token_type_ids=False)
        out.append((dict(inputs), torch.tensor([int(r[label]) for r in chunk])))
    return out


def _image_batches(base: str, folder: Path, labels: list[str]) -> list[tuple[dict, torch.Tensor]]:
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(base)
    files = [(path, labels.index(c.name)) for c in sorted(folder.iterdir()) for path in sorted(c.glob("*.png"))]
    images = [Image.open(path).convert("RGB") for path, _ in files]
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    return [({"pixel_values": pixels}, torch.tensor([label for _, label in files]))]


def load_setting(folder: Path) -> dict:
    """The base model, each task's update, head and batches, read from the setting's tasks.yaml."""
    import yaml
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    spec = yaml.safe_load((folder / "tasks.yaml").read_text(encoding="utf-8"))
    base = spec["base_model"]
    image = spec["model_type"] == "image-classification"
    tasks = {}
    for task in spec["tasks"]:
        deltas, head = lora_updates(folder / "adapters" / task["name"])
        batches = {}
        for split, data in task["data"].items():
            path = folder / data
            if image:
                batches[split] = _image_batches(base, path, task["labels"])
            else:
                rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()][: task.get("limit")]
                batches[split] = _text_batches(base, rows, task["text"], task["label"])
        tasks[task["name"]] = {"deltas": deltas, "head": head, "batches": batches}
    num_labels = spec["tasks"][0]["num_labels"]
    model_class = AutoModelForImageClassification if image else AutoModelForSequenceClassification
    model = model_class.from_pretrained(base, num_labels=num_labels).eval()
    return {"base": base, "model": model, "tasks": tasks, "model_class": model_class, "num_labels": num_labels}


@torch.no_grad()
def _accuracies(setting: dict, update: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Accuracy (%) of every task on every split with W = W0 + update, each task with its own head."""
    model = setting["model"]
    parameters = dict(model.named_parameters())
    originals = {path: parameters[path + ".weight"].detach().clone() for path in update}
    for path, delta in update.items():
        parameters[path + ".weight"].copy_((originals[path].double() + delta).to(originals[path].dtype))
    out = {}
    for name, task in setting["tasks"].items():
        for key, tensor in task["head"].items():
            parameters[key].copy_(tensor)
        out[name] = {}
        for split, batches in task["batches"].items():
            correct = sum(int((model(**inputs).logits.argmax(-1) == labels).sum()) for inputs, labels in batches)
            out[name][split] = 100.0 * correct / sum(len(labels) for _, labels in batches)
    for path, weight in originals.items():
        parameters[path + ".weight"].copy_(weight)
    return out


def _sum(updates: list[dict[str, torch.Tensor]], factor: float) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for update in updates:
        for path, delta in update.items():
            total[path] = total.get(path, 0) + factor * delta
    return total


@torch.no_grad()
def _peft_accuracy(setting: dict, folder: Path, name: str) -> dict[str, float]:
    """The expert's accuracy through PeftModel.from_pretrained, to cross-check the manual update."""
    from peft import PeftModel

    base = setting["model_class"].from_pretrained(setting["base"], num_labels=setting["num_labels"])
    model = PeftModel.from_pretrained(base, str(folder / "adapters" / name)).eval()
    out = {}
    for split, batches in setting["tasks"][name]["batches"].items():
        correct = sum(int((model(**inputs).logits.argmax(-1) == labels).sum()) for inputs, labels in batches)
        out[split] = 100.0 * correct / sum(len(labels) for _, labels in batches)
    return out


def measure(folder: Path) -> dict:
    """Experts, head-only base, and task arithmetic over the grid; the best λ by validation."""
    setting = load_setting(folder)
    names = list(setting["tasks"])
    count = len(names)
    experts = {}
    for name in names:
        single = {name: setting["tasks"][name]}
        experts[name] = _accuracies({**setting, "tasks": single}, setting["tasks"][name]["deltas"])[name]
    peft = {name: _peft_accuracy(setting, folder, name) for name in names}
    head_only = _accuracies(setting, {})
    updates = [setting["tasks"][name]["deltas"] for name in names]
    grid = []
    for c in GRID:
        scores = _accuracies(setting, _sum(updates, c / count))
        normalized = {split: _average([100 * scores[n][split] / experts[n][split] for n in names])
                      for split in ("validation", "test")}
        grid.append({"c": c, "lambda": round(c / count, 4), "accuracy": scores, "normalized": normalized})
    best = max(grid, key=lambda row: row["normalized"]["validation"])
    oracle = max(grid, key=lambda row: row["normalized"]["test"])
    return {
        "experts": experts, "experts_via_peft": peft, "head_only": head_only, "grid": grid,
        "ta_best": {
            "lambda": best["lambda"], "c": best["c"],
            "normalized_test": {n: round(100 * best["accuracy"][n]["test"] / experts[n]["test"], 2) for n in names},
            "average_normalized_test": round(best["normalized"]["test"], 2),
            "gap_test": round(100 - best["normalized"]["test"], 2),
        },
        "ta_oracle_test": {"lambda": oracle["lambda"],
                           "average_normalized_test": round(oracle["normalized"]["test"], 2)},
    }


def _average(values: list[float]) -> float:
    return sum(values) / len(values)


def main(argv: list[str] | None = None) -> dict:
    from rich.console import Console
    from rich.table import Table

    from examples.bundled.common import THREADS
    from loramerge_cli.evaluation.loading import quiet_transformers

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("examples/.cache/bundled"), help="the built example")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    console = Console(stderr=True)
    results = {}
    for setting in ("text", "image"):
        with quiet_transformers():
            results[setting] = result = measure(args.out / setting)
        table = Table(title=f"{setting}: experts vs task arithmetic at λ={result['ta_best']['lambda']} (test, %)")
        for column in ("task", "head only", "expert", "expert (PEFT)", "TA", "TA normalized"):
            table.add_column(column)
        best = next(row for row in result["grid"] if row["lambda"] == result["ta_best"]["lambda"])
        for name, expert in result["experts"].items():
            table.add_row(name, f"{result['head_only'][name]['test']:.1f}", f"{expert['test']:.1f}",
                          f"{result['experts_via_peft'][name]['test']:.1f}", f"{best['accuracy'][name]['test']:.1f}",
                          f"{result['ta_best']['normalized_test'][name]:.1f}")
        console.print(table)
        console.print(f"average normalized accuracy {result['ta_best']['average_normalized_test']:.1f}, "
                      f"gap {result['ta_best']['gap_test']:.1f} points")
    (args.out / "check.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
