"""The evaluation engine: one base model, candidates patched into its weights in place.

Only LoRA-targeted weights keep a copy of W0. A candidate is applied as W ← W0 + ΔW (ΔW = B̃ A,
transposed for Conv1D) and W0 is copied back afterwards, bit for bit. Task heads are swapped per task.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import weakref
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from loramerge_cli.adapters.model import head_class_count
from loramerge_cli.adapters.sources import sha256_file
from loramerge_cli.errors import LoramergeError, NonFiniteError
from loramerge_cli.evaluation import batches as batching
from loramerge_cli.evaluation.data import Examples, load_examples
from loramerge_cli.evaluation.heads import check_head, task_head
from loramerge_cli.evaluation.loading import (
    base_identity,
    load_base,
    load_base_config,
    load_preprocessor,
    torch_device,
    torch_dtype,
)
from loramerge_cli.evaluation.settings import EvalSettings  # noqa: F401  (imported from here too)
from loramerge_cli.evaluation.specs import FROM_ADAPTER, NO_HEAD, TaskFile, match_adapters
from loramerge_cli.evaluation.task_types.base import token_cap


@dataclass
class Delta:
    """A low-rank update ΔW = left @ right in (d_out, d_in) orientation. The evaluator gives a Conv1D weight
    ΔWᵀ: the base module's type decides, as in PEFT (an adapter config's fan_in_fan_out can be wrong when it
    targets both Conv1D and Linear modules, or absent in a bare file)."""

    left: torch.Tensor  # d_out × k, every scale folded in
    right: torch.Tensor  # k × d_in

    def dense(self, device, dtype=torch.float32) -> torch.Tensor:
        return self.left.to(device=device, dtype=dtype) @ self.right.to(device=device, dtype=dtype)

    def scaled(self, factor: float) -> "Delta":
        return Delta(self.left * factor, self.right)


def adapter_deltas(adapter) -> dict[str, Delta]:
    """An Adapter's updates, with the LoRA scale folded into the left factor."""
    return {
        path: Delta(*module.factors(torch.float32)) for path, module in adapter.modules.items()
    }


def merged_deltas(result, factor: float = 1.0) -> dict[str, Delta]:
    """A MergeResult's updates (λ already folded in), optionally scaled again by `factor`."""
    return {
        path: Delta(module.lora_B.to(torch.float32) * factor, module.lora_A.to(torch.float32))
        for path, module in result.modules.items()
    }


def scale_deltas(deltas: dict[str, Delta], factor: float) -> dict[str, Delta]:
    return {path: delta.scaled(factor) for path, delta in deltas.items()}


def as_loaded(name: str) -> str:
    """A base a file names (a spec, the adapters' configs) spelled as a Hub id where a folder of that name is in the
    working folder, as the model loaders read it: that folder, recorded as a path (`./org/name`), never as the
    Hub's repository (PEFT records a base trained from a folder `tb/base` so, and the loaders read a folder first)."""
    from loramerge_cli.adapters.card import is_repo_id

    return f"./{name}" if is_repo_id(name) and Path(name).is_dir() else name


