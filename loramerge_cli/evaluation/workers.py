"""Evaluation workers for a backend (search/backends.py): `eval`'s merged adapters and `--lambda auto`'s
grid, spread over devices. Each builder is picklable and builds its engine once, on its device; every
worker scores exactly as the serial loop does."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from loramerge_cli.evaluation.settings import EvalSettings


@dataclass
class EngineSource:
    """What builds an `Evaluator`: the task spec, the experts, the settings."""

    tasks: Path
    adapters: list  # the experts: sources (str), or loaded Adapters
    settings: EvalSettings
    base: str | None = None
    allow_pickle: bool = False

    def loaded(self) -> list:
        """The experts: loaded ones as given (the library API), sources read here."""
        from loramerge_cli.search.problem import request_adapters

        return request_adapters(self)

    def engine(self, device: str, adapters=None):
        from loramerge_cli.evaluation.engine import Evaluator
        from loramerge_cli.evaluation.specs import load_task_file

        adapters = adapters if adapters is not None else self.loaded()
        return Evaluator(load_task_file(self.tasks), adapters, replace(self.settings, device=device), base=self.base,
                         allow_pickle=self.allow_pickle)


@dataclass
class MergedScorer:
    """Builds a worker that scores merged adapters (their sources) on every task: {task: accuracy} each."""

    source: EngineSource

    def __call__(self, device: str):
        from loramerge_cli.adapters.peft_reader import load_adapter

        engine = self.source.engine(device)
        allow_pickle = self.source.allow_pickle
        return lambda sources: [engine.score_adapter(load_adapter(spec, allow_pickle)) for spec in sources]


@dataclass
class LambdaScorer:
    """Builds a worker that scores the merge at each λ it is given: {task: accuracy} each. The adapters are
    merged once at λ = 1 (every method is linear in λ) and each λ only rescales the merged factors."""

    source: EngineSource
    config: object  # MergeConfig
    table: object | None  # WeightTable or None
    allow_base_mismatch: bool = False
    statistics: dict | None = None  # a data-reading method's input Gram matrices (RegMean)

    def __call__(self, device: str):
        from loramerge_cli.evaluation.engine import merged_deltas, scale_deltas
        from loramerge_cli.evaluation.tuning import finite_scores
        from loramerge_cli.merging.merge import merge

        adapters = self.source.loaded()
        engine = self.source.engine(device, adapters)
        unit = merged_deltas(merge(adapters, replace(self.config, lam=1.0), self.table, self.allow_base_mismatch,
                                   statistics=self.statistics))
        return lambda lams: [finite_scores(engine, scale_deltas(unit, lam)) for lam in lams]


@contextmanager
def tuning_pool(adapters: list, config, table, tuning, allow_base_mismatch: bool = False, statistics=None):
    """The workers of `tuning.backend` (search/backends.py) that score a `plan.TaskData`'s λ grid, or None
    when it is scored here; they end on the way out."""
    from loramerge_cli.search.backends import worker_pool

    options = tuning.options()
    settings = EvalSettings(**{key: value for key, value in options.items() if key != "base"})
    source = EngineSource(tuning.tasks, adapters, settings, tuning.base)
    with worker_pool(LambdaScorer(source, config, table, allow_base_mismatch, statistics), tuning.backend,
                     settings.device, settings.threads) as pool:
        yield pool
