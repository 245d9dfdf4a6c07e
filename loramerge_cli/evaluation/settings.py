"""EvalSettings: how to evaluate (torch-free: a search request is checked before torch is imported)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_THREADS = 4096  # more than any machine's cores: a typo's 10**20 overflowed, 100000 ran out of memory


@dataclass
class EvalSettings:
    """How to evaluate. `val_limit` caps the validation split (overrides each task's `limit`)."""

    split: str = "validation"
    val_limit: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 16
    threads: int | None = None  # torch CPU threads; None: OMP_NUM_THREADS, else min(8, CPUs). Fixed for determinism.
    length_normalize: bool = False  # causal LM: divide a choice's log-likelihood by its token count
    sample_seed: int = 0  # which examples a limit keeps
    max_length: int | None = None  # token cap of tasks that set none; None: the model's (model_max_length)
    block_cache_mb: float = 1024  # searches: reference block outputs kept to skip unchanged blocks (0: off)

    def check(self) -> None:
        """Every setting in range (a usage error naming the flag), before any file is read."""
        import math

        from loramerge_cli.errors import UsageError, check_integer, plain_fields
        from loramerge_cli.merging.registry import DTYPES

        plain_fields(self)  # numpy numbers as Python ones

        for name, low in (("val_limit", 1), ("batch_size", 1), ("threads", 1), ("max_length", 2)):
            check_integer(getattr(self, name), low, f"--{name.replace('_', '-')}",
                          MAX_THREADS if name == "threads" else None)
        check_integer(self.sample_seed, 0, "sample_seed")
        if not isinstance(self.length_normalize, bool):
            raise UsageError(f"--length-normalize must be true or false (got {self.length_normalize!r})")
        if self.dtype not in (*DTYPES, "float64"):
            raise UsageError(f"--dtype must be one of {', '.join((*DTYPES, 'float64'))} (got {self.dtype!r})")
        if not isinstance(self.block_cache_mb, (int, float)) or not 0 <= self.block_cache_mb < math.inf:
            raise UsageError("--block-cache-mb must be a number >= 0")
