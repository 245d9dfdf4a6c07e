"""EvalSettings: how to evaluate (torch-free: a search request is checked before torch is imported)."""

from __future__ import annotations

from dataclasses import dataclass


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
