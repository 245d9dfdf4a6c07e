"""A review of the library (`loramerge_cli.api`) against the README's promises: each test failed before its fix."""

import warnings

import pytest
import torch

from loramerge_cli import api
from loramerge_cli.api import EnmpSettings, EvalSettings, MergeConfig


def _adapter_args(text_setting) -> list[str]:
    return [f"{name}={folder}" for name, folder in text_setting.adapters.items()]


@pytest.mark.slow
def test_execute_and_execute_eval_leave_torch_threads_as_they_were(text_setting):
    """`api.execute` (λ tuned on tasks) and `api.execute_eval` left torch at the evaluation's thread count (1),
    where `api.merge`, `api.search` and `api.evaluate` gave the caller's back."""
    adapters = api.load_adapters(_adapter_args(text_setting))
    before = torch.get_num_threads()
    other = 1 if before > 1 else 2
    runs = {
        "execute (λ auto)": lambda: api.execute(api.plan_merge(adapters, MergeConfig(merger="ta"), tuning=api.TaskData(
            text_setting.tasks_file, val_limit=4, threads=other))),
        "execute_eval": lambda: api.execute_eval(api.plan_eval(text_setting.tasks_file, _adapter_args(text_setting),
                                                               [], EvalSettings(threads=other, val_limit=4))),
    }
    for name, run in runs.items():
        run()
        assert torch.get_num_threads() == before, name


@pytest.mark.slow
def test_loading_the_base_model_leaves_torch_random_state_alone(text_setting, tmp_path):
    """transformers initialises a base model's new head from torch's global generator: every `api.evaluate`
    (and search, and merge with λ tuned) moved the caller's random state."""
    import shutil

    from safetensors.torch import load_file, save_file

    base = shutil.copytree(text_setting.base, tmp_path / "base")  # saved without its head: a new one is initialised
    weights = load_file(base / "model.safetensors")
    save_file({key: value for key, value in weights.items() if not key.startswith("score.")},
              base / "model.safetensors", metadata={"format": "pt"})
    assert len(weights) > len(load_file(base / "model.safetensors"))
    adapters = api.load_adapters(_adapter_args(text_setting))
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    api.evaluate(text_setting.tasks_file, adapters, [], EvalSettings(val_limit=4, threads=1), base=str(base))
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.slow
def test_an_enmp_search_leaves_the_warnings_filters_alone(text_setting):
    """cma's CMAEvolutionStrategy adds a global 'once' filter for its NeverTestedWarning at every construction."""
    adapters = api.load_adapters(_adapter_args(text_setting))
    request = api.SearchRequest(adapters=adapters, merge=MergeConfig(merger="ta"), tasks=text_setting.tasks_file,
                                eval=EvalSettings(val_limit=4, threads=1), strategy="enmp",
                                enmp=EnmpSettings(seed=1, popsize=4, generations=2, max_prune=0.5))
    filters = list(warnings.filters)
    api.search(api.plan_search(request))
    assert list(warnings.filters) == filters
