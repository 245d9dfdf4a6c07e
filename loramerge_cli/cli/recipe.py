"""Recipes: the loramerge.yaml every output folder holds, and the --config files every command reads.

A recipe is a map of flag names to values, plus `adapters` as a map of task name to source (or to
`{path, weight, density}`). Paths in it are relative to the file, so `loramerge merge --config
merged/loramerge.yaml --out again/` rebuilds `merged/` bit for bit from wherever it is run.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from loramerge_cli.adapters.card import RECIPE_NAME, relative_path
from loramerge_cli.errors import brief
from loramerge_cli.merging.registry import PARAMETERS

# What an entry of a recipe's adapters map may hold besides its path: the adapter's weight and each method
# parameter the registry takes per adapter, by the key the entry names it with and the flag it stands for.
PER_ADAPTER_KEYS = {"weight": "weights", **{name: name.replace("_", "-") for name, parameter in PARAMETERS.items()
                                            if parameter.per_adapter}}
# Parameters that say where and how to run and report, not what to compute: never recorded.
NOT_RECORDED = {"out", "force", "json_output", "quiet", "debug", "config", "threads", "push_to_hub", "private",
                "revision", "dry_run", "adapters", "indices", "mask", "devices", "workers", "backend", "ray_address",
                "allow_pickle"}  # (unpickling is allowed where it is done: a recipe is handed around)
# Parameters only --lambda auto reads: dropped once λ is resolved to a number.
TUNING_ONLY = {"tasks", "val_limit", "device", "batch_size", "max_length", "eval_dtype"}
SOURCE_KEYS = {"adapters", "merged", "base"}  # strings that may be local paths (else Hub ids)


def _flag(option) -> str:
    return next((opt[2:] for opt in option.opts if opt.startswith("--")), option.name)


def is_option(parameter) -> bool:
    return getattr(parameter, "param_type_name", None) == "option"


def is_path(parameter) -> bool:
    """Whether a Typer parameter is annotated as a pathlib.Path (then a config file's value is relative to it)."""
    import typing

    annotation = getattr(getattr(parameter, "type_descriptor", None), "annotation", None)
    if annotation is None:  # typer before 0.25: a click ParamType
        return type(getattr(parameter, "type", None)).__name__ == "Path"
    return annotation is Path or Path in typing.get_args(annotation)


def adapter_source(adapter, folder: str | Path) -> str:
    """How the recipe in `folder` names an adapter: a Hub id pinned to its commit, or a relative path."""
    from loramerge_cli.adapters.card import is_hub_id

    source = adapter.source
    if source.kind == "hub" and source.repo_id:
        return f"{source.repo_id}@{source.revision}" if source.revision else source.repo_id
    if source.kind == "hub" or (source.kind not in ("dir", "file") and is_hub_id(source.spec)):
        return source.spec
    return relative_path(source.local_path, folder)  # a local `org/name` too (read as a path where it exists)


def build_recipe(ctx: typer.Context, adapters, folder: str | Path, resolved: dict | None = None,
                 reads_data: bool = False, rebuild_flags: str = "") -> str:
    """The resolved recipe of the command `ctx` ran, for a file in `folder`: the adapters by name, then every
    flag that was given a value (`resolved` overrides them, e.g. the tuned λ; None drops a key). The task
    data's flags stay when the method reads the tasks' inputs (`reads_data`: RegMean), else only with
    --lambda auto. `rebuild_flags`: what the rebuild line adds (the thread count whose rounding a result has)."""
    import yaml

    from loramerge_cli import __version__

    resolved = dict(resolved or {})
    values = {}
    for option in ctx.command.params:
        if not is_option(option) or option.name in NOT_RECORDED:
            continue
        value = resolved.pop(option.name, ctx.params.get(option.name))
        if value is None or value == option.default or (isinstance(value, (list, tuple)) and not value):
            continue
        if isinstance(value, Path) or (option.name == "base" and (os.path.isabs(value) or os.path.exists(value))):
            value = relative_path(value, folder)
        if option.name == "lam" and isinstance(value, str) and value != "auto":  # a number, as a tuned λ is written
            value = float(value)  # (the command line gives it as text: `lambda: '0.3'` changed type on a rebuild)
        values[_flag(option)] = value
    if values.get("lambda") != "auto" and not reads_data:  # λ is resolved: what only its tuning reads goes
        for name in TUNING_ONLY:
            values.pop(name.replace("_", "-"), None)
    # per-adapter values go in the adapters' map, where they follow each adapter by name (a flag's list would be
    # handed out by position to adapters given in another order)
    per_adapter = {key: [float(v) for v in str(values.pop(flag)).split(",")] for key, flag in PER_ADAPTER_KEYS.items()
                   if flag in values and (flag == "weights" or "," in str(values[flag]))}
    for flag in set(PER_ADAPTER_KEYS.values()) & values.keys():  # one value for every adapter: a number, as
        values[flag] = float(values[flag])  # YAML writes it (the command line gives it as text)
    sources = {}
    for index, adapter in enumerate(adapters):
        source = adapter_source(adapter, folder)
        entry = {key: numbers[index] for key, numbers in per_adapter.items()}
        sources[adapter.name] = {"path": source, **entry} if entry else source
    recipe = {"adapters": sources, **{key: value for key, value in resolved.items() if value is not None}, **values}
    header = (f"# loramerge {__version__} recipe ({ctx.info_name}); paths are relative to this file.\n"
              f"# Rebuild: loramerge {ctx.info_name} --config {RECIPE_NAME} --out DIR{rebuild_flags}\n")
    return header + yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)


