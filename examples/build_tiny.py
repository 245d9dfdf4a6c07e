"""Build a tiny, deterministic LoRA-merging playground in a second or two, on CPU, offline.

    python examples/build_tiny.py examples/tiny

writes
    examples/tiny/base/            a 2-block LlamaForSequenceClassification (hidden 32, 3 labels)
    examples/tiny/adapters/rte/    PEFT LoRA adapters on q/k/v/o_proj, each with its own `score`
    examples/tiny/adapters/mnli/   head in modules_to_save; random A and non-zero random B
    examples/tiny/adapters/qnli/   (ranks 4, 4 and 8; qnli uses rsLoRA scaling)

so that, for example,

    loramerge inspect examples/tiny/adapters/rte examples/tiny/adapters/mnli examples/tiny/adapters/qnli
    loramerge merge --adapters examples/tiny/adapters/* --merger ties --out merged/ --head rte

run in seconds. The same output folder always receives byte-identical weights. The adapters record
the base model's path as given on the command line, so run loramerge from the same directory.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# (name, seed, rank, alpha, use_rslora)
ADAPTERS = [("rte", 1, 4, 8, False), ("mnli", 2, 4, 8, False), ("qnli", 3, 8, 6, True)]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MARKER = ".loramerge-tiny-playground"  # a folder holding it is one this script built (and may build again)


def build_base(seed: int = 0):
    """A randomly initialised 2-block Llama classifier; identical for the same seed."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=3, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForSequenceClassification(config).eval()


def build_adapter(base_dir: str, folder: Path, seed: int, rank: int, alpha: float, use_rslora: bool) -> None:
    """Wrap a fresh copy of the base with LoRA (A, B and the score head all random) and save it."""
    import torch
    from peft import LoraConfig, get_peft_model

    base = build_base()
    base.name_or_path = base_dir  # recorded as base_model_name_or_path
    config = LoraConfig(
        r=rank, lora_alpha=alpha, use_rslora=use_rslora, target_modules=TARGETS, task_type="SEQ_CLS",
        init_lora_weights=False,  # PEFT's default sets B = 0; here every adapter changes the model
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, config)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if ".lora_B." in name:
                    parameter.normal_(std=0.2)
                elif ".modules_to_save.default." in name:
                    parameter.add_(torch.randn_like(parameter))
    model.save_pretrained(str(folder))


def build(out_dir: str | Path) -> Path:
    """Write the base model and the three adapters under `out_dir`; returns it."""
    import torch

    out_dir = Path(out_dir).absolute()  # the adapters name their base by it (a relative `tiny/base` reads as a Hub id)
    if out_dir.exists() and not (out_dir / MARKER).is_file() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SystemExit(f"error: {out_dir} exists and is not a playground this script built: give a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text("built by examples/build_tiny.py\n")  # first: a half-built folder is still ours
    base_dir = out_dir / "base"
    torch.set_num_threads(1)
    build_base().save_pretrained(str(base_dir))
    for name, seed, rank, alpha, use_rslora in ADAPTERS:
        build_adapter(str(base_dir), out_dir / "adapters" / name, seed, rank, alpha, use_rslora)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default="examples/tiny", help="output folder (default: examples/tiny)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings  # peft 0.21 calls a method transformers 5 deprecates (a FutureWarning on every adapter)

    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
    out_dir = build(args.out_dir)
    for name, *_ in ADAPTERS:
        print(out_dir / "adapters" / name)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # one line and 130, as loramerge's commands
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
