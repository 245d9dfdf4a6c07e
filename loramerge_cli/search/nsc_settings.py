"""NSC's settings (torch-free: a search request is checked before torch is imported)."""

from __future__ import annotations

from dataclasses import dataclass

from loramerge_cli.errors import UsageError, check_integer, check_seed, is_finite_number, plain_fields

OBJECTIVES = ("nsc", "entropy")
LARGEST = 1e3  # the largest --lr and |--init|: coefficients of the merge's scale (about 1/T), not overflow
STATE_NAME = "nsc_state.safetensors"


@dataclass
class NscSettings:
    """Defaults of docs/algorithms.md, NSC. `batch_size` examples per task and step."""

    steps: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 16
    init: float = 0.4
    seed: int = 1
    objective: str = "nsc"
    target_blocks: list[str] | None = None
    target_modules: list[str] | None = None
    checkpoint_every: int = 10  # steps between run-directory checkpoints

    def check(self) -> None:
        plain_fields(self)  # numpy numbers as Python ones
        for name in ("target_blocks", "target_modules"):  # a string would be read one character at a time
            value = getattr(self, name)
            if value is not None and (isinstance(value, str) or not all(isinstance(item, str) for item in value)):
                raise UsageError(f"{name} must be a list of names (got {value!r})")
        if self.objective not in OBJECTIVES:
            raise UsageError(f"--objective must be one of {', '.join(OBJECTIVES)} (got {self.objective!r})")
        check_integer(self.steps, 1, "--steps", 10_000_000)  # (past it, a run would never end)
        if not (is_finite_number(self.lr) and 0 < self.lr <= LARGEST):
            raise UsageError(f"--lr must be > 0 and at most {LARGEST:g} (got {self.lr!r})")
        if not (is_finite_number(self.init) and -LARGEST <= self.init <= LARGEST):
            raise UsageError(f"--init must be a number from {-LARGEST:g} to {LARGEST:g} (got {self.init!r})")
        if not (is_finite_number(self.weight_decay) and self.weight_decay >= 0):
            raise UsageError(f"weight_decay must be a finite number >= 0 (got {self.weight_decay!r})")
        check_integer(self.batch_size, 1, "--batch-size")
        check_seed(self.seed)
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int) \
                or self.checkpoint_every < 1:
            raise UsageError("checkpoint interval must be >= 1 step")
