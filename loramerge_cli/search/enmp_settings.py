"""ENMP's settings (torch- and numpy-free: the command line reads their defaults, and a search request is
checked, before either is imported)."""

from __future__ import annotations

from dataclasses import dataclass

from loramerge_cli.errors import UsageError, check_integer, check_seed, is_finite_number, plain_fields

MOST_CANDIDATES = 100_000  # per generation
MOST_GENERATIONS = 1_000_000
# |σ0| and |θ| above this decide nothing more (x0 = −1: every unit is already a coin flip, or always or never
# pruned) and only bring CMA-ES nearer to floating-point overflow (σ² near 1e308)
LARGEST_SEARCH_VALUE = 1e6


@dataclass
class EnmpSettings:
    """The paper's defaults (docs/algorithms.md, ENMP)."""

    max_prune: float = 0.2
    popsize: int = 16
    generations: int = 60
    sigma0: float = 0.5
    threshold: float = 0.0
    seed: int = 1
    addscale: bool = False
    x0: float = -1.0

    def check(self) -> None:
        plain_fields(self)  # numpy numbers as Python ones
        check_seed(self.seed)
        if not (is_finite_number(self.max_prune) and 0.0 < self.max_prune <= 1.0):
            raise UsageError(f"--max-prune must be a number in (0, 1] (got {self.max_prune!r})")
        check_integer(self.popsize, 2, "--popsize", MOST_CANDIDATES)  # (a count past these runs for ever: each
        check_integer(self.generations, 1, "--generations", MOST_GENERATIONS)  # candidate is a validation pass)
        if not (is_finite_number(self.sigma0) and 0 < self.sigma0 <= LARGEST_SEARCH_VALUE):
            raise UsageError(f"--sigma0 must be a number in (0, {LARGEST_SEARCH_VALUE:g}] (got {self.sigma0!r})")
        if not (is_finite_number(self.threshold) and abs(self.threshold) <= LARGEST_SEARCH_VALUE):
            raise UsageError(f"--threshold must be a number in [-{LARGEST_SEARCH_VALUE:g}, {LARGEST_SEARCH_VALUE:g}] "
                             f"(got {self.threshold!r})")
        if not is_finite_number(self.x0):
            raise UsageError(f"x0 must be a finite number (got {self.x0!r})")
        if not isinstance(self.addscale, bool):
            raise UsageError(f"addscale must be true or false (got {self.addscale!r})")