def _local(value: str, folder: Path) -> str:
    """A source written in a config file: a path relative to the file if it names one there, else as is (a Hub
    id, or a path in the working folder: `org/name` may be either, as for the command line)."""
    name, sep, spec = value.partition("=")
    if not sep or not name or "/" in name:
        name, sep, spec = "", "", value
    if os.path.isabs(spec) or spec.startswith("~") or not spec.strip():  # an empty source is refused as given
        return value
    candidate = folder / spec
    if candidate.exists() or spec.startswith(("./", "../")):
        spec = str(candidate)
    return f"{name}{sep}{spec}"


def _adapter_map(value: dict, origin: str) -> tuple[list[str], dict]:
    """`{name: source | {path, weight, density, …}}` -> (["name=source", ...], extra flag values)."""
    from loramerge_cli.adapters.sources import NAME

    sources, given = [], {key: [] for key in PER_ADAPTER_KEYS}
    for name, entry in value.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise typer.BadParameter(f"{origin}: {brief(name)} is not a task name (an ASCII letter, digit or _ first, "
                                     "then letters, digits, _ . -)")
        if isinstance(entry, dict):
            unknown = set(entry) - {"path", "source", *PER_ADAPTER_KEYS}
            if unknown:
                raise typer.BadParameter(f"{origin}: adapter {name!r}: unknown keys {sorted(unknown)} (it takes path "
                                         f"or source, {', '.join(PER_ADAPTER_KEYS)})")
            if "path" in entry and "source" in entry:  # (one would be dropped without a word)
                raise typer.BadParameter(f"{origin}: adapter {name!r}: give path or source (one name for it), not both")
            source = entry["path"] if "path" in entry else entry.get("source")
            _check_source(source, f"{origin}: adapter {name!r}: path")
            sources.append(f"{name}={source}")
            for key, values in given.items():
                values.append(_number(entry.get(key), f"{origin}: adapter {name!r}: {key}"))
        else:
            _check_source(entry, f"{origin}: adapter {name!r}")
            sources.append(f"{name}={entry}")
            for values in given.values():
                values.append(None)
    extra = {}
    for key, values in given.items():
        numbers = [number for number in values if number is not None]
        if not numbers:
            continue
        if key == "weight":  # an adapter without one weighs 1
            extra["weights"] = ",".join(str(1.0 if number is None else float(number)) for number in values)
            continue
        if len(numbers) < len(values):
            raise typer.BadParameter(f"{origin}: give a {key} for every adapter or for none")
        extra[PER_ADAPTER_KEYS[key]] = ",".join(map(str, numbers))  # as --density d1,d2,…
    return sources, extra


