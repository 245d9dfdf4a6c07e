"""The labelled search problem: adapters, the resolved merge, the all-ones table and the evaluation engine,
built identically in the parent and in every worker."""

from __future__ import annotations

from dataclasses import dataclass, replace



def request_adapters(request) -> list:
    """The request's adapters: loaded ones as given (the library API), sources read once here."""
    from loramerge_cli.adapters.model import Adapter
    from loramerge_cli.adapters.peft_reader import load_adapters

    if all(isinstance(adapter, Adapter) for adapter in request.adapters):
        return list(request.adapters)
    return load_adapters(request.adapters, request.allow_pickle)


@dataclass
class Problem:
    """Everything a fitness needs, built identically in the parent and in every worker."""

    adapters: list
    settings: object  # ResolvedMerge at the base λ
    template: object  # WeightTable (all ones)
    engine: object  # Evaluator


def build_problem(request, device: str | None = None, lam: float | None = None, report=None) -> Problem:
    """The Problem of a SearchRequest, its evaluator on `device` (default: the request's) at λ `lam`; `report`
    receives the loading as a progress stage."""
    from loramerge_cli.adapters.compat import check_compatible
    from loramerge_cli.evaluation.engine import checked_evaluator
    from loramerge_cli.evaluation.specs import load_task_file
    from loramerge_cli.masks import ones_table
    from loramerge_cli.merging.merge import resolve_config

    adapters = request_adapters(request)
    check_compatible(adapters, request.allow_base_mismatch)
    merge_config = replace(request.merge, lam=lam if lam is not None else request.merge.lam)
    settings = resolve_config(merge_config, len(adapters))
    task_file = load_task_file(request.tasks)
    eval_settings = replace(request.eval, device=device) if device else request.eval
    task_file.check_covers([a.name for a in adapters])
    engine = checked_evaluator(task_file, adapters, eval_settings, request.base, request.allow_base_mismatch,
                               request.allow_pickle, report)
    return Problem(adapters, settings, ones_table(adapters), engine)


