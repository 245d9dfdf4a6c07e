"""Load the base model once, with its tokenizer or image processor, by the spec's model type."""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from loramerge_cli.adapters.sources import base_reference
from loramerge_cli.errors import LoramergeError, UsageError, first_line
from loramerge_cli.evaluation.task_types import TaskType

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise LoramergeError(f"--dtype must be one of {', '.join(DTYPES)} (got {name!r})")
    return DTYPES[name]


def torch_device(name: str, flag: str = "--device") -> torch.device:
    """The torch device `name` (given by `flag`), present on this machine, or one line saying why not."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{flag} {name!r} is not a device (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoramergeError(f"{flag} {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        shown = "cuda:0" if count == 1 else f"cuda:0 … cuda:{count - 1}"
        raise LoramergeError(f"{flag} {name}: this machine has {count} CUDA device{'s' if count != 1 else ''}"
                             + (f" ({shown})" if count else ""))
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LoramergeError(f"{flag} {name}: MPS is not available on this machine")
    return device


@contextmanager
def quiet_transformers():
    """No warnings about freshly initialised heads (heads are swapped per task) and no progress bars; the caller's
    settings are restored as they were, huggingface_hub's per-group progress-bar states included (transformers'
    enable_progress_bar would turn every hub bar on)."""
    import importlib
    import warnings

    from transformers.utils import logging

    hub_bars = importlib.import_module("huggingface_hub.utils.tqdm").progress_bar_states
    level, bars, hub_states = logging.get_verbosity(), logging.is_progress_bar_enabled(), dict(hub_bars)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Cannot (en|dis)able progress bars", UserWarning)  # HF_HUB_DISABLE_… set
        logging.set_verbosity_error()
        logging.disable_progress_bar()
        try:
            # peft 0.21 calls a method transformers 5 deprecates; nothing a caller can change.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            yield
        finally:
            logging.set_verbosity(level)
            if bars:
                logging.enable_progress_bar()
            hub_bars.clear()
            hub_bars.update(hub_states)


def load_base_config(base: str):
    """The base model's config (no weights)."""
    import transformers

    name, revision = base_reference(base)
    try:
        with quiet_transformers():
            return transformers.AutoConfig.from_pretrained(name, revision=revision)
    except (OSError, ValueError, KeyError) as error:
        raise LoramergeError(f"{base}: cannot read the base model's config ({first_line(error)})") from None


def load_base(base: str, task_type: TaskType, device: torch.device, dtype: torch.dtype, num_labels: int | None):
    """The base model in eval mode on `device`, with a `num_labels`-way head for classifiers."""
    import transformers
    from safetensors import SafetensorError

    from loramerge_cli import interrupts

    class_name = task_type.model_class
    model_class = getattr(transformers, class_name)
    kwargs: dict = {"dtype": dtype}
    try:
        with quiet_transformers():
            if num_labels is not None and task_type.classifier:
                if getattr(load_base_config(base), "num_labels", None) != num_labels:
                    kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
            with torch.random.fork_rng(devices=[]):  # a new head is initialised from torch's global generator:
                name, revision = base_reference(base)  # (the caller's random state is left as it was)
                model = model_class.from_pretrained(name, revision=revision, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:  # e.g. truncated weights
        interrupts.check()  # a Ctrl-C that a library turned into an error stays a Ctrl-C
        raise LoramergeError(f"{base}: cannot load the base model as {class_name} ({first_line(error)})") from None
    try:
        return model.to(device).eval()
    except torch.cuda.OutOfMemoryError:  # (torch.OutOfMemoryError from torch 2.5; this name since 1.13)
        raise LoramergeError(f"{base}: the base model in {str(dtype).removeprefix('torch.')} does not fit in "
                             f"{device}'s memory; free the device, evaluate in a smaller dtype, or give another "
                             "--device") from None


def load_preprocessor(base: str, task_type: TaskType):
    """The task type's preprocessor: a tokenizer (given a pad token when it has none) or an image processor."""
    import transformers

    try:
        with quiet_transformers():
            name, revision = base_reference(base)
            preprocessor = getattr(transformers, task_type.preprocessor_class).from_pretrained(name, revision=revision)
            if task_type.preprocessor_class != "AutoTokenizer":
                return preprocessor
            tokenizer = preprocessor
    except (OSError, ValueError, KeyError) as error:
        raise LoramergeError(f"{base}: cannot load its tokenizer or image processor ({first_line(error)})") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise LoramergeError(f"{base}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def base_identity(base: str, model) -> str:
    """A cheap fingerprint of the base: its config, each weight file's name, size and mtime (an edit that keeps
    both is not seen: a search's resume hashes them whole), and the content of every other file of the folder
    (tokenizer, preprocessor: they change the inputs)."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    folder = Path(base)
    if folder.is_dir():
        for file in sorted(path for path in folder.iterdir() if path.is_file()):
            if file.suffix in (".safetensors", ".bin", ".pt", ".pth"):  # (gigabytes: not read on every command)
                stat = file.stat()
                digest.update(os.fsencode(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}"))
            else:
                digest.update(os.fsencode(file.name) + b":" + hashlib.sha256(file.read_bytes()).digest())
    else:
        digest.update(f"{base}@{getattr(model.config, '_commit_hash', None)}".encode())
    return digest.hexdigest()
