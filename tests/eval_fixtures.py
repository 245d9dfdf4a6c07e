"""Tiny real models, PEFT adapters and task data for the evaluation tests (built in about a second).

Nothing is downloaded: the tokenizer is a word-level vocabulary built here, the base models are
randomly initialised transformers models saved to a temporary folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

WORDS = [f"w{i}" for i in range(40)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]


def save_word_tokenizer(folder: Path, segments: bool = False) -> None:
    """A whitespace word-level tokenizer with [CLS] a [SEP] b [SEP] pair template; with `segments` it also
    returns token_type_ids (1 on b [SEP]), as BERT's tokenizers do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL + WORDS + [" yes", " no", "yes", "no"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    names = ["input_ids", "token_type_ids", "attention_mask"] if segments else ["input_ids", "attention_mask"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        eos_token="[EOS]", model_max_length=64, model_input_names=names,
    )
    tokenizer.save_pretrained(str(folder))


def vocab_size() -> int:
    return len(SPECIAL) + len(WORDS) + 4


def build_llama_classifier(folder: Path, num_labels: int = 3, seed: int = 0, layers: int = 2) -> Path:
    """A Llama sequence classifier (hidden 16, 2 blocks unless told) with its tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=vocab_size(), hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=num_labels, pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(str(folder))
    save_word_tokenizer(folder)
    return folder


def build_bert_classifier(folder: Path, num_labels: int = 2, seed: int = 0) -> Path:
    """A 2-block BERT sequence classifier (head `classifier`) whose segment embeddings are large, so that
    token_type_ids change its predictions; its tokenizer returns token_type_ids."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size(), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, type_vocab_size=2, num_labels=num_labels, pad_token_id=0,
        initializer_range=0.3,  # predictions that vary with the input, not only the head's bias
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config).eval()
        with torch.no_grad():
            model.bert.embeddings.token_type_embeddings.weight.normal_(0.0, 1.0)
    model.save_pretrained(str(folder))
    save_word_tokenizer(folder, segments=True)
    return folder


def build_gpt2_lm(folder: Path, seed: int = 0) -> Path:
    """A 2-block GPT-2 causal LM (Conv1D layers: fan_in_fan_out adapters)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size(), n_embd=16, n_layer=2, n_head=2, n_positions=64, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(str(folder))
    save_word_tokenizer(folder)
    return folder


def build_vit_classifier(folder: Path, num_labels: int = 3, seed: int = 0) -> Path:
    """A 2-block ViT on 8×8 RGB images with its image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_labels=num_labels,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTForImageClassification(config).eval()
    model.save_pretrained(str(folder))
    ViTImageProcessor(size={"height": 8, "width": 8}, do_resize=True).save_pretrained(str(folder))
    return folder


def save_peft_adapter(
    base: Path, folder: Path, targets: list[str], model_class: str, task_type: str, seed: int,
    head_modules: list[str] | None = None, rank: int = 4, alpha: float = 8.0, fan_in_fan_out: bool = False,
) -> Path:
    """A PEFT LoRA adapter with random (non-zero) B factors and, if asked, a random task head."""
    import transformers
    from peft import LoraConfig, get_peft_model

    model = getattr(transformers, model_class).from_pretrained(str(base))
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, task_type=task_type, modules_to_save=head_modules,
        fan_in_fan_out=fan_in_fan_out, init_lora_weights=True,
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(str(folder))
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def text_rows(count: int, seed: int, num_labels: int = 3) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        lengths = torch.randint(1, 9, (2,), generator=generator).tolist()
        premise = " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (lengths[0],), generator=generator))
        hypothesis = " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (lengths[1],), generator=generator))
        label = int(torch.randint(0, num_labels, (1,), generator=generator))
        rows.append({"premise": premise, "hypothesis": hypothesis, "label": label})
    return rows


@dataclass
class TextSetting:
    """A base classifier, K expert adapters (one per task), their data and tasks.yaml."""

    root: Path
    base: Path
    adapters: dict[str, Path]
    tasks_file: Path

    def adapter_args(self) -> list[str]:
        return [f"{name}={path}" for name, path in self.adapters.items()]


def build_text_setting(
    root: Path, task_names=("alpha", "beta", "gamma"), rows: int = 24, layers: int = 2
) -> TextSetting:
    """Three NLI-like tasks on a tiny Llama classifier; `gamma` masks class 1 (its random labels include 1: those
    rows always count as wrong)."""
    base = build_llama_classifier(root / "base", layers=layers)
    adapters, tasks = {}, []
    for index, name in enumerate(task_names):
        adapters[name] = save_peft_adapter(
            base, root / "adapters" / name, ["q_proj", "v_proj"], "LlamaForSequenceClassification", "SEQ_CLS",
            seed=100 + index,
        )
        data = {
            split: str(write_jsonl(root / "data" / name / f"{split}.jsonl", text_rows(rows, seed=10 * index + k)))
            for k, split in enumerate(("validation", "test"))
        }
        task = {"name": name, "data": data, "text": ["premise", "hypothesis"], "label": "label", "num_labels": 3,
                "head": "from-adapter"}
        if name == "gamma":
            task["masked_labels"] = [1]
        tasks.append(task)
    tasks_file = root / "tasks.yaml"
    write_tasks_file(tasks_file, {"base_model": str(base), "model_type": "sequence-classification", "tasks": tasks})
    return TextSetting(root, base, adapters, tasks_file)


def write_tasks_file(path: Path, content: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path
