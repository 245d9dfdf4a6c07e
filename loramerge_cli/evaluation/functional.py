"""The differentiable mode of the engine: a low-rank side path on the base model.

Every LoRA-targeted module computes W0 x + Σ_k λ_k B̃_k (A_k x) through a forward hook, with one
trainable coefficient λ_k per (task, module); no weight is materialised and the base stays frozen.
`InputRecorder` keeps the input of chosen modules (what the NSC ratio measures). Both remove their
hooks on exit, leaving the model as it was.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class StackedFactors:
    """One module's factors of every task that has it: B_cat = [B̃_k] (d_out × R), A_cat = [A_k] (R × d_in)."""

    tasks: list[int]  # task indices present, in task order
    ranks: list[int]
    scaled_B: torch.Tensor
    A: torch.Tensor

    def __post_init__(self) -> None:  # on the factors' device once: no copy nor sync at every forward
        self._tasks = torch.tensor(self.tasks, device=self.A.device)
        self._repeats = torch.tensor(self.ranks, device=self.A.device)

    def expand(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Per-rank gains g (R,): each present task's coefficient repeated r_k times."""
        picked = coefficients[self._tasks]
        return torch.repeat_interleave(picked, self._repeats, output_size=self.A.shape[0])


def stack_factors(adapters, path: str, device, dtype) -> StackedFactors:
    tasks, ranks, lefts, rights = [], [], [], []
    for index, adapter in enumerate(adapters):
        module = adapter.modules.get(path)
        if module is None:
            continue
        scaled_B, A = module.factors(torch.float32)
        tasks.append(index)
        ranks.append(module.rank)
        lefts.append(scaled_B)
        rights.append(A)
    return StackedFactors(
        tasks, ranks, torch.cat(lefts, dim=1).to(device=device, dtype=dtype),
        torch.cat(rights, dim=0).to(device=device, dtype=dtype),
    )


def side_path(x: torch.Tensor, factors: StackedFactors, gains: torch.Tensor) -> torch.Tensor:
    """Σ_k g_k B̃_k (A_k x) for rows x (…, d_in), in Linear orientation (also right for Conv1D)."""
    hidden = x.to(factors.A.dtype) @ factors.A.T
    return (hidden * gains.to(hidden.dtype)) @ factors.scaled_B.T


class SidePath:
    """Trainable merge coefficients `coefficients` (tasks × modules, in `paths` order) on a frozen model.

    Entries of tasks that lack a module are kept at 0 and never used (`present` says which are real).
    """

    def __init__(self, modules: dict[str, torch.nn.Module], adapters, paths: list[str], device, dtype,
                 init: float = 0.4):
        self.modules = modules
        self.paths = list(paths)
        self.factors = {path: stack_factors(adapters, path, device, dtype) for path in self.paths}
        self.present = torch.tensor(
            [[path in adapter.modules for path in self.paths] for adapter in adapters], dtype=torch.bool
        )
        start = torch.where(self.present, torch.tensor(float(init)), torch.tensor(0.0))
        self.coefficients = torch.nn.Parameter(start.to(device=device, dtype=torch.float32))

    def table_rows(self) -> list[list[float]]:
        """The coefficients as weight-table rows (0 where a task lacks the module)."""
        values = torch.where(self.present, self.coefficients.detach().cpu(), torch.tensor(0.0))
        return [[float(v) for v in row] for row in values.double()]

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Within the block, the model computes W0 x + Σ_k λ_k B̃_k (A_k x) at every module of `paths`."""
        handles = []
        try:
            for column, path in enumerate(self.paths):
                handles.append(self.modules[path].register_forward_hook(self._hook(column, self.factors[path])))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, column: int, factors: StackedFactors):
        def add_side_path(module, args, output):
            gains = factors.expand(self.coefficients[:, column])
            return output + side_path(args[0], factors, gains).to(output.dtype)

        return add_side_path


class EnoughInputs(Exception):
    """Raised by an `InputRecorder(stop=True)` once every input is in: the rest of the forward is not needed."""


class InputRecorder:
    """Keeps the latest input of each module in `paths` (`inputs[path]`, graph attached) while installed.

    With `stop`, `run(model, inputs)` ends the forward as soon as the last input is recorded, so the
    layers after the last target (and a large LM head) are neither computed nor kept for backward."""

    def __init__(self, modules: dict[str, torch.nn.Module], paths: list[str], stop: bool = False):
        self.modules = modules
        self.paths = list(paths)
        self.stop = stop
        self.inputs: dict[str, torch.Tensor] = {}

    def run(self, model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
        """Forward `inputs` and return the recorded module inputs."""
        with self.installed():
            try:
                model(**inputs)
            except EnoughInputs:
                pass
        recorded, self.inputs = self.inputs, {}
        return recorded

    @contextmanager
    def installed(self) -> Iterator["InputRecorder"]:
        handles = []
        self.inputs = {}
        try:
            for path in self.paths:
                handles.append(self.modules[path].register_forward_pre_hook(self._hook(path)))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, path: str):
        def record(module, args):
            self.inputs[path] = args[0]
            if self.stop and len(self.inputs) == len(self.paths):
                raise EnoughInputs

        return record


def freeze(model: torch.nn.Module) -> None:
    """Base weights frozen, eval mode (no dropout): gradients reach only the coefficients."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
