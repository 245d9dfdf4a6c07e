"""What a task spec asks of the model and the adapters, checked from their JSON configs before any model or
adapter loads (the engine checks the same on the loaded model: engine.py, compat.check_base_kind)."""

from __future__ import annotations

from pathlib import Path

from loramerge_cli.errors import LoramergeError
from loramerge_cli.evaluation.specs import TaskFile

# The config.json key of the position table's length where transformers' config class maps
# max_position_embeddings to another name (its attribute_map, transformers 5). Elsewhere a key such as T5's
# n_positions is no limit (relative positions): only max_position_embeddings is read. The engine checks the
# loaded config again (task_types/base.py, token_cap).
POSITION_ALIASES = {
    **dict.fromkeys(("codegen", "ctrl", "decision_transformer", "gpt-sw3", "gpt2", "gpt_bigcode", "gptj",
                     "imagegpt", "openai-gpt"), "n_positions"),
    "bailing_hybrid": "model_max_length", "kimi_linear": "model_max_length", "dbrx": "max_seq_len",
    "rwkv": "context_length",
}


def check_task_type(task_file: TaskFile, name: str, config: dict) -> None:
    """An adapter whose PEFT `task_type` belongs to another task type than the spec's model_type (a causal-LM
    adapter scored as a classifier, or the other way round) is refused."""
    from loramerge_cli.evaluation.task_types import TASK_TYPES

    known = {peft_type for task_type in TASK_TYPES.values() for peft_type in task_type.peft_task_types}
    recorded = str(config.get("task_type") or "").upper()
    if recorded in known and recorded not in task_file.type.peft_task_types:
        raise LoramergeError(f"{task_file.path}: model_type {task_file.model_type}, but adapter {name!r} was trained "
                             f"for {config['task_type']}")


def model_positions(config: dict) -> tuple[str, int] | None:
    """(key, length) of the position table a config.json states (POSITION_ALIASES), if it states one."""
    key = POSITION_ALIASES.get(str(config.get("model_type")), "max_position_embeddings")
    value = config.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return key, value
    return None


def check_model_fit(task_file: TaskFile, adapters, base: str | None = None, max_length: int | None = None,
                    allow_pickle: bool = False) -> None:
    """Before any model loads: every adapter (arguments or loaded Adapters) was trained for the spec's model
    type, and no token cap given (a task's `max_length`, else `max_length`) is above the positions of the base
    (`base`, else the spec's, else the adapters' one base; its config.json, in a folder or the Hub cache)."""
    from loramerge_cli.adapters.card import base_config
    from loramerge_cli.adapters.peft_reader import read_config
    from loramerge_cli.adapters.sources import default_name, resolve, split_name

    bases = set()
    for argument in adapters:
        if isinstance(argument, str):
            named = split_name(argument)
            config_file = resolve(named.spec, allow_pickle=allow_pickle).config_file
            try:
                config = read_config(Path(config_file)) if config_file else {}
            except LoramergeError:
                continue  # the loader reports it
            name = named.name or default_name(named.spec)
        else:  # a loaded Adapter (the library API)
            config, name = argument.config, argument.name
        if not isinstance(config, dict):
            continue
        check_task_type(task_file, name, config)
        bases.add(config.get("base_model_name_or_path"))
    base = base or task_file.base_model or (bases.pop() if len(bases) == 1 else None)
    capped = [task for task in task_file.tasks if "max_length" in task_file.type.reads and
              (task.max_length or max_length)]
    stated = model_positions(base_config(str(base))) if capped and base else None
    for task in capped if stated else ():
        (key, positions), cap = stated, task.max_length or max_length
        if cap > positions:  # longer inputs would index past the position table
            given = "its max_length" if task.max_length else "--max-length"
            raise LoramergeError(f"task {task.name}: {given} {cap} is more than the model's {positions} positions "
                                 f"({key} of {base}); give at most {positions}")