def resolve_base(task_file: TaskFile, adapters, base: str | None) -> str:
    """--base, else the spec's base_model, else the one base every adapter names (at the revision their configs
    name, if they agree on one); one that is neither a folder here nor a Hub id is named as such (not as a
    tokenizer's error). A Hub base comes back pinned to the commit its revision names now (pinned_base)."""
    from loramerge_cli.adapters.compat import trained_revision
    from loramerge_cli.adapters.sources import base_reference, check_base_given, is_base_source, pinned_base

    trained = {adapter.base_model for adapter in adapters if adapter.base_model}
    revisions = {trained_revision(adapter) for adapter in adapters if adapter.base_model}
    revision = revisions.pop() if len(revisions) == 1 else None  # (PEFT loads the adapters' base at it)

    def at_their_revision(chosen: str) -> str:
        """A Hub base named without a revision, the adapters' base repository, at the revision they name."""
        name, given = base_reference(chosen)
        local = not chosen.startswith("hf://") and Path(chosen).expanduser().is_dir()
        if local or given or not isinstance(revision, str) or name not in {base_reference(b)[0] for b in trained}:
            return chosen
        return f"{name}@{revision}"

    if base:
        check_base_given(base)
        return pinned_base(at_their_revision(base))
    if task_file.base_model:
        if not is_base_source(task_file.base_model):
            raise task_file.error("base_model", f"{task_file.base_model}: no such folder, and not a Hugging Face Hub "
                                  "id (--base overrides it)")
        return pinned_base(at_their_revision(as_loaded(task_file.base_model)))
    if len(trained) == 1:
        name = next(iter(trained))
        if not is_base_source(name):
            raise LoramergeError(f"the adapters' base model {name}: no such folder here, and not a Hugging Face Hub "
                                 "id (use --base)")
        return pinned_base(at_their_revision(as_loaded(name)))
    if not trained:
        raise LoramergeError(f"{task_file.path}: base_model: not given, and no adapter names its base (use --base)")
    raise LoramergeError(f"{task_file.path}: base_model: not given, and the adapters name several bases (use --base)")


def default_threads(threads: int | None) -> int | None:
    """The torch CPU threads an evaluation sets: `threads`, else None where OMP_NUM_THREADS is set (torch
    reads it: the user's choice), else min(8, CPUs)."""
    return threads or (None if os.environ.get("OMP_NUM_THREADS") else min(8, os.cpu_count() or 1))


