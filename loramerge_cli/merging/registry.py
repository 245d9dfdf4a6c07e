"""The mergers: each method declares its parameters once; the CLI, validation and model card read it.

Registering is explicit (this module's dicts), never an import side effect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from loramerge_cli.merging import elementwise, spectral
from loramerge_cli.merging.lowrank import LowRank, sum_lowrank


@dataclass(frozen=True)
class Parameter:
    name: str
    help: str
    low: float | None = None  # bounds, `low_open`/`high_open` say whether they are excluded
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()

    def check(self, value) -> str | None:
        """An error message, or None if `value` is allowed."""
        if self.choices:
            return None if value in self.choices else f"--{self.flag} must be one of {', '.join(self.choices)}"
        if not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
            return f"--{self.flag} must be a finite number (got {value})"
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"--{self.flag} must be {'>' if self.low_open else '>='} {self.low} (got {value})"
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return f"--{self.flag} must be {'<' if self.high_open else '<='} {self.high} (got {value})"
        return None

    @property
    def flag(self) -> str:
        return self.name.replace("_", "-")


PARAMETERS = {
    "density": Parameter("density", "fraction of entries each task keeps when trimming", 0.0, 1.0, low_open=True),
    "drop_rate": Parameter("drop_rate", "DARE: probability of dropping an entry", 0.0, 1.0, high_open=True),
    "scope": Parameter("scope", "trim and elect per module, or over the whole adapter", choices=("module", "adapter")),
}


def task_sum(tasks: list[torch.Tensor | LowRank]) -> torch.Tensor | LowRank:
    """Σ_t X_t, kept factored when the inputs are."""
    if all(isinstance(task, LowRank) for task in tasks):
        return sum_lowrank(tasks)
    return torch.stack([task.dense() if isinstance(task, LowRank) else task for task in tasks]).sum(dim=0)


@dataclass(frozen=True)
class Method:
    """A merge method. Elementwise methods combine a (T × D) matrix of flattened task tensors
    (`combine(X, present, params)`); the others map the list of task tensors to a factored result."""

    name: str
    summary: str
    paper: str
    default_lambda: str  # "1" or "1/T"
    defaults: dict = field(default_factory=dict)
    elementwise: bool = False
    uses_dare: bool = False
    combine: Callable | None = None  # elementwise: (X, present, params) -> merged row
    merge: Callable | None = None  # spectral: (tasks) -> merged tensor

    @property
    def parameters(self) -> tuple[str, ...]:
        return tuple(self.defaults)

    def lambda_for(self, task_count: int) -> float:
        return 1.0 / task_count if self.default_lambda == "1/T" else float(self.default_lambda)


def _sum_rows(X, present, params):
    return X.sum(dim=0)


TIES_PAPER = "Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)"
DARE_PAPER = "Yu et al. 2024, Language Models are Super Mario (DARE, arXiv:2311.03099)"
METHODS: dict[str, Method] = {
    "ta": Method(
        "ta", "task arithmetic: the sum of the updates", "Ilharco et al. 2023, Editing Models with Task "
        "Arithmetic (arXiv:2212.04089)", "1/T", merge=task_sum,
    ),
    "ties": Method(
        "ties", "trim, elect sign, disjoint mean", TIES_PAPER, "1",
        defaults={"density": 0.8, "scope": "module"}, elementwise=True,
        combine=lambda X, present, p: elementwise.ties(X, p["density"], present),
    ),
    "magnitude": Method(
        "magnitude", "trim each task by magnitude, then sum", TIES_PAPER, "1/T",
        defaults={"density": 0.8, "scope": "module"}, elementwise=True,
        combine=lambda X, present, p: elementwise.magnitude_prune(X, p["density"], present),
    ),
    "dare": Method(
        "dare", "random drop and rescale, then sum", DARE_PAPER, "1/T",
        defaults={"drop_rate": 0.1}, elementwise=True, uses_dare=True, combine=_sum_rows,
    ),
    "dare_ties": Method(
        "dare_ties", "random drop and rescale, then TIES", DARE_PAPER, "1",
        defaults={"drop_rate": 0.1, "density": 0.8, "scope": "module"}, elementwise=True, uses_dare=True,
        combine=lambda X, present, p: elementwise.ties(X, p["density"], present),
    ),
    "tsv": Method(
        "tsv", "Task Singular Vectors: per-task SVDs, orthogonalised", "Gargiulo et al. 2025, Task Singular "
        "Vectors (arXiv:2412.00081)", "1", merge=spectral.tsv,
    ),
    "iso_c": Method(
        "iso_c", "isotropic merge: the sum with a flattened spectrum", "Marczak et al. 2025, No Task Left "
        "Behind: Isotropic Model Merging (arXiv:2502.04959)", "1/T",
        merge=lambda tasks: spectral.isotropize(task_sum(tasks)),
    ),
    "tsv_iso": Method(
        "tsv_iso", "TSV, then a flattened spectrum", "Gargiulo et al. 2025 + Marczak et al. 2025", "1",
        merge=lambda tasks: spectral.isotropize(spectral.tsv(tasks)),
    ),
}
ALIASES = {"cat": "ta"}


@dataclass(frozen=True)
class Preset:
    """A named merger: a method in a space with fixed parameters (each overridable)."""

    method: str
    space: str
    parameters: dict
    paper: str


PRESETS: dict[str, Preset] = {
    "knots": Preset(
        "ties", "knots", {"density": 0.9, "knots_scaled": False, "scope": "module"},
        "Stoica et al. 2025, Model merging with SVD to tie the KnOTS (arXiv:2410.19735)",
    ),
    "core": Preset(
        "tsv", "core", {}, "Panariello et al. 2025, Accurate and Efficient Low-Rank Model Merging in Core "
        "Space (arXiv:2509.17786)",
    ),
}


def method_named(name: str) -> Method:
    key = ALIASES.get(name, name)
    if key not in METHODS:
        known = ", ".join(sorted([*METHODS, *ALIASES]))
        raise KeyError(f"unknown method {name!r} (known: {known})")
    return METHODS[key]


def merger_names() -> list[str]:
    return sorted([*METHODS, *ALIASES, *PRESETS])
