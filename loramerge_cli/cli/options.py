"""Options declared once, as data, and commands whose signatures are built from them.

The merge settings (--merger, --space, each method parameter) are generated from the method registry
(merging/registry.py, torch-free), so a method added there appears in `merge --help` and `search-mask --help`
with its help, bounds and choices. A command is `def command(ctx, **flags)` with the signature that
`signature(...)` makes, so its body only parses, plans, executes and renders.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Literal

import typer

from loramerge_cli.cli.common import (
    ADAPTERS_HELP,
    ALLOW_BASE_MISMATCH_HELP,
    ALLOW_PICKLE_HELP,
    CONFIG_HELP,
    DEBUG_HELP,
    JSON_HELP,
    QUIET_HELP,
    THREADS_HELP,
    load_config_defaults,
    adapter_source_value,
    path_value,
    source_value,
)
from loramerge_cli.cli.recipe import SOURCE_KEYS
from loramerge_cli.errors import UsageError
from loramerge_cli.evaluation.settings import MAX_THREADS
from loramerge_cli.search.backends import BACKENDS


def option(name: str, annotation, default, *flags: str, **settings) -> inspect.Parameter:
    """One command-line option as a keyword parameter (Typer reads the Annotated metadata)."""
    flags = flags or (f"--{name.replace('_', '-')}",)
    if annotation in (Path, Path | None):
        settings.setdefault("parser", path_value)
    elif name in SOURCE_KEYS:
        settings.setdefault("parser", source_value if name == "base" else adapter_source_value)
    names = _choices(annotation)
    if len("|".join(names)) > LONGEST_CHOICE_METAVAR:  # a 140-column metavar: no terminal wraps it well
        settings.setdefault("metavar", "NAME")
        text, marker, shown = (settings.get("help") or "").partition(" [default:")
        settings["help"] = f"{text} One of: {', '.join(names)}.{marker}{shown}".strip()
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, typer.Option(*flags, **settings)])


def setting_option(settings, field: str, *flags: str, name: str | None = None, annotation=None,
                   **options) -> inspect.Parameter:
    """The option of a settings dataclass's field (named after it unless `name`): its default, and its type
    unless `annotation` (a `choice`), are the field's, so the command line and the library cannot differ."""
    import dataclasses
    import typing

    default = next(item.default for item in dataclasses.fields(settings) if item.name == field)
    annotation = annotation if annotation is not None else typing.get_type_hints(settings)[field]
    return option(name or field, annotation, default, *flags, **options)


LONGEST_CHOICE_METAVAR = 40  # longer lists of choices go into the help text, behind the metavar NAME


def _choices(annotation) -> tuple[str, ...]:
    """The names a `choice` annotation (or `choice | None`) allows; () for any other annotation."""
    import typing

    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    return next((names for member in typing.get_args(annotation) if (names := _choices(member))), ())


def choice(names):
    """The type of an option whose value must be one of `names` (Click exits 2 listing them)."""
    return Literal[tuple(names)]


def signature(*groups: list[inspect.Parameter]) -> inspect.Signature:
    """The signature of a command taking the Typer context and every option of `groups`, in order."""
    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    parameters = [context, *(parameter for group in groups for parameter in group)]
    names = [parameter.name for parameter in parameters] + ["help"]  # (--help: every command's, -h beside it)
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:  # a registered parameter (a merge method's, a strategy's) named like another option of the command
        raise TypeError(f"two options of one command are named --{twice[0].replace('_', '-')}: a merge method's or "
                        "a search strategy's declared parameter needs a name no other option of the command has")
    return inspect.Signature(parameters)


def with_options(*groups: list[inspect.Parameter]):
    """Decorator: give a `(ctx, **flags)` command the signature of `groups` (call it last, outermost)."""
    def decorate(function):
        function.__signature__ = signature(*groups)
        return function

    return decorate