def per_adapter_values(ctx: typer.Context, flags: dict) -> None:
    """The recipe's per-adapter values (`weight`, `density`: PER_ADAPTER_KEYS) follow the adapters by name when
    --adapters on the command line lists them in another order; for other adapters they are refused (not
    handed out by position)."""
    given = ctx.meta.get(PER_ADAPTER) or {}
    source = ctx.get_parameter_source("adapters")
    if not given or source is None or source.name == "DEFAULT_MAP" or not flags.get("adapters"):
        return
    from loramerge_cli.adapters.sources import source_names

    names = source_names(flags["adapters"])
    for flag, by_name in given.items():
        if getattr(ctx.get_parameter_source(flag), "name", "") != "DEFAULT_MAP":
            continue  # given on the command line: it wins
        if sorted(names) != sorted(by_name):
            raise typer.BadParameter(f"the recipe gives a {flag.rstrip('s')} per adapter for {', '.join(by_name)}, "
                                     f"and --adapters names {', '.join(names)}: give --{flag} for these",
                                     param_hint="'--config'")
        flags[flag] = ctx.params[flag] = ",".join(by_name[name] for name in names)


def _number(value, where: str) -> float | None:
    """A recipe's number: YAML's, or text that spells one (YAML 1.1 reads `1e-1`, with no dot, as text)."""
    import math

    if value is None:
        return None
    try:
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or not math.isfinite(number):
        raise typer.BadParameter(f"{where} must be a number (got {brief(value)})")
    return number


def _check_source(value, where: str) -> None:
    """A recipe's adapter or base source is text that names something (YAML reads `5`, `null` and dates as other
    things; str() of them would name a file "None")."""
    if not isinstance(value, str):
        raise typer.BadParameter(f"{where}: {brief(value)} is not a path or Hub id (quote it)")
    if not value.strip():
        raise typer.BadParameter(f"{where}: the source is empty")


PER_ADAPTER = "recipe_per_adapter"  # ctx.meta: {flag: {task: value}} of the recipe's adapters map


MAX_BYTES = 1 << 20  # a recipe file's, and its values' once YAML aliases are spelled out


def expand_config(data: dict, path: Path, command, meta: dict | None = None) -> dict:
    """A --config mapping with its `adapters` map spread into flags and its paths made relative to the file;
    the map's per-adapter values, by task name, go to `meta` (see `per_adapter_values`)."""
    from loramerge_cli.adapters.card import is_stream_path

    folder = Path.cwd() if is_stream_path(path) else path.parent  # a recipe piped in (`<(...)`): the working folder
    options = {option.name: option for option in command.params}
    data = {str(key): value for key, value in data.items()}
    if isinstance(data.get("adapters"), dict):
        sources, extra = _adapter_map(data["adapters"], str(path))
        if meta is not None:
            names = [source.partition("=")[0] for source in sources]
            meta[PER_ADAPTER] = {flag: dict(zip(names, value.split(","))) for flag, value in extra.items()
                                 if flag == "weights" or "," in value}  # (one adapter's: any adapter takes it)
        for flag, value in extra.items():
            if flag in data or flag.replace("-", "_") in data:
                raise typer.BadParameter(f"{path}: give {flag} per adapter or as a flag, not both")
            data[flag] = value  # a command that does not merge (inspect, eval) notes them as not used
        data["adapters"] = sources
    expanded = {}
    for key, value in data.items():
        if isinstance(value, list) and sum(len(v) if isinstance(v, str) else 24 for v in value) > MAX_BYTES:
            raise typer.BadParameter(f"{path}: {key}: its {len(value):,} values come to over {MAX_BYTES >> 20} MiB "
                                     "of text (one YAML alias repeated?): no value")
        option = options.get(key.replace("-", "_")) or next(
            (o for o in command.params if f"--{key}" in getattr(o, "opts", ())), None)
        if option is not None and is_path(option) and isinstance(value, list):
            raise typer.BadParameter(f"{path}: {key}: a list is not a path")
        if option is not None and is_path(option) and isinstance(value, str) and value.strip():  # "": refused
            relative = not os.path.isabs(value) and not value.startswith("~") and value != "-"  # -: a standard stream
            value = os.path.join(folder, value) if relative else value  # (a trailing slash kept: a folder)
        elif option is not None and option.name in SOURCE_KEYS and value is not None:  # null: not given
            if isinstance(value, list) and not getattr(option, "multiple", False):
                raise typer.BadParameter(f"{path}: {key}: a list is not a path or Hub id")
            for source in value if isinstance(value, list) else [value]:
                _check_source(source, f"{path}: {key}")
            value = [_local(v, folder) for v in value] if isinstance(value, list) else _local(value, folder)
        expanded[key] = value
    return expanded

