"""Turn examples into device batches once (sorted by length, deterministic), and score them.

Classifiers give one logit row per example. Causal LMs give, per example, the summed log-probability
of each choice's tokens after the prompt (optionally divided by the choice's token count).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from loramerge_cli.errors import LoramergeError, first_line


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


def forward_inputs(model) -> frozenset[str]:
    """The keyword arguments the model's forward names (a tokenizer's or processor's other outputs
    are dropped: `token_type_ids` reaches BERT, never Llama)."""
    import inspect

    parameters = inspect.signature(model.forward).parameters.values()
    return frozenset(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _encoding(encoded, accepted: frozenset[str]) -> dict[str, list[int]]:
    """A tokenizer's per-token outputs that the model takes (the attention mask is rebuilt when padding)."""
    return {key: list(values) for key, values in encoded.items()
            if key == "input_ids" or (key in accepted and key != "attention_mask")}


def _padded(sequences: list[dict[str, list[int]]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded token tensors: `input_ids` with `pad_id`, every other per-token input with 0."""
    width = max(len(sequence["input_ids"]) for sequence in sequences)
    out = {key: torch.full((len(sequences), width), pad_id if key == "input_ids" else 0, dtype=torch.long)
           for key in sequences[0]}
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        for key, values in sequence.items():
            out[key][row, : len(values)] = torch.tensor(values, dtype=torch.long)
        attention_mask[row, : len(sequence["input_ids"])] = 1
    out["attention_mask"] = attention_mask
    return {key: tensor.to(device) for key, tensor in out.items()}


def _longest_first(lengths: list[int]) -> list[int]:
    """Indices by decreasing length, ties by index: the biggest batch runs first, order is fixed."""
    return sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))


def refuse_empty(inputs: list[tuple[str, ...]], tokenizer, what: str, why: str,
                 row_of: Callable[[int], str] | None = None) -> None:
    """An example whose input has no tokens at all (empty text, and a tokenizer that adds none) is refused, naming
    the first one's row (`row_of`); the engine asks before the model loads. Only a tokenizer that gives an empty
    text no token can give an input none, so the others tokenise nothing here."""
    if not inputs or tokenizer(*[""] * len(inputs[0]), verbose=False)["input_ids"]:
        return
    encoded = tokenizer(*[list(column) for column in zip(*inputs)], verbose=False)["input_ids"]  # one batch call
    empty = [index for index, ids in enumerate(encoded) if not ids]
    if empty:
        first = row_of(empty[0]) if row_of is not None else f"example {empty[0] + 1} of those scored"
        raise LoramergeError(f"{len(empty)} example(s) have no tokens (an empty {what}, and the tokenizer adds no "
                             f"special token), so {why}: fill in their {what}, or leave them out (the first: "
                             f"{first})")


def prepare_text(
    inputs: list[tuple], tokenizer, pad_id: int, batch_size: int, max_length: int, device,
    accepted: frozenset[str] = frozenset(),
) -> PreparedTask:
    """Single texts or text pairs, tokenised with the tokenizer's own (pair) template; every per-token
    output the model's forward `accepted` (token_type_ids for BERT) goes with the ids."""
    encoded = [_encoding(tokenizer(*texts, truncation=True, max_length=max_length), accepted) for texts in inputs]
    batches = []
    for chunk in _chunks(_longest_first([len(e["input_ids"]) for e in encoded]), batch_size):
        batches.append(Batch(torch.tensor(chunk), _padded([encoded[i] for i in chunk], pad_id, device)))
    return PreparedTask(len(inputs), batches)


def encode_choices(choices: list[str], tokenizer, max_length: int, accepted: frozenset[str] = frozenset()) -> list:
    """Each choice's tokens (no special tokens); a choice with none, or with no room left for the prompt under
    `max_length`, is refused (the engine asks before the model loads)."""
    encodings = [_encoding(tokenizer(choice, add_special_tokens=False), accepted) for choice in choices]
    for choice, encoding in zip(choices, encodings):
        if not encoding["input_ids"]:
            raise LoramergeError(f"choice {choice!r} has no tokens")
        if len(encoding["input_ids"]) >= max_length:
            raise LoramergeError(f"choice {choice!r} has {len(encoding['input_ids'])} tokens: max_length {max_length} "
                                 "leaves no token of the prompt before it")
    return encodings


def prepare_choices(
    prompts: list[str], choices: list[str], tokenizer, pad_id: int, batch_size: int, max_length: int, device,
    accepted: frozenset[str] = frozenset(),
) -> PreparedTask:
    """One sequence per (example, choice): prompt tokens, then the choice's tokens (left-truncated);
    the tokenizer's other per-token outputs the model `accepted` are concatenated the same way."""
    choice_encodings = encode_choices(choices, tokenizer, max_length, accepted)
    contexts = [_encoding(tokenizer(prompt, verbose=False), accepted) for prompt in prompts]  # (left-truncated
    # below: the tokenizer's "longer than the maximum" warning would be noise, on stderr under --json too)
    sequences, lengths = [], []
    for context in contexts:
        for encoding in choice_encodings:
            keys = [key for key in context if key in encoding]
            sequences.append({key: (context[key] + encoding[key])[-max_length:] for key in keys})
            lengths.append(len(encoding["input_ids"]))
    batches = []
    for chunk in _chunks(_longest_first([len(s["input_ids"]) for s in sequences]), batch_size):
        rows, positions, targets, owners = [], [], [], []
        for row, pair in enumerate(chunk):
            ids, tail = sequences[pair]["input_ids"], lengths[pair]
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


WIDE_MODES = ("I", "F")  # PIL modes of 16- and 32-bit integer and float pixels (I;16 and its kin start with I)


class UnusableImage(ValueError):
    """An image loramerge cannot score, and why (one line)."""


def check_image(value) -> tuple[int, int]:
    """Decode the image at a path or in bytes: UnusableImage (one line) for what cannot be used: no image PIL
    reads, one cut short, one past PIL's decompression-bomb guard, and 16/32-bit or float pixels, which the RGB
    conversion would clip to white or black without a word. Returns its (width, height) as turned by
    `decoded_image`."""
    return decoded_image(value, transform=False)


def decoded_image(value, transform: bool = True):
    """The image at a path or in bytes, checked as `check_image` says, turned as its EXIF orientation says (as
    transformers' `load_image` and datasets do: a phone's portrait photo is stored sideways) and in RGB
    (`transform`; else the turned image's (width, height), without turning it)."""
    import io
    import warnings

    from PIL import ExifTags, Image, ImageOps

    try:
        with warnings.catch_warnings():  # PIL warns, on stderr, of images near its guard (the guard decides) and
            warnings.simplefilter("ignore")  # of a corrupt EXIF block (the image is used as stored): --quiet and
            # --json keep stderr for loramerge's own lines
            with Image.open(io.BytesIO(value) if isinstance(value, (bytes, bytearray)) else value) as image:
                image.load()
                if image.mode.startswith(WIDE_MODES):
                    raise UnusableImage(f"{image.mode} pixels (16/32-bit or float), which an RGB conversion "
                                        "clips; save it with 8-bit channels")
                if transform:
                    return ImageOps.exif_transpose(image).convert("RGB")
                width, height = image.size  # orientations 5 to 8 turn it a quarter (as exif_transpose reads them)
                turned = image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
                return (height, width) if turned else (width, height)
    except Image.DecompressionBombError:
        raise UnusableImage(f"larger than PIL's decompression-bomb limit ({2 * Image.MAX_IMAGE_PIXELS:,} pixels); "
                            "resize it") from None
    except UnusableImage:
        raise
    except Exception as error:  # noqa: BLE001 - PIL raises many kinds for a bad file
        raise UnusableImage(f"not an image PIL can read ({type(error).__name__})") from None


def open_image(value):
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise LoramergeError("image tasks need pillow (pip install loramerge[image])") from None
    try:
        return decoded_image(value)
    except UnusableImage as error:
        where = "image bytes" if isinstance(value, (bytes, bytearray)) else str(value)
        raise LoramergeError(f"{where}: {error}") from None


def unequal_sizes(sizes: list[tuple[int, int]]) -> LoramergeError:
    """Images of one batch that the processor leaves at several sizes (it cannot stack them)."""
    return LoramergeError(f"the images differ in size ({', '.join(f'{w}×{h}' for w, h in sizes[:3])}) and the "
                          "base's image processor does not resize them (do_resize false): give images of one size")


def check_image_batches(sizes: list[tuple[int, int]], processor, batch_size: int, model_class, config) -> None:
    """Refuse, before the weights load, images (their (width, height), in file order) that `prepare_images` could
    not batch (a batch of sizes the processor leaves unequal) or the model's forward would refuse (ViT wants its
    config's image_size): the processor runs on a blank image of each size, and the model, built from its
    config on the meta device (no weights, no memory), runs on each output shape. Only a ValueError there (a
    model's own check of its inputs) is a refusal: anything the meta device cannot run is left to the real
    forward."""
    from PIL import Image

    if not any(getattr(processor, switch, False) for switch in ("do_resize", "do_center_crop", "do_pad")):
        for start in range(0, len(sizes), batch_size):  # the sizes are the shapes: known without a blank image
            batch = sorted(set(sizes[start : start + batch_size]))  # as large as the largest (6 GB at 12000²)
            if len(batch) > 1:
                raise unequal_sizes(batch)
    try:
        shapes = {size: tuple(processor(images=[Image.new("RGB", size)], return_tensors="pt")["pixel_values"].shape[1:])
                  for size in set(sizes)}
    except Exception:  # noqa: BLE001 - a processor that cannot take a blank image: prepare_images will say
        return
    for start in range(0, len(sizes), batch_size):
        batch = sorted(set(sizes[start : start + batch_size]))
        if len({shapes[size] for size in batch}) > 1:
            raise unequal_sizes(batch)
    for shape in sorted(set(shapes.values())):
        refusal = _meta_refusal(model_class, type(config), config.to_json_string(), shape)
        if refusal is not None:
            raise ValueError(refusal)


@functools.lru_cache(maxsize=16)
def _meta_refusal(model_class, config_class, config_json: str, shape: tuple) -> str | None:
    """The ValueError's text that the model (of the config `config_json` of `config_class`, built on the meta
    device) raises on a batch of `shape`, if any; once per model and shape (every task of a spec asks)."""
    import json

    try:
        config = config_class.from_dict(json.loads(config_json))
        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            model = model_class.from_config(config).eval()
    except Exception:  # noqa: BLE001 - a model that cannot be built on the meta device: the real forward checks
        return None
    try:
        with torch.no_grad():
            model(pixel_values=torch.zeros((1, *shape), device="meta"))
    except ValueError as error:
        return str(error)
    except Exception:  # noqa: BLE001 - an operation the meta device lacks is no refusal
        pass
    return None


def prepare_images(
    images: list, processor, batch_size: int, device, dtype: torch.dtype, accepted: frozenset[str] = frozenset(),
) -> PreparedTask:
    """Images decoded and preprocessed once, in file order; every processor output the model's forward
    `accepted` is kept (`pixel_values` always), floating-point ones in the model's dtype."""
    batches = []
    for chunk in _chunks(list(range(len(images))), batch_size):
        decoded = [open_image(images[i]) for i in chunk]
        try:
            processed = processor(images=decoded, return_tensors="pt")
        except ValueError:  # images of several sizes that the processor leaves as they are
            sizes = sorted({image.size for image in decoded})
            if len(sizes) < 2:
                raise
            raise unequal_sizes(sizes) from None
        inputs = {}
        for key, value in processed.items():
            if key == "pixel_values" or (key in accepted and isinstance(value, torch.Tensor)):
                value = value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
                inputs[key] = value
        batches.append(Batch(torch.tensor(chunk), inputs))
    return PreparedTask(len(images), batches)


@contextmanager
def model_inputs_of(task: str):
    """A ValueError the model's forward raises is about the task's inputs (transformers checks them: T5's
    classifier wants an end-of-sequence token in every example), an IndexError too (an id past an embedding
    table): one line naming the task, not an internal error."""
    try:
        yield
    except ValueError as error:
        raise LoramergeError(f"task {task}: the model refuses its inputs: {first_line(error)}") from error
    except IndexError as error:  # an embedding's lookup: a token id or token type past the model's tables
        raise LoramergeError(f"task {task}: the model refuses its inputs: {first_line(error)} (a token id or token "
                             "type past the model's embeddings: is the tokenizer the model's?)") from error


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
