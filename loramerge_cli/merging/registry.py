"""The mergers: each method declares its parameters once; the CLI options, `--help`, validation and the
model card read it. How to add one: docs/contributing.md.

Registering is explicit (this module's dicts), never an import side effect. This module does not import
torch (`loramerge --help` builds its options from it): kernels are reached through the lazy modules below,
inside the entries' lambdas.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from loramerge_cli.errors import is_finite_number


class LazyModule:
    """A kernel module imported on first attribute use (after `loramerge --help` has answered)."""

    def __init__(self, name: str):
        self.module_name = name

    def __getattr__(self, attribute: str):
        return getattr(importlib.import_module(self.module_name), attribute)


elementwise = LazyModule("loramerge_cli.merging.elementwise")
spectral = LazyModule("loramerge_cli.merging.spectral")
lowrank = LazyModule("loramerge_cli.merging.lowrank")
sparsify = LazyModule("loramerge_cli.merging.sparsify")
subspace = LazyModule("loramerge_cli.merging.subspace")
regmean = LazyModule("loramerge_cli.merging.regmean")


SPACES = ("full", "knots", "core")  # where a method acts (docs/algorithms.md, "Spaces")
DTYPES = ("float32", "float16", "bfloat16")  # dtypes of written weights and of evaluated models


@dataclass(frozen=True)
class MethodParameter:
    """A method parameter: its type, bounds, help; each method using it gives its own default."""

    name: str
    help: str
    low: float | None = None  # bounds, `low_open`/`high_open` say whether they are excluded
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    type: type = float
    per_adapter: bool = False  # also takes one value per adapter (a list; on the command line v1,v2,...)
    zero_means: str = ""  # what 0 stands for, where it stands for a value chosen per module

    def check(self, value) -> str | None:
        """An error message, or None if `value` is allowed."""
        if self.choices:
            return None if value in self.choices else f"--{self.flag} must be one of {', '.join(self.choices)}"
        if not is_finite_number(value):
            return f"--{self.flag} must be a finite number (got {value!r})"
        if self.type is int and not isinstance(value, int):
            return f"--{self.flag} must be an integer (got {value!r})"
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"--{self.flag} must be {'>' if self.low_open else '>='} {self.low} (got {value})"
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return f"--{self.flag} must be {'<' if self.high_open else '<='} {self.high} (got {value})"
        return None

    def bounds(self) -> str:
        """The allowed values, as help text shows them."""
        if self.choices:
            return "|".join(self.choices)
        if self.low is None and self.high is None:
            return ""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    @property
    def flag(self) -> str:
        return self.name.replace("_", "-")


PARAMETERS = {
    "density": MethodParameter("density", "Fraction of entries each task keeps when trimming; one value, or one per "
                               "adapter (d1,d2,...).", 0.0, 1.0, low_open=True, per_adapter=True),
    "drop_rate": MethodParameter("drop_rate", "Probability of dropping an entry (DARE).", 0.0, 1.0, high_open=True),
    "scope": MethodParameter("scope", "Trim and elect per module, or over the whole adapter.",
                             choices=("module", "adapter"), type=str),
    "keep_rule": MethodParameter("keep_rule", "Trim keeps max(1, D·density rounded half up) entries (round) or "
                                 "int(D·density) (floor: PEFT, mergekit).", choices=("round", "floor"), type=str),
    "consensus": MethodParameter("consensus", "Elect each sign by the sum of the values (mass) or of their signs "
                                 "(count: PEFT frequency, mergekit count).", choices=("mass", "count"), type=str),
    "normalize": MethodParameter("normalize", "Agreeing entries: mean (count), divided by the sum of the agreeing "
                                 "weights (weight: mergekit), or summed (none).", choices=("count", "weight", "none"),
                                 type=str),
    "elect_on": MethodParameter("elect_on", "Elect signs on the weighted updates, or on the unweighted ones (PEFT).",
                                choices=("weighted", "unweighted"), type=str),
    "dare_rescale": MethodParameter("dare_rescale", "DARE: divide kept entries by 1−p (inverse) or keep the L1 norm "
                                    "(l1: mergekit).", choices=("inverse", "l1"), type=str),
    "gamma": MethodParameter("gamma", "Breadcrumbs: fraction of the largest-magnitude entries dropped as outliers.",
                             0.0, 1.0, high_open=True),
    "epsilon": MethodParameter("epsilon", "DELLA: spread of the keep probabilities, density − ε/2 … density + ε/2 (at "
                               "most 2·min(density, 1 − density)).", 0.0, 1.0),
    "rank_fraction": MethodParameter("rank_fraction", "CART: components per task, as a fraction of min(m, n).",
                                     0.0, 1.0, low_open=True),
    "cart_scale": MethodParameter("cart_scale", "CART: factor on the sum of the low-rank residuals.", 0.0),
    "common_fraction": MethodParameter("common_fraction", "Iso-CTS: size of the common subspace, as a fraction "
                                       "of min(m, n).", 0.0, 1.0),
    "off_diagonal": MethodParameter("off_diagonal", "RegMean: factor on the off-diagonal entries of the input Gram "
                                    "matrices (the paper's α; 1: plain least squares).", 0.0, 1.0),
    "clusters": MethodParameter("clusters", "LoRA-LEGO: number of clusters = output rank (0: the largest task rank).",
                                0, type=int, zero_means="the largest task rank"),
}


def shown_parameter(name: str, value) -> str:
    """`name=value` as a summary or card shows it: a 0 that stands for a value chosen per module says which."""
    parameter = PARAMETERS.get(name)
    meaning = parameter.zero_means if parameter is not None and value == 0 and value is not False else ""
    return f"{name}={value}" + (f" ({meaning})" if meaning else "")


TIES_OPTIONS = {"keep_rule": "round", "consensus": "mass", "normalize": "count", "elect_on": "weighted"}


def task_sum(tasks):
    """Σ_t X_t, kept factored when the inputs are (LowRank) and dense otherwise."""
    if all(isinstance(task, lowrank.LowRank) for task in tasks):
        return lowrank.sum_lowrank(tasks)
    import torch

    return torch.stack([task.dense() if isinstance(task, lowrank.LowRank) else task for task in tasks]).sum(dim=0)


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
    full_space: str | None = None  # elementwise: the chunked full-space kernel (full_space.FullSpaceJob.kind)
    merge: Callable | None = None  # spectral: (tasks) -> merged tensor
    merge_with: Callable | None = None  # spectral with parameters: (tasks, params) -> merged tensor
    spaces: tuple[str, ...] = SPACES  # the spaces where the method makes sense
    needs_inputs: bool = False  # merge_with's params hold "grams": each task's input Gram matrix of the module
    draws: bool = False  # draws random numbers besides DARE's drop (`--seed` applies): DELLA, LoRA-LEGO
    check: Callable | None = None  # (resolved params) -> what is wrong with them together, or None

    @property
    def parameters(self) -> tuple[str, ...]:
        return tuple(self.defaults)

    @property
    def randomized(self) -> bool:
        """Its result depends on `--seed`."""
        return self.uses_dare or self.draws

    def lambda_for(self, task_count: int) -> float:
        return 1.0 / task_count if self.default_lambda == "1/T" else float(self.default_lambda)


def _check_elected_scope(params: dict) -> str | None:
    """With scope `adapter` a task's weight may differ between modules: its votes and its share of the
    disjoint mean must then be the plain ones."""
    if params.get("scope") != "adapter":
        return None
    for name, plain in (("normalize", "count"), ("elect_on", "weighted")):
        if params.get(name, plain) != plain:
            return (f"--{PARAMETERS[name].flag} {params[name]} needs --scope module "
                    "(with --scope adapter a task's weight may differ between modules)")
    return None


def _check_della(params: dict) -> str | None:
    """DELLA keeps entry i with probability κ − ε/2 + ε·rank_i/(D−1): within [0, 1] for every density."""
    epsilon = params["epsilon"]
    for density in params["density"] if isinstance(params["density"], list) else [params["density"]]:
        if epsilon / 2 > min(density, 1 - density) + 1e-12:
            return (f"--epsilon {epsilon:g} with --density {density:g}: DELLA's keep probabilities κ ± ε/2 leave "
                    f"[0, 1]; use --epsilon <= {2 * min(density, 1 - density):g}")
    return None


def _sum_rows(X, present, params):
    return X.sum(dim=0)


def ties_options(params: dict) -> elementwise.TiesOptions:
    return elementwise.TiesOptions(params["consensus"], params["normalize"], params["elect_on"])


def _ties_rows(X, present, p):
    return elementwise.ties(X, p["density"], present, p["keep_rule"], ties_options(p), p.get("row_weights"))


def _breadcrumbs_rows(X, present, p):
    return sparsify.breadcrumbs_trim(X, p["density"], p["gamma"], present, p["keep_rule"]).sum(dim=0)


def _breadcrumbs_ties_rows(X, present, p):
    trimmed = sparsify.breadcrumbs_trim(X, p["density"], p["gamma"], present, p["keep_rule"])
    return elementwise.elect_and_merge(trimmed, ties_options(p), p.get("row_weights"))


def _della_rows(X, present, p):
    pruned = sparsify.della_prune(X, p["density"], p["epsilon"], p["row_seeds"])
    return elementwise.elect_and_merge(pruned, ties_options(p), p.get("row_weights"))


TIES_PAPER = "Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)"
DARE_PAPER = "Yu et al. 2024, Language Models are Super Mario (DARE, arXiv:2311.03099)"
METHODS: dict[str, Method] = {
    "ta": Method(
        "ta", "task arithmetic: the sum of the updates", "Ilharco et al. 2023, Editing Models with Task "
        "Arithmetic (arXiv:2212.04089)", "1/T", merge=task_sum,
    ),
    "ties": Method(
        "ties", "trim, elect sign, disjoint mean", TIES_PAPER, "1",
        defaults={"density": 0.8, "scope": "module", **TIES_OPTIONS}, elementwise=True,
        combine=_ties_rows, full_space="ties", check=_check_elected_scope,
    ),
    "magnitude": Method(
        "magnitude", "trim each task by magnitude, then sum", TIES_PAPER, "1/T",
        defaults={"density": 0.8, "scope": "module", "keep_rule": "round"}, elementwise=True,
        combine=lambda X, present, p: elementwise.magnitude_prune(X, p["density"], present, p["keep_rule"]),
        full_space="magnitude",
    ),
    "dare": Method(
        "dare", "random drop and rescale, then sum", DARE_PAPER, "1/T",
        defaults={"drop_rate": 0.1, "dare_rescale": "inverse"}, elementwise=True, uses_dare=True,
        combine=_sum_rows, full_space="sum",
    ),
    "dare_ties": Method(
        "dare_ties", "random drop and rescale, then TIES", DARE_PAPER, "1",
        defaults={"drop_rate": 0.1, "density": 0.8, "scope": "module", **TIES_OPTIONS, "dare_rescale": "inverse"},
        elementwise=True, uses_dare=True, combine=_ties_rows, full_space="ties", check=_check_elected_scope,
    ),
    "tsv": Method(
        "tsv", "Task Singular Vectors: per-task SVDs, orthogonalised", "Gargiulo et al. 2025, Task Singular "
        "Vectors (arXiv:2412.00081)", "1", merge=lambda tasks: spectral.tsv(tasks),
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
BREADCRUMBS_PAPER = "Davari & Belilovsky 2024, Model Breadcrumbs (arXiv:2312.06795)"
METHODS.update({
    "breadcrumbs": Method(
        "breadcrumbs", "drop each task's outliers and smallest entries, then sum", BREADCRUMBS_PAPER, "1/T",
        defaults={"density": 0.8, "gamma": 0.01, "scope": "module", "keep_rule": "round"}, elementwise=True,
        combine=_breadcrumbs_rows, full_space="sum",
    ),
    "breadcrumbs_ties": Method(
        "breadcrumbs_ties", "breadcrumbs' band of magnitudes, then sign election and disjoint merge",
        BREADCRUMBS_PAPER + " + " + TIES_PAPER, "1",
        defaults={"density": 0.8, "gamma": 0.01, "scope": "module", **TIES_OPTIONS}, elementwise=True,
        combine=_breadcrumbs_ties_rows, full_space="ties", check=_check_elected_scope,
    ),
    "della": Method(
        "della", "drop by magnitude-ranked probabilities and rescale, then sign election and disjoint merge",
        "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)", "1",
        defaults={"density": 0.8, "epsilon": 0.1, "consensus": "mass", "normalize": "count", "elect_on": "weighted"},
        elementwise=True, combine=_della_rows, draws=True, full_space="ties", check=_check_della,
    ),
    "cart": Method(
        "cart", "the mean plus each task's low-rank deviation from it", "Choi et al. 2024, Revisiting Weight "
        "Averaging for Model Merging (CART, arXiv:2411.16139)", "1",
        defaults={"rank_fraction": 0.04, "cart_scale": 0.1},
        merge_with=lambda tasks, p: subspace.cart(tasks, p["rank_fraction"], p["cart_scale"]),
    ),
    "iso_cts": Method(
        "iso_cts", "common and task-specific subspaces with a flattened spectrum", "Marczak et al. 2025, No Task "
        "Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces (arXiv:2502.04959)", "1/T",
        defaults={"common_fraction": 0.8},
        merge_with=lambda tasks, p: subspace.iso_cts(tasks, p["common_fraction"]),
    ),
    "lora_lego": Method(
        "lora_lego", "k-means over the tasks' rank-1 units, one averaged unit per cluster", "Zhao et al. 2025, "
        "Merging LoRAs like Playing LEGO (arXiv:2409.16167)", "1",
        defaults={"clusters": 0},
        merge_with=lambda tasks, p: subspace.lora_lego(tasks, int(p["clusters"]) or None, 10, p["module_seed"]),
        spaces=("full",), draws=True,
    ),
    "regmean": Method(
        "regmean", "the least-squares fit of every task's outputs on its own inputs (reads the tasks' data)",
        "Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models (RegMean, "
        "arXiv:2212.09849)", "1", defaults={"off_diagonal": 0.9},
        merge_with=lambda tasks, p: regmean.regmean(tasks, p["grams"], p["off_diagonal"]),
        spaces=("full",), needs_inputs=True,
    ),
})
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


def method_names() -> list[str]:
    return sorted([*METHODS, *ALIASES])


def merger_names() -> list[str]:
    return sorted([*METHODS, *ALIASES, *PRESETS])


def randomized_methods() -> list[str]:
    """The methods whose result depends on the seed."""
    return [name for name, method in METHODS.items() if method.randomized]


def methods_using(parameter: str) -> list[str]:
    """The methods a parameter applies to, for its help text."""
    return [name for name, method in METHODS.items() if parameter in method.defaults]


def defaults_text(parameter: str) -> str:
    """Each default of a parameter and the methods and presets that have it, for its help text:
    "0.8 (ties, magnitude, …), 0.9 (knots)"."""
    by_value: dict[str, list[str]] = {}
    for name in methods_using(parameter):
        by_value.setdefault(_shown(METHODS[name].defaults[parameter]), []).append(name)
    for name, preset in PRESETS.items():
        if parameter in preset.parameters:
            by_value.setdefault(_shown(preset.parameters[parameter]), []).append(name)
    return ", ".join(f"{value} ({', '.join(names)})" for value, names in by_value.items())


def lambda_defaults_text() -> str:
    """The default λ of each method, grouped: "1/T (ta, …), 1 (ties, …)"."""
    by_value: dict[str, list[str]] = {}
    for name, method in METHODS.items():
        by_value.setdefault(method.default_lambda, []).append(name)
    return ", ".join(f"{value} ({', '.join(names)})" for value, names in by_value.items())


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
