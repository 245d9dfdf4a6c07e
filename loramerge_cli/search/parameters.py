"""Strategies' own settings, declared once: type, default, help, range. `search/strategies.py` makes each
registry entry's `parameters` of them (search-mask's options are generated from those); the settings of the
screened and surrogate searches check their values against the same declarations."""

from __future__ import annotations

import math
from dataclasses import dataclass

from loramerge_cli.errors import UsageError


@dataclass(frozen=True)
class StrategyParameter:
    """A strategy's own setting: the `request.options` key, and the search-mask option made from it."""

    name: str
    type: type
    default: object
    help: str
    flags: tuple[str, ...] = ()  # the option's flags; default --name (a bool: --name/--no-name)
    needs: tuple[str, ...] = ()  # bool parameters of the same strategy without which this one does nothing
    off: tuple = ()  # values that switch this setting off: allowed whatever its `needs` are
    low: float | None = None  # the allowed range of a number (inclusive), checked before any work and shown in
    high: float | None = None  # --help; a float is also refused when not finite
    labelled: bool = False  # read with labelled accuracy only: given with a label-free --fitness, it does nothing

    def bounds(self) -> str:
        """The allowed range, as help and errors show it ('' for any value of its type)."""
        if self.low is not None and self.high is not None:
            return f"from {self.low:g} to {self.high:g}"
        return f">= {self.low:g}" if self.low is not None else f"<= {self.high:g}" if self.high is not None else ""

    def check(self, value) -> None:
        """`value` of the declared type (a float setting takes an int; a bool is no number) and range."""
        flag = f"--{self.name.replace('_', '-')}"
        accepted = (int, float) if self.type is float else self.type
        if isinstance(value, bool) != (self.type is bool) or not isinstance(value, accepted):
            raise UsageError(f"{flag} must be {self.type.__name__} (got {value!r})")
        if self.type is float and not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number (got {value!r})")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise UsageError(f"{flag} must be {self.bounds()} (got {value!r})")


def check_declared(settings, parameters: tuple[StrategyParameter, ...]) -> None:
    """A settings object's value of each declared parameter, of its type and range."""
    for parameter in parameters:
        parameter.check(getattr(settings, parameter.name))


PRIOR_RANGE = (1e-4, 1e4)  # the surrogate's priors and noise (standard deviations in fitness points): far outside
# it the model's linear algebra fails (a kernel of 1e20, or of 1e-20 beside 1)

SCREENED_PARAMETERS = (
    StrategyParameter("screen", bool, True, "score every single-unit pruning first (full validation set) and start "
                      "CMA-ES from it."),
    StrategyParameter("greedy_pool", int, 8, "after the screen (--screen), greedy leave-one-out over this many best "
                      "single units (full validation set), CMA-ES started from its table (0 or 1: off).",
                      needs=("screen",), off=(0, 1), low=0),
    StrategyParameter("redraws", int, 20, "redraws of a candidate whose table was already scored (0: off).", low=0),
    StrategyParameter("halving", bool, True, "score each generation's new tables on seeded validation subsets first "
                      "(successive halving; labelled --fitness accuracy only); the result's fitness is always the "
                      "full set's.", labelled=True),
    StrategyParameter("eta", int, 3, "successive halving keeps the best 1/eta per subset; subsets n/eta, n/eta².",
                      needs=("halving",), low=2, labelled=True),
    StrategyParameter("screen_rungs", int, 1, "score the screen's single units on this many of the halving's rungs, "
                      "the full set last (1: the full set only; 2: from n/eta; 3: from n/eta²): cheaper, a less "
                      "exact start.", needs=("screen", "halving"), low=1, labelled=True),
)

SURROGATE_PARAMETERS = (
    StrategyParameter("proposals", int, 1, "tables proposed per step and scored together (by the workers, if "
                      "several): more is faster on many devices, each proposal knowing less.", low=1),
    StrategyParameter("prior_single", float, 1.0, "prior standard deviation of one unit's effect on the fitness "
                      "(points).", low=PRIOR_RANGE[0], high=PRIOR_RANGE[1]),
    StrategyParameter("prior_pair", float, 0.2, "prior standard deviation of the interaction of two pruned units "
                      "(points).", low=PRIOR_RANGE[0], high=PRIOR_RANGE[1]),
    StrategyParameter("same_unit_ratio", float, 2.0, "the interaction of two tasks' entries of one unit (one block) "
                      "has this times --prior-pair: the merge couples a module's tasks (1: no difference).",
                      low=0, high=100),
    StrategyParameter("noise", float, 0.5, "what the model leaves unexplained, in fitness points (accuracy: one "
                      "validation example is 100/(tasks·examples) points; --fitness nsc scores about 20× smaller on "
                      "the bundled example: scale all three alike, --prior-single 0.05 --prior-pair 0.01 "
                      "--noise 0.025).",
                      low=PRIOR_RANGE[0], high=PRIOR_RANGE[1]),
    StrategyParameter("exploit_every", int, 0, "every this many proposal steps, the table that maximises the model's "
                      "posterior mean instead of a posterior draw (the step's first, with --proposals N; 0: draws "
                      "only; 4 finds higher validation scores that held up worse on the bundled example's test "
                      "split).", low=0),
)