def adapter_options(with_base_mismatch: bool = True, required: str | None = None) -> list[inspect.Parameter]:
    """--adapters (required; `required` names when it is not, and makes it optional) and how they load."""
    adapters = option("adapters", list[str], ..., help=ADAPTERS_HELP, show_default=False) if required is None else \
        option("adapters", list[str] | None, None, help=f"{ADAPTERS_HELP} Required {required}.", show_default=False)
    options = [adapters,
               option("allow_pickle", bool, False, help=ALLOW_PICKLE_HELP)]
    if with_base_mismatch:
        options.append(option("allow_base_mismatch", bool, False, help=ALLOW_BASE_MISMATCH_HELP))
    return options


def output_options(config: bool = True) -> list[inspect.Parameter]:
    """--config, --json, --quiet, --debug: how a command talks."""
    options = [option("config", Path | None, None, is_eager=True, callback=load_config_defaults, help=CONFIG_HELP)]
    return (options if config else []) + [
        option("json_output", bool, False, "--json", help=JSON_HELP),
        option("quiet", bool, False, help=QUIET_HELP),
        option("debug", bool, False, help=DEBUG_HELP),
    ]


def threads_option(help: str = THREADS_HELP) -> inspect.Parameter:
    """--threads: torch's CPU threads in this process."""
    return option("threads", int | None, None, min=1, max=MAX_THREADS, show_default=False, help=help)


MAX_TOKENS = 2**24  # the largest token cap accepted (by --max-length and a task's max_length)


def max_length_option(used_by: str = "") -> inspect.Parameter:
    """--max-length: the token cap of tasks whose spec sets none."""
    return option("max_length", int | None, None, min=2, max=MAX_TOKENS, show_default=False,
                  help=f"{used_by}Token cap of tasks whose spec sets none. [default: the smaller of the tokenizer's "
                       "model_max_length and the model's max_position_embeddings]")


def push_options() -> list[inspect.Parameter]:
    """--push-to-hub and how: --private, --revision, --dry-run."""
    return [
        option("push_to_hub", str | None, None, metavar="OWNER/NAME",
               help="Upload the output folder to this Hub model repository."),
        option("private", bool, False, help="--push-to-hub: create the repository private."),
        option("revision", str | None, None, show_default=False,
               help="--push-to-hub: branch to upload to (created if needed). [default: main]"),
        option("dry_run", bool, False, help="--push-to-hub: list what would be uploaded, upload nothing."),
    ]


def scale_options() -> list:
    """--devices, --workers, --backend, --ray-address (the device itself is each command's --device)."""
    return [
        option("devices", str | None, None, help="Comma-separated devices, one worker each (cuda:0,cuda:1)."),
        option("workers", int | None, None, help="Workers on --device (processes, or Ray actors with --backend "
               "ray)."),
        option("backend", choice(BACKENDS), "process", help="process: worker processes on this machine "
               "(serial without --workers/--devices); ray: one Ray actor per device, on this machine or a cluster "
               "(needs the ray extra; without --workers/--devices, one per GPU of the cluster with --device cuda, "
               "else one per --threads CPUs)."),
        option("ray_address", str | None, None, show_default=False, help="--backend ray: 'auto' (the cluster "
               "`ray start` runs on this machine) or HOST:PORT. [default: a local Ray cluster for this run]"),
    ]




def resolve_backend(device: str, devices: str | None, workers: int | None, threads: int | None, backend: str,
                    ray_address: str | None):
    """(Backend, threads per worker): the devices of the workers, and the torch threads every process uses
    (`Backend.threads_each`)."""
    from loramerge_cli.search.backends import Backend

    if devices and workers:
        raise UsageError("give --devices or --workers, not both")
    Backend(backend, None, ray_address).check()
    device_list = [d.strip() for d in devices.split(",")] if devices else None
    if devices is not None and not any(device_list or ()):
        raise UsageError("--devices: give at least one device")
    if device_list is not None and not all(device_list):
        raise UsageError(f"--devices {devices}: an empty entry (one device per worker, separated by commas)")
    if workers is not None:
        if workers < 1:
            raise UsageError("--workers must be >= 1")
        device_list = [device] * workers
    spread = Backend(backend, device_list, ray_address)
    spread.check_worker_count(f"--workers {workers}" if workers is not None else f"--devices {devices}")
    return spread, spread.threads_each(device, threads)


