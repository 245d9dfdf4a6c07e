"""The text setting: a word-level tokenizer, a small Llama pretrained on the synthetic language (next word
and related sentence rules), four 4-class tasks with LoRA experts, jsonl splits and tasks.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from examples.bundled import common, language

SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
# (rank, alpha) per task: alpha differs from r on most, and one rank differs.
LORA_SHAPES = {"first_kind": (8, 16), "last_kind": (8, 8), "after_marker": (4, 8), "majority_kind": (8, 16)}


@dataclass(frozen=True)
class TextSettings:
    hidden: int = 64
    layers: int = 8
    heads: int = 4
    pretrain_steps: int = 400
    pretrain_sentences: int = 8192
    pretrain_lr: float = 2e-3
    adapter_steps: int = 250
    adapter_lr: float = 3e-3
    batch: int = 64
    train_examples: int = 4096
    validation_examples: int = 256
    test_examples: int = 512
    seed: int = 11


def build(out: Path, settings: TextSettings, log=lambda message: None) -> dict:
    """Write base/, adapters/<task>/, data/<task>/{validation,test}.jsonl and tasks.yaml under `out`."""
    words = language.vocabulary()
    kind_of = {w: k for k, group in enumerate(words) for w in group}
    base = (out / "base").resolve()
    tokenizer = _tokenizer(words)
    tokenizer.save_pretrained(base)
    log("text: pretraining the base model")
    model = _pretrain(tokenizer, words, settings)
    model.save_pretrained(base)
    report = {}
    tasks = []
    for index, (name, rule) in enumerate(language.TASKS.items()):
        log(f"text: training adapter {name} ({index + 1} of {len(language.TASKS)})")
        seed = settings.seed * 100 + index
        splits = {
            split: _examples(rule, kind_of, words, count, seed * 10 + offset)
            for offset, (split, count) in enumerate(
                [("train", settings.train_examples), ("validation", settings.validation_examples),
                 ("test", settings.test_examples)]
            )
        }
        for split in ("validation", "test"):
            common.write_jsonl(out / "data" / name / f"{split}.jsonl", splits[split])
        report[name] = _train_adapter(base, tokenizer, name, splits, settings, seed)
        tasks.append({
            "name": name,
            "data": {"validation": f"data/{name}/validation.jsonl", "test": f"data/{name}/test.jsonl"},
            "text": "text", "label": "label", "num_labels": language.KIND_COUNT,
            "head": "from-adapter",
        })
    common.write_tasks_yaml(out / "tasks.yaml", str(base), "sequence-classification", tasks)
    return report


def _tokenizer(words: list[list[str]]):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + [language.MARKER] + [w for g in words for w in g])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # The classifier reads the last token: [EOS] has to gather what the task needs from the sentence.
    core.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", pair="[BOS] $A [EOS] $B:1 [EOS]:1",
        special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
        model_max_length=language.MAX_LENGTH + 3, padding_side="right",
    )


def _config(tokenizer, settings: TextSettings):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=settings.hidden, num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads, num_key_value_heads=settings.heads // 2,
        intermediate_size=2 * settings.hidden, max_position_embeddings=language.MAX_LENGTH + 8,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )


def _pretrain(tokenizer, words, settings: TextSettings):
    """Next-word prediction plus related sentence rules read at [EOS] (language.PRETRAINING_RULES), so the
    base already tracks kinds and positions. Returns the causal LM that becomes the base."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(settings.seed)  # weight init reads the global generator
    model = LlamaForCausalLM(_config(tokenizer, settings))
    rule_heads = torch.nn.Linear(settings.hidden, language.KIND_COUNT * len(language.PRETRAINING_RULES))
    model.add_module("pretraining_rules", rule_heads)  # trained with the model, not saved with the base
    kind_of = {w: k for k, group in enumerate(words) for w in group}
    generator = torch.Generator().manual_seed(settings.seed)
    pool = [language.sentence(language.sample_kinds(generator), generator, words)
            for _ in range(settings.pretrain_sentences)]
    inputs = tokenizer([" ".join(tokens) for tokens in pool], padding=True, return_tensors="pt",
                       return_token_type_ids=False)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    rule_labels = torch.tensor([[rule(tokens, kind_of) for rule in language.PRETRAINING_RULES] for tokens in pool])
    last = inputs["attention_mask"].sum(1) - 1  # the [EOS] position

    def batch(generator):
        picks = torch.randint(len(pool), (settings.batch,), generator=generator)
        return {key: value[picks] for key, value in inputs.items()}, (labels[picks], rule_labels[picks], last[picks])

    def loss_of(model, batch_inputs, targets):
        token_labels, rules, positions = targets
        output = model(**batch_inputs, labels=token_labels, output_hidden_states=True)
        states = output.hidden_states[-1][torch.arange(len(positions)), positions]
        logits = model.pretraining_rules(states).view(-1, language.KIND_COUNT)
        return output.loss + torch.nn.functional.cross_entropy(logits, rules.view(-1))

    common.train(model, batch, loss_of, settings.pretrain_steps, settings.pretrain_lr, settings.seed)
    del model.pretraining_rules
    return model


def _examples(rule, kind_of, words, count: int, seed: int) -> list[dict]:
    """`count` sentences with balanced labels (rejection sampling), in a seeded shuffled order."""
    generator = torch.Generator().manual_seed(seed)
    per_class = -(-count // language.KIND_COUNT)
    buckets: list[list[dict]] = [[] for _ in range(language.KIND_COUNT)]
    while sum(len(b) for b in buckets) < per_class * language.KIND_COUNT:
        tokens = language.sentence(language.sample_kinds(generator), generator, words)
        label = rule(tokens, kind_of)
        if len(buckets[label]) < per_class:
            buckets[label].append({"text": " ".join(tokens), "label": label})
    rows = [row for bucket in buckets for row in bucket]
    order = torch.randperm(len(rows), generator=generator)[:count].tolist()
    return [rows[i] for i in order]


def encode(tokenizer, rows: list[dict], batch_size: int) -> list[tuple[dict, torch.Tensor]]:
    """Tokenised batches (inputs, labels) in file order."""
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        inputs = tokenizer([r["text"] for r in chunk], padding=True, return_tensors="pt", return_token_type_ids=False)
        out.append((dict(inputs), torch.tensor([r["label"] for r in chunk])))
    return out


def load_classifier(base: Path | str, num_labels: int, seed: int):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)  # the fresh head's init reads the global generator
    return AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=num_labels)


def _train_adapter(base: Path, tokenizer, name: str, splits: dict, settings: TextSettings, seed: int) -> dict:
    rank, alpha = LORA_SHAPES[name]
    model = common.add_lora(load_classifier(base, language.KIND_COUNT, seed), rank, alpha, "score", "SEQ_CLS")
    train_rows = splits["train"]

    def batch(generator):
        picks = torch.randint(len(train_rows), (settings.batch,), generator=generator).tolist()
        inputs, labels = encode(tokenizer, [train_rows[i] for i in picks], settings.batch)[0]
        return inputs, labels

    def loss_of(model, inputs, labels):
        return torch.nn.functional.cross_entropy(model(**inputs).logits, labels)

    common.train(model, batch, loss_of, settings.adapter_steps, settings.adapter_lr, seed)
    model.save_pretrained(base.parent / "adapters" / name)
    return {
        split: round(common.accuracy(lambda inputs: model(**inputs).logits, encode(tokenizer, splits[split], 256)), 2)
        for split in ("validation", "test")
    }
