"""Build the bundled example (cached): small text and image settings with LoRA experts, data, tasks.yaml.

A text setting (a small Llama, four interfering tasks) and an image setting (a small ViT on
scikit-learn's digits, three tasks), each with a base model folder, one PEFT adapter per task,
validation and test splits and a tasks.yaml:

    python -m examples.bundled.build --out examples/.cache/bundled      # from the repository root

The build is deterministic (fixed seeds, one thread, deterministic kernels) and cached: `build.json`
holds a stamp of the builder's code, settings and library versions; an up-to-date folder is kept as is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from examples.bundled import image, text

HERE = Path(__file__).parent
DEFAULT_OUT = HERE.resolve().parent / ".cache" / "bundled"  # (the repository's, wherever a script runs from)
MARKER = ".loramerge-bundled-example"  # written first, so a half-built folder is still known as ours
LIBRARIES = ("torch", "transformers", "peft", "tokenizers", "scikit-learn", "pillow")


@dataclass(frozen=True)
class Scale:
    text: text.TextSettings
    image: image.ImageSettings


FULL = Scale(text.TextSettings(), image.ImageSettings())
TINY = Scale(  # seconds, for tests: same code path, small models and data
    text.TextSettings(hidden=32, layers=2, heads=2, pretrain_steps=20, pretrain_sentences=128, adapter_steps=10,
                      batch=16, train_examples=64, validation_examples=16, test_examples=16),
    image.ImageSettings(hidden=32, layers=2, heads=2, patch=4, pretrain_steps=10, adapter_steps=5, batch=16,
                        validation_examples=20, test_examples=20),
)


def stamp(scale: Scale) -> str:
    """sha256 of the builder's source files, the settings and the versions of the libraries it uses."""
    from importlib.metadata import version

    digest = hashlib.sha256()
    for source in sorted(HERE.glob("*.py")):
        if source.name != "check.py":
            digest.update(source.name.encode() + b"\0" + source.read_bytes())
    versions = [version(package) for package in LIBRARIES]
    digest.update(json.dumps({"settings": asdict(scale), "versions": versions}, sort_keys=True).encode())
    return digest.hexdigest()


def up_to_date(out: Path, key: str) -> bool:
    record = out / "build.json"
    return record.is_file() and json.loads(record.read_text(encoding="utf-8")).get("stamp") == key


def build(out: Path, scale: Scale = FULL, force: bool = False, log=lambda message: None) -> dict:
    """Build into `out` unless it is up to date; returns the build record (what build.json holds)."""
    from examples.bundled.common import deterministic
    from loramerge_cli.evaluation.loading import quiet_transformers

    out = out.resolve()
    key = stamp(scale)  # before building: the code that runs is the code stamped
    if not force and up_to_date(out, key):
        log(f"{out} is up to date")
        return json.loads((out / "build.json").read_text(encoding="utf-8"))
    _clear(out)
    out.mkdir(parents=True)
    (out / MARKER).touch()
    started = time.perf_counter()
    with deterministic(), quiet_transformers():
        log("text setting: tokenizer, base model, four adapters")
        text_experts = text.build(out / "text", scale.text, log)
        log("image setting: base ViT, three adapters")
        image_experts = image.build(out / "image", scale.image, log)
    record = {
        "stamp": key,
        "settings": asdict(scale),
        "experts": {"text": text_experts, "image": image_experts},
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    (out / "build.json").write_text(json.dumps(record, indent=1))
    log(f"built {out} in {record['build_seconds']} s")
    return record


def _clear(out: Path) -> None:
    """Remove a previous build; refuse to touch a folder that is not one."""
    from loramerge_cli.errors import LoramergeError

    if not out.exists():
        return
    if not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists()):
        raise LoramergeError(f"{out} exists and is not a bundled-example build; choose another --out")
    shutil.rmtree(out)


def main(argv: list[str] | None = None) -> dict:
    from rich.console import Console

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long miniature, for tests")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder is up to date")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    return build(args.out, TINY if args.tiny else FULL, args.force, log=console.log)


if __name__ == "__main__":
    main()