def merger_options(default_merger: str | None = None, tables: bool = True) -> list[inspect.Parameter]:
    """--merger, --method, --space, --lambda, --weights, every registered method parameter, --knots-scaled;
    `tables`: the command merges a --mask table (whose scale or λ is --lambda's default)."""
    from loramerge_cli.merging.registry import (
        PARAMETERS,
        PRESETS,
        SPACES,
        defaults_text,
        lambda_defaults_text,
        merger_names,
        method_names,
    )

    shown = default_merger or "ta"
    from_table = "a --mask table's scale, else the λ it recorded, else " if tables else ""
    options = [
        option("merger", choice(merger_names()) | None, default_merger, show_default=False, help=(
            f"Preset ({', '.join(PRESETS)}) or method; its parameters are the defaults. [default: {shown}]")),
        option("method", choice(method_names()) | None, None, help="Override the preset's method."),
        option("space", choice(SPACES) | None, None, help="Override the space the method acts in."),
        option("lam", str | None, None, "--lambda", show_default=False, help=(
            "λ, the factor on the merged update: a number, or 'auto' (tuned on --tasks). "
            f"[default: {from_table}the method's: {lambda_defaults_text()}; T = the number of adapters]")),
        option("weights", str | None, None, show_default=False, help=(
            "Per-adapter weights w1,w2,... in task order, applied before the method. [default: 1]")),
    ]
    for parameter in PARAMETERS.values():
        kind = choice(parameter.choices) if parameter.choices else str if parameter.per_adapter else parameter.type
        allowed = f" Allowed: {parameter.bounds()}." if parameter.bounds() and not parameter.choices else ""
        options.append(option(parameter.name, kind | None, None, show_default=False, help=(
            f"{parameter.help}{allowed} [default: {defaults_text(parameter.name)}]")))
    options.append(option("knots_scaled", bool | None, None, "--knots-scaled/--no-knots-scaled", show_default=False,
                          help="knots space: scale the components by their singular values."))
    options.append(option("isotropize", bool | None, None, "--isotropize/--no-isotropize", show_default=False,
                          help="Flatten the spectrum of the merged update, after any method in any space "
                          "(CoreSpace's Iso step)."))
    return options


def merge_config(flags: dict, **fixed):
    """The MergeConfig of the merger options in `flags` (None: not given); λ 'auto' is left to the caller."""
    from loramerge_cli.cli.common import parse_float_list, parse_lambda
    from loramerge_cli.errors import check_seed
    from loramerge_cli.merging.config import SETTINGS, MergeConfig
    from loramerge_cli.merging.registry import PARAMETERS

    check_seed(flags.get("seed", fixed.get("seed")))
    lam = parse_lambda(flags.get("lam"))
    given = {**flags, **{name: _per_adapter(flags[name], name) for name in PARAMETERS
                         if PARAMETERS[name].per_adapter and name in flags}}
    named = {name: given[name] for name in SETTINGS if name in given and name not in ("lam", "weights")}
    extra = {name: given[name] for name in PARAMETERS if name not in SETTINGS}
    return MergeConfig(**named, lam=None if lam == "auto" else lam,
                       weights=parse_float_list(flags.get("weights"), "--weights"), params=extra, **fixed)


def _per_adapter(text: str | None, name: str):
    """A per-adapter option's value: one number, or a list of them (v1,v2,... in task order)."""
    from loramerge_cli.cli.common import parse_float_list

    values = parse_float_list(text, f"--{name.replace('_', '-')}")
    return values[0] if values is not None and len(values) == 1 else values
