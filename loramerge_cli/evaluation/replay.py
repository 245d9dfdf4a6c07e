"""Start a candidate's forward pass at its first changed block, replaying the blocks before it.

A pruning candidate differs from the reference (the unpruned merge at the same λ) only in the modules
of the blocks it prunes, when the merge works module by module. Every block before the first changed
one then computes, batch by batch, exactly what it computed for the reference: same weights, same
inputs, same kernels, same bits. `BlockReplay` records the reference's block outputs once and, per
candidate, stands in for the unchanged leading blocks with those outputs. The first replayed candidate
is also run in full; if the two differ in any bit the replay is switched off for the run.

Block outputs take memory (examples × tokens × hidden per block): when they exceed the budget, only
every 2nd, 4th, … block's output is kept (the deepest of each stride), so the replay skips less.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch

from loramerge_cli.adapters.units import unit_of

LOGGER = logging.getLogger(__name__)


def find_blocks(model: torch.nn.Module, module_paths) -> tuple[torch.nn.ModuleList, dict[str, int]] | None:
    """The ModuleList of transformer blocks that holds every LoRA module, and each module's block index;
    None when the modules do not all sit in the blocks of one list (then nothing is replayed)."""
    units = {path: unit_of(path) for path in module_paths}
    if not units or any(unit is None for unit in units.values()):
        return None
    parents = {unit.rsplit(".", 1)[0] for unit in units.values()}
    if len(parents) != 1:
        return None
    try:
        blocks = model.get_submodule(parents.pop())
    except AttributeError:
        return None
    if not isinstance(blocks, torch.nn.ModuleList):
        return None
    index_of = {path: int(unit.rsplit(".", 1)[1]) for path, unit in units.items()}
    if max(index_of.values()) >= len(blocks):
        return None
    return blocks, index_of


def same_delta(a, b) -> bool:
    """True when two `Delta`s (or None, no update) give the same weight bit for bit."""
    if a is None or b is None:
        return a is b
    return (a.left.shape == b.left.shape and a.right.shape == b.right.shape
            and torch.equal(a.left, b.left) and torch.equal(a.right, b.right))


def _mapped(output, function):
    """`output` (a tensor, or a tuple of tensors and other values) with `function` applied to each tensor."""
    if isinstance(output, torch.Tensor):
        return function(output)
    if isinstance(output, tuple):
        return tuple(_mapped(item, function) for item in output)
    return output


def _size(output) -> int:
    """Bytes of the tensors in a block's output."""
    if isinstance(output, torch.Tensor):
        return output.numel() * output.element_size()
    if isinstance(output, tuple):
        return sum(_size(item) for item in output)
    return 0


class _Replayed(torch.nn.Module):
    """Stands in for one block: returns the recorded outputs, one per call, in batch order."""

    def __init__(self, block: torch.nn.Module, outputs: list, copy: bool):
        super().__init__()
        object.__setattr__(self, "block", block)  # not registered: the model's module tree is unchanged
        self.outputs = outputs
        self.copy = copy
        self.position = 0

    def forward(self, *args, **kwargs):
        output = self.outputs[self.position]
        self.position += 1
        # the model may change the last block's output in place: hand it a copy
        return _mapped(output, torch.Tensor.clone) if self.copy else output

    def __getattr__(self, name):  # a model may read a block's attributes (an attention type) in its loop
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "block"), name)


class BlockReplay:
    """Reference block outputs of one engine, and candidate evaluation that replays the unchanged prefix."""

    def __init__(self, engine, module_paths, budget_mb: float):
        self.engine = engine
        self.budget = budget_mb * 2**20
        found = find_blocks(engine.model, module_paths) if budget_mb > 0 else None
        self.enabled = found is not None
        self.blocks, self.index_of = found if found else (None, {})
        self.reference: dict | None = None
        self.outputs: dict[int, dict[str, list]] = {}  # block index -> task -> outputs per batch
        self.verified = False
        self.replayed_blocks = 0  # blocks replayed instead of run, summed over candidates
        self.full_blocks = 0  # blocks run, summed over candidates
        engine.device_caches.add(self)  # dropped when the engine is parked (Evaluator.park)

    @property
    def recorded(self) -> bool:
        return self.reference is not None

    def record(self, deltas: dict) -> dict[str, float]:
        """Evaluate the reference and keep its block outputs (within the budget). Returns its accuracies."""
        self.reference = dict(deltas)
        if not self.enabled:
            return self.engine.evaluate(deltas)
        count = len(self.blocks)
        stride, total = 1, 0
        outputs: dict[int, dict[str, list]] = {index: {} for index in range(count)}

        def keep(index, task):
            def hook(module, args, output):
                nonlocal stride, total
                if (index + 1) % stride:
                    return
                outputs[index].setdefault(task, []).append(_mapped(output, torch.Tensor.detach))
                total += _size(output)
                while total > self.budget and stride <= count:
                    stride *= 2
                    for dropped in [i for i in outputs if (i + 1) % stride]:
                        total -= sum(_size(o) for per_task in outputs[dropped].values() for o in per_task)
                        del outputs[dropped]
            return hook

        @contextmanager
        def recording(task: str) -> Iterator[None]:
            handles = [block.register_forward_hook(keep(index, task)) for index, block in enumerate(self.blocks)]
            try:
                yield
            finally:
                for handle in handles:
                    handle.remove()

        scores = self.engine.evaluate(deltas, around_task=recording)
        self.outputs = {index: per_task for index, per_task in outputs.items()
                        if (index + 1) % stride == 0 and per_task}
        self.enabled = bool(self.outputs)
        return scores

    def forget(self) -> None:
        """Drop the recorded outputs (device memory): the next candidate records the reference again."""
        self.reference, self.outputs = None, {}

    def first_changed(self, deltas: dict) -> int:
        """Index of the first block whose modules differ from the reference (0 if one outside the blocks does)."""
        first = len(self.blocks)
        for path in set(deltas) | set(self.reference):
            if not same_delta(deltas.get(path), self.reference.get(path)):
                first = min(first, self.index_of.get(path, 0))
        return first

    def evaluate(self, deltas: dict) -> dict[str, float]:
        """{task: accuracy} of a candidate, bit for bit what `engine.evaluate(deltas)` gives."""
        if not self.enabled:
            return self.engine.evaluate(deltas)
        if not self.recorded:
            raise RuntimeError("BlockReplay.evaluate before record")
        first = self.first_changed(deltas)
        replayed = max((index for index in self.outputs if index < first), default=None)
        if replayed is None:
            self.full_blocks += len(self.blocks)
            return self.engine.evaluate(deltas)
        scores = self.engine.evaluate(deltas, around_task=lambda task: self._standing_in(replayed, task))
        self.replayed_blocks += replayed + 1
        self.full_blocks += len(self.blocks) - replayed - 1
        if not self.verified:
            full = self.engine.evaluate(deltas)
            if full != scores:
                LOGGER.warning("replaying unchanged blocks changed the scores on this model; running every block")
                self.enabled, self.outputs = False, {}  # the recorded outputs (up to the budget) go too
                return full
            self.verified = True
        return scores

    @contextmanager
    def _standing_in(self, last: int, task: str) -> Iterator[None]:
        """Blocks 0..last replaced by stand-ins that return block `last`'s recorded outputs for `task`."""
        outputs = self.outputs[last][task]
        originals = [self.blocks[index] for index in range(last + 1)]
        try:
            for index, block in enumerate(originals):
                self.blocks[index] = _Replayed(block, outputs, copy=index == last)
            yield
        finally:
            for index, block in enumerate(originals):
                self.blocks[index] = block
