"""Tiny transformers models and real PEFT LoRA adapters, built in-process in milliseconds.

Every builder is deterministic: weights come from a seeded fork of torch's global generator, so
building twice gives identical tensors and the caller's random state is left untouched.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

VOCAB = 64
HIDDEN = 16
NUM_LABELS = 3


@contextmanager
def seeded(seed: int):
    """Run the block with torch's global generator seeded, restoring the previous state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_llama(seed: int = 0):
    """A 2-block LlamaForSequenceClassification (hidden 16, 3 labels, head `score`), in eval mode."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        num_labels=NUM_LABELS, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    with seeded(seed):
        return LlamaForSequenceClassification(config).eval()


def tiny_gpt2(seed: int = 0):
    """A 2-block GPT2LMHeadModel: its c_attn / c_proj / c_fc are Conv1D (weights stored d_in × d_out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=32,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    with seeded(seed):
        return GPT2LMHeadModel(config).eval()


def tiny_vit(seed: int = 0):
    """A 2-block ViTForImageClassification on 8×8 images (head `classifier`)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, num_labels=NUM_LABELS,
    )
    with seeded(seed):
        return ViTForImageClassification(config).eval()


class TinyConvNet(torch.nn.Module):
    """A conv layer and a linear layer, for Conv2d LoRA (which loramerge refuses)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=3)
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(self.conv(x).mean(dim=(2, 3)))


def tiny_convnet(seed: int = 0) -> TinyConvNet:
    with seeded(seed):
        return TinyConvNet().eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "vit": tiny_vit, "convnet": tiny_convnet}


def peft_lora(base, seed: int, adapter_name: str = "default", config_class=None, **config):
    """Wrap `base` with a PEFT adapter whose A and B are random (B non-zero) and whose heads
    (modules_to_save) are perturbed away from the base's, so every task differs from the base."""
    from peft import LoraConfig, get_peft_model

    config_class = config_class or LoraConfig
    if config_class is LoraConfig:
        config.setdefault("init_lora_weights", False)
    with seeded(seed):
        model = get_peft_model(base, config_class(**config), adapter_name=adapter_name)
        for name, parameter in model.named_parameters():
            if f"modules_to_save.{adapter_name}." in name:
                parameter.data += torch.randn_like(parameter)
    return model.eval()


def save_lora(
    model_kind: str, directory: str | Path, seed: int, adapter_name: str = "default", config_class=None, **config
) -> Path:
    """Build a fresh tiny base of `model_kind`, wrap it with `peft_lora` and `save_pretrained` it.

    Returns the folder holding adapter_config.json (PEFT puts a non-default adapter in a subfolder).
    """
    model = peft_lora(BUILDERS[model_kind](), seed, adapter_name, config_class, **config)
    model.save_pretrained(str(directory), selected_adapters=[adapter_name])
    return Path(directory) if adapter_name == "default" else Path(directory) / adapter_name


def token_inputs(batch: int = 3, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids (no padding) and attention mask for the tiny Llama / GPT-2."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def patched_forward(model, deltas: dict[str, torch.Tensor], inputs: dict, head: dict[str, torch.Tensor] | None = None):
    """Logits of `model` with W0 + ΔW written into each module's weight by hand (and `head` tensors
    replacing the head's parameters). ΔW is in Linear (d_out × d_in) orientation; Conv1D weights get
    its transpose."""
    from transformers.pytorch_utils import Conv1D

    with torch.no_grad():
        for path, delta in deltas.items():
            module = model.get_submodule(path)
            weight = module.weight
            update = delta.T if isinstance(module, Conv1D) else delta
            weight += update.to(weight.dtype)
        for key, tensor in (head or {}).items():
            model.get_parameter(key).copy_(tensor)
        return model(**inputs).logits
