"""ENMP's settings (torch- and numpy-free: the command line reads their defaults, and a search request is
checked, before either is imported)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from loramerge_cli.errors import UsageError, check_integer, check_seed


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
        check_seed(self.seed)
        if not 0.0 < self.max_prune <= 1.0:
            raise UsageError("--max-prune must be in (0, 1]")
        check_integer(self.popsize, 2, "--popsize")
        check_integer(self.generations, 1, "--generations")
        if not (math.isfinite(self.sigma0) and self.sigma0 > 0):
            raise UsageError(f"--sigma0 must be a finite number > 0 (got {self.sigma0})")
        if not math.isfinite(self.threshold):
            raise UsageError(f"--threshold must be a finite number (got {self.threshold})")
        if not math.isfinite(self.x0):
            raise UsageError("x0 must be a finite number")