class Evaluator:
    """Scores candidates (experts, merges, the base) on every task of a spec, one split.

    Everything a run needs is read and checked on construction, before the first forward pass.
    """

    def __init__(
        self,
        task_file: TaskFile,
        experts: list,
        settings: EvalSettings | None = None,
        base: str | None = None,
        allow_pickle: bool = False,
    ):
        self.task_file = task_file
        self.settings = settings = settings or EvalSettings()
        settings.check()
        threads = default_threads(settings.threads)
        if threads:  # OMP_NUM_THREADS, when set, is the user's choice: only --threads overrides it
            torch.set_num_threads(threads)
        self.experts = match_adapters(task_file, experts, allow_pickle)
        self.base = resolve_base(task_file, experts, base)
        self.device = torch_device(settings.device)
        self.dtype = torch_dtype(settings.dtype)
        self.examples: dict[str, Examples] = {
            task.name: load_examples(task_file, task, settings.split, settings.val_limit, settings.sample_seed)
            for task in task_file.tasks
        }
        self.heads = {task.name: task_head(task_file, task, self.experts[task.name]) for task in task_file.tasks}
        num_labels = self._num_labels()
        self._check_label_range(num_labels)  # before the model loads: the base's config says its width
        preprocessor = load_preprocessor(self.base, task_file.type)
        self._check_inputs(preprocessor)  # before the weights load: a wrong cap is a one-line error at once
        self._placement = {"parked": False}  # shared with this engine's views (copies), as the model is
        self._model = load_base(self.base, task_file.type, self.device, self.dtype, num_labels)
        self.modules = dict(self.model.named_modules())
        from transformers.pytorch_utils import Conv1D

        # modules storing their weight (d_in, d_out), transformers' Conv1D (GPT-2): their update is ΔWᵀ, by the
        # module's type, as PEFT decides
        self.transposed = {path for path, module in self.modules.items() if isinstance(module, Conv1D)}
        self.parameters = dict(self.model.named_parameters())
        for task in task_file.tasks:
            check_head(task_file, task, self.heads[task.name], self.parameters)
        # A task whose head lacks a tensor another task's head has (a bias) gets the base model's value.
        self.head_defaults = {
            key: self.parameters[key].detach().clone() for head in self.heads.values() for key in head
        }
        self.checked_copies: set[tuple[str, str]] = set()  # adapters whose base-weight copies were checked
        for adapter in experts:
            self._check_base_copies(adapter)
        self.base_weights: dict[str, torch.Tensor] = {}  # W0 of every LoRA-targeted weight
        for adapter in experts:
            self._check_targets(adapter_deltas(adapter), adapter.name)
        self.max_lengths: dict[str, int] = {}  # text tasks: the token cap each one uses
        self.device_caches: weakref.WeakSet = weakref.WeakSet()  # what keeps outputs on the device (BlockReplay)
        self.prepared = self._prepare(preprocessor)
        self._identity = base_identity(self.base, self.model)

    # --- setup ---------------------------------------------------------------------------------

    def _num_labels(self) -> int | None:
        """The class count every classification task agrees on (spec or head rows), if any says it."""
        if not self.task_file.type.classifier:
            return None
        counts = {}
        for task in self.task_file.tasks:
            count = task.class_count
            rows = head_class_count(self.heads[task.name])
            folders = self.task_file.type.folder_class_count(task)
            if folders is not None and rows is not None and folders != rows:  # classes renumbered without a word
                raise self.task_file.error(f"{task.where}.labels", f"without labels or num_labels, the classes are "
                                           f"the task's {folders} class folders in sorted order, but its head has "
                                           f"{rows} rows: set num_labels: {rows} (folders named by their indices "
                                           "keep them) or name the classes in labels, in the head's order")
            if count is not None and rows is not None and count != rows:  # before the base loads with `count`
                hint = f"; set num_labels: {rows} (classes past the names are masked)" if task.labels else ""
                raise self.task_file.error(f"{task.where}.num_labels", f"the spec gives {count} classes but the "
                                           f"task's head has {rows} rows{hint}")
            count = rows if count is None else count
            if count is not None:
                counts.setdefault(count, task.name)
        if len(counts) > 1:
            listed = ", ".join(f"{name}: {count}" for count, name in counts.items())
            raise LoramergeError(
                f"{self.task_file.path}: num_labels: tasks differ ({listed}); one model has one head shape"
            )
        return next(iter(counts), None)

    def _check_label_range(self, num_labels: int | None) -> None:
        """Every label and masked class within the model's classes: `num_labels` (the spec's or the heads'), else
        the base model's own (its config, read without the weights)."""
        if not self.task_file.type.classifier:
            return
        classes = int(num_labels if num_labels is not None else load_base_config(self.base).num_labels)
        for task in self.task_file.tasks:
            labels = self.examples[task.name].labels or []
            for label in labels:
                if label >= classes:
                    source = task.data[self.settings.split]
                    raise self.task_file.error(f"{task.where}.label", f"label {label} is out of range 0..{classes - 1}"
                                               f" (a row of {source}; the model has {classes} classes)")
            for masked in task.masked_labels:
                if masked >= classes:
                    raise self.task_file.error(
                        f"{task.where}.masked_labels", f"label {masked} is out of range 0..{classes - 1}"
                    )

    def _check_inputs(self, preprocessor) -> None:
        """Each task's inputs (its task type's check), and each tokenised task's token cap against the model's
        positions and the tokenizer's special tokens, and its choices' tokens, from the base's config alone."""
        config = load_base_config(self.base)
        for task in self.task_file.tasks:
            self.task_file.type.check_inputs(self.examples[task.name], task, preprocessor, config, self.settings)
        if self.task_file.type.preprocessor_class != "AutoTokenizer":
            return
        from loramerge_cli.evaluation.batches import encode_choices
        from loramerge_cli.evaluation.task_types.base import named_task

        for task in self.task_file.tasks:
            cap = token_cap(task, preprocessor, config, self.settings)
            if self.task_file.type.choices:  # each choice's tokens, before the weights load
                with named_task(task):
                    encode_choices(task.choices, preprocessor, cap)

    def _check_base_copies(self, adapter) -> None:
        """The base weights PEFT saved beside an adapter's factors (lm_head or embedding targets) must be the base
        model's: others (a resized vocabulary) belong to another base, which the scores would not describe. Once
        per adapter (they are as large as the vocabulary)."""
        from loramerge_cli.adapters.compat import same_weights

        identity = (adapter.name, adapter.source.identity)
        if identity in self.checked_copies:
            return
        for name, copy in adapter.base_copies.items():
            try:
                weight = self.model.get_parameter(name)
            except AttributeError:
                raise LoramergeError(f"adapter {adapter.name!r}: its saved base weight {name} names no weight of the "
                                     f"base model {self.base}") from None
            if not same_weights(copy, weight.detach()):  # equal, or rounded to bfloat16
                raise LoramergeError(f"adapter {adapter.name!r} carries its own {name}, which PEFT loads over the "
                                     f"base's, and it is not the one of the base model {self.base} (a resized "
                                     "vocabulary, or a head its config's modules_to_save does not name?): evaluate "
                                     "it with the base it was saved from")
        self.checked_copies.add(identity)

    def _check_targets(self, deltas: dict[str, Delta], owner: str) -> None:
        """Every updated module must be a 2-d weight of the base model of the right shape."""
        for path, delta in deltas.items():
            module = self.modules.get(path)
            weight = getattr(module, "weight", None) if module is not None else None
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                raise LoramergeError(f"{owner}: module {path} is not a weight matrix of the base model {self.base}")
            expected = (delta.left.shape[0], delta.right.shape[1])
            if path in self.transposed:
                expected = expected[::-1]
            if tuple(weight.shape) != expected:
                raise LoramergeError(
                    f"{owner}: module {path} updates a {expected[0]}×{expected[1]} weight but the base model's is "
                    f"{weight.shape[0]}×{weight.shape[1]}"
                )
            if path not in self.base_weights:
                if self._shared(weight):  # a tied lm_head: PEFT's LoRA adds to its output, the embeddings stay
                    module.weight = weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
                self.base_weights[path] = weight.detach().clone()

    def _shared(self, weight: torch.Tensor) -> bool:
        """The tensor is also another parameter of the model (tied weights, such as GPT-2's lm_head and wte)."""
        return sum(parameter is weight for _, parameter in self.model.named_parameters(remove_duplicate=False)) > 1

    def _prepare(self, preprocessor) -> dict[str, batching.PreparedTask]:
        """Every task's batches, built once by its task type; text types record their token cap."""
        accepted = batching.forward_inputs(self.model)
        prepared = {}
        for task in self.task_file.tasks:
            prepared[task.name], max_length = self.task_file.type.prepare(
                self.examples[task.name].inputs, task, preprocessor, self.model, self.settings, self.device,
                self.dtype, accepted)
            if max_length is not None:
                self.max_lengths[task.name] = max_length
        return prepared

    # --- patching ------------------------------------------------------------------------------

    @contextmanager
    def apply(self, deltas: dict[str, Delta]) -> Iterator[None]:
        """Within the block the model computes W0 + ΔW for every module in `deltas`; W0 after it."""
        self._check_targets(deltas, "candidate")
        self._ready()
        touched = []
        try:
            with torch.no_grad():
                for path, delta in deltas.items():
                    weight, original = self.modules[path].weight, self.base_weights[path]
                    touched.append(path)
                    compute = torch.promote_types(weight.dtype, torch.float32)
                    update = delta.dense(self.device, compute)
                    update = update.T if path in self.transposed else update
                    patched = (original.to(compute) + update).to(weight.dtype)
                    if not bool(torch.isfinite(patched).all()):  # scores of such a model would mean nothing
                        raise NonFiniteError(f"module {path}: the evaluated weight has NaN or Inf values in "
                                             f"{str(weight.dtype).removeprefix('torch.')} (an update beyond its range? "
                                             "a smaller λ or another dtype)")
                    weight.copy_(patched)
            yield
        finally:
            with torch.no_grad():
                for path in touched:
                    self.modules[path].weight.copy_(self.base_weights[path])

    def use_head(self, task: str) -> None:
        self._ready()
        head = self.heads[task]
        with torch.no_grad():
            for key, default in self.head_defaults.items():
                parameter = self.parameters[key]
                parameter.copy_(head[key].to(parameter.dtype) if key in head else default)

    @property
    def model(self) -> torch.nn.Module:
        """The base model, back on the device first if it was parked (`park`)."""
        self._ready()
        return self._model

    def park(self) -> None:
        """Move the model and the copies of its base weights and heads to host memory while other processes use
        the device (a search's workers, one of them on this device), and drop recorded block outputs
        (`device_caches`). They come back at the engine's next use (not on the way out of a run, nor after
        Ctrl-C). On the CPU nothing moves."""
        if self.device.type == "cpu" or self._placement["parked"]:
            return
        for cache in list(self.device_caches):  # recorded again on the next use
            cache.forget()
        self._placement["parked"] = True  # first: a move cut short is completed by the next use
        self._place(torch.device("cpu"))
        release_device_memory()

    def _ready(self) -> None:
        """A parked engine back on its device. The workers that shared it may still be giving its memory back
        (Ray ends its actors without waiting): out of memory, it waits for them, up to a minute."""
        if not self._placement["parked"]:
            return
        deadline = time.monotonic() + 60
        while True:
            try:
                self._place(self.device)
                break
            except torch.cuda.OutOfMemoryError:
                release_device_memory()
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        self._placement["parked"] = False

    def _place(self, device: torch.device) -> None:
        """The model and its weight copies on `device` (in place: views of this engine share them)."""
        self._model.to(device)
        for copies in (self.base_weights, self.head_defaults):
            for key, tensor in copies.items():
                copies[key] = tensor.to(device)

    # --- scoring -------------------------------------------------------------------------------

    def scores(self, task: str) -> torch.Tensor:
        """Raw per-example scores of the current weights: logits, or per-choice log-likelihoods."""
        self.use_head(task)
        with batching.model_inputs_of(task):
            scores = self.task_file.type.scores(self.model, self.prepared[task], self.task_file.task(task),
                                                self.settings)
        if not bool(torch.isfinite(scores).all()):  # argmax would read NaN as the largest: class 0 everywhere
            rows = int((~torch.isfinite(scores)).any(dim=-1).sum())
            advice = ("evaluate in float32 (--dtype / --eval-dtype)" if self.dtype != torch.float32 else
                      "the weights make activations overflow even in float32 (a λ or a table weight too large?)")
            raise NonFiniteError(f"task {task}: the model's outputs are NaN or Inf on {rows} of {len(scores)} examples "
                                 f"in {str(self.dtype).removeprefix('torch.')} (activations beyond its range?): "
                                 f"{advice}")
        return scores

    def accuracy(self, task: str) -> float:
        spec = self.task_file.task(task)
        labels = self.examples[task].labels
        if labels is None:
            raise self.task_file.error(f"{spec.where}.label", "required field is missing (accuracy needs labels)")
        return self.task_file.type.metric(self.scores(task), labels, spec)

    def evaluate(
        self, deltas: dict[str, Delta] | None = None, tasks: list[str] | None = None,
        around_task: Callable[[str], AbstractContextManager] = lambda task: nullcontext(),
    ) -> dict[str, float]:
        """{task: accuracy} with `deltas` applied (the base model when None); each task's forward passes
        run inside `around_task(task)` (block replay records or replays there)."""
        scores = {}
        with self.apply(deltas or {}):
            for task in tasks or self.task_file.names:
                with around_task(task):
                    scores[task] = self.accuracy(task)
        return scores

    def check_adapter(self, adapter) -> None:
        """What scoring `adapter` checks first, checked now and naming it: its modules are weights of this
        base model, of their shapes, and its copies of base weights are the base's (`eval` checks its merged
        folders so before it scores the experts)."""
        self._check_base_copies(adapter)
        self._check_targets(adapter_deltas(adapter), f"--merged {adapter.source.spec}")

    def score_adapter(self, adapter, tasks: list[str] | None = None) -> dict[str, float]:
        """{task: accuracy} of an adapter (an expert or a merged folder) as PEFT loads it."""
        self._check_base_copies(adapter)  # a merged folder's copy is PEFT's lm_head: it must be the base's
        return self.evaluate(adapter_deltas(adapter), tasks)

    def score_merged(self, result, tasks: list[str] | None = None, factor: float = 1.0) -> dict[str, float]:
        return self.evaluate(merged_deltas(result, factor), tasks)

    def score_base(self, tasks: list[str] | None = None) -> dict[str, float]:
        return self.evaluate(None, tasks)

    # --- identity, for caches ------------------------------------------------------------------

    def data_warnings(self) -> list[str]:
        """What the data does to the settings, one line each: a cap (`--val-limit`, or a task's `limit`) above a
        split's rows (all rows are used); --length-normalize where a task's spec says `length_normalize: false`
        (the spec wins)."""
        above: dict[tuple[str, int], list[Examples]] = {}
        for examples in self.examples.values():
            if examples.above_cap():
                above.setdefault((examples.limit_name, examples.limit), []).append(examples)
        warnings = [f"{name} {limit} is above the {self.settings.split} rows of "
                    f"{', '.join(f'{e.task} ({e.rows})' for e in tasks)}: every row is used"
                    for (name, limit), tasks in above.items()]
        kept = [task.name for task in self.task_file.tasks if self.settings.length_normalize and
                self.task_file.type.choices and not task.length_normalized(True)]
        if kept:
            warnings.append(f"--length-normalize does not apply to {', '.join(kept)}: the task spec says "
                            "length_normalize: false, which wins")
        return warnings

    def fingerprint(self, task: str) -> str:
        """Everything that fixes a task's score apart from the candidate: base, data, head, settings."""
        spec = self.task_file.task(task)
        if spec.head == FROM_ADAPTER:
            head = self.experts[task].source.identity
        elif spec.head == NO_HEAD:
            head = NO_HEAD
        else:
            head = sha256_file(spec.head)
        payload = {
            "base": self._identity,
            "model_type": self.task_file.model_type,
            "dtype": self.settings.dtype,
            "device": self.device.type,
            "data": self.examples[task].fingerprint,
            "head": head,
            "length_normalize": spec.length_normalized(self.settings.length_normalize),
            "max_length": self.max_lengths.get(task),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def checked_evaluator(task_file: TaskFile, adapters: list, settings: EvalSettings, base: str | None = None,
                      allow_base_mismatch: bool = False, allow_pickle: bool = False, report=None) -> Evaluator:
    """An Evaluator of the adapters, the spec's base checked against theirs before the model loads (unless
    `base`, --base, overrides it), and the model kind against the adapters and the base after
    (adapters/compat.py). `report` receives the loading as a progress stage (its elapsed time: seconds)."""
    from loramerge_cli.adapters.compat import check_base_kind, check_spec_base, revision_problem
    from loramerge_cli.events import stage

    if base is None:
        check_spec_base(task_file, adapters, allow_base_mismatch)
    mixed = None if allow_base_mismatch else revision_problem(adapters)
    if mixed:  # one base model scores them all: at most one of those revisions
        raise LoramergeError(mixed)
    with stage(report, "loading the model and data", 1) as step:
        engine = Evaluator(task_file, adapters, settings, base=base, allow_pickle=allow_pickle)
        step()
    check_base_kind(engine)
    return engine


def release_device_memory() -> None:
    """Collect the models and caches dropped so far and give CUDA's cached blocks back: a search's test report
    loads the base model again, which must not need room for two."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
