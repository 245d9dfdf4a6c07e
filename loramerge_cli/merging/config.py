"""MergeConfig: what to merge and how, as the caller gives it (torch-free, so flags are checked before torch
is imported). `merge.resolve_config` turns it into the values a merge uses."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MergeConfig:
    """What to merge and how. `None` means: not given (the table's recorded value, else the preset's or the
    method's default; see docs/algorithms.md, "Settings and precedence")."""

    merger: str | None = None  # a preset (knots, core) or a method name; default ta
    method: str | None = None
    space: str | None = None
    lam: float | None = None
    weights: list[float] | None = None  # per adapter, in task order
    density: float | list[float] | None = None  # one value, or one per adapter
    drop_rate: float | None = None
    scope: str | None = None
    knots_scaled: bool | None = None
    isotropize: bool | None = None  # flatten the merged update's spectrum, after any method in any space
    seed: int | None = None  # default 1
    out_rank: int | None = None
    energy: float | None = None  # default 0.9999
    compute_dtype: object = None  # a torch dtype; None: float64
    params: dict = field(default_factory=dict)  # method parameters without a field above, by name

    def __post_init__(self) -> None:
        """A setting with a field may come in `params` too (every method parameter can be given there): it moves
        to its field, and the same setting given both ways with two values is refused."""
        from loramerge_cli.errors import UsageError, brief, plain_fields, plain_value

        plain_fields(self)  # numpy numbers as Python ones
        if not isinstance(self.params, dict):
            raise UsageError(f"params must be a dict of method parameters by name (got {brief(self.params)})")
        self.params = {name: plain_value(value) for name, value in self.params.items()}
        moved = {name: value for name, value in self.params.items() if name in SETTINGS and value is not None}
        for name, value in moved.items():
            if getattr(self, name) is not None and getattr(self, name) != value:
                raise UsageError(f"{name} is given twice: {getattr(self, name)!r}, and {value!r} in params")
            setattr(self, name, value)
        if moved:
            self.params = {name: value for name, value in self.params.items() if name not in SETTINGS}

    def given(self) -> dict:
        """The settings the caller chose (not None), by field name; `params` spread among them."""
        chosen = {name: getattr(self, name) for name in SETTINGS if getattr(self, name) is not None}
        return {**chosen, **{name: value for name, value in self.params.items() if value is not None}}

    def method_name(self) -> str:
        """The method these settings name (not checked to exist): `method`, else the merger's (a preset's
        method, or the merger itself), else the default merger's."""
        from loramerge_cli.merging.registry import PRESETS

        merger = self.merger or DEFAULT_MERGER
        return self.method or (PRESETS[merger].method if merger in PRESETS else merger)

    def draws(self) -> bool:
        """Whether the merge these settings name depends on the seed (an unknown method: True, left to the merge's
        check, which names it)."""
        from loramerge_cli.merging.registry import method_named

        try:
            return method_named(self.method_name()).randomized
        except KeyError:
            return True

    def parameter(self, name: str):
        """A method parameter's given value, or None."""
        return getattr(self, name) if name in SETTINGS else self.params.get(name)


SETTINGS = ("merger", "method", "space", "lam", "weights", "density", "drop_rate", "scope", "knots_scaled", "seed",
            "out_rank", "energy", "isotropize")  # MergeConfig's fields that a weight table may record (lam as "lambda")
DEFAULT_MERGER, DEFAULT_SEED, DEFAULT_ENERGY = "ta", 1, 0.9999


def zero_by_settings(lam: float | None, weights) -> str | None:
    """Why every merge with λ `lam` and task weights `weights` is zero whatever it merges ("λ = 0", "every
    --weights value is 0"), None when it need not be: merge refuses to write one, search-mask to search one."""
    if lam == 0:
        return "λ = 0"
    return "every --weights value is 0" if weights and not any(weights) else None
