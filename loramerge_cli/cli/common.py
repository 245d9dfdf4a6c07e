"""What every subcommand shares: the error policy, output streams, --config files, argv spreading.

Nothing here imports torch: `loramerge --help` must answer in well under a second.
"""

from __future__ import annotations

import functools
import json
import shlex
import sys
import traceback
from pathlib import Path

import typer
from typer.core import TyperGroup

from loramerge_cli.errors import LoramergeError

MULTI_VALUE_OPTIONS = ("--adapters", "--merged")  # take several values after one flag

# Help texts of the options several commands share.
ADAPTERS_HELP = "Adapters in task order: folders, .safetensors files or Hub ids, each optionally name=source."
ALLOW_PICKLE_HELP = "DANGEROUS: also read pickle (.bin) weights; unpickling a file can run code."
ALLOW_BASE_MISMATCH_HELP = "DANGEROUS: merge adapters whose configs name different base models."
JSON_HELP = "Machine-readable output on stdout (human output goes to stderr)."
QUIET_HELP = "No progress or summary on stderr (errors are still printed)."
DEBUG_HELP = "Show the full traceback of errors."
CONFIG_HELP = "YAML file of flag values (keys are flag names, with - or _); flags on the command line win."


def spread_multi_values(args: list[str], options: tuple[str, ...] = MULTI_VALUE_OPTIONS) -> list[str]:
    """`--adapters a b c` -> `--adapters a --adapters b --adapters c` (Click takes one value per flag)."""
    spread: list[str] = []
    option, first_value_due = None, False
    for position, token in enumerate(args):
        if token == "--":
            return spread + args[position:]
        if first_value_due:
            spread.append(token)
            first_value_due = False
        elif token.startswith("-") and token != "-":
            name, has_value, _ = token.partition("=")
            option = name if name in options else None
            first_value_due = option is not None and not has_value
            spread.append(token)
        elif option is not None:
            spread += [option, token]
        else:
            spread.append(token)
    return spread


class LoramergeGroup(TyperGroup):
    """The top-level group: spreads multi-value options and remembers the command line."""

    def main(self, args=None, prog_name=None, **extra):
        args = spread_multi_values(list(sys.argv[1:] if args is None else args))
        extra.setdefault("obj", {"argv": list(args)})
        return super().main(args=args, prog_name=prog_name or "loramerge", **extra)


def command_line(ctx: typer.Context) -> str:
    """The command as the user ran it (after spreading), for provenance and model cards."""
    root = ctx.find_root()
    argv = root.obj.get("argv") if isinstance(root.obj, dict) else sys.argv[1:]
    return shlex.join(["loramerge", *argv])


def one_line(text: str) -> str:
    return " ".join(str(text).splitlines()).strip()


def fail(message: str, code: int = 1) -> typer.Exit:
    sys.stderr.write(one_line(message) + "\n")
    sys.stderr.flush()
    return typer.Exit(code)


def command_errors(function):
    """Error policy of every command: one line on stderr, exit 1 (130 after Ctrl-C); --debug adds
    the traceback. Usage errors (typer.BadParameter, exit 2) pass through."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        from loramerge_cli import interrupts

        debug = bool(kwargs.get("debug"))
        interrupts.install()
        try:
            result = function(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except KeyboardInterrupt:
            raise fail(interrupts.message(), 130) from None
        except Exception as error:  # noqa: BLE001 - the last line of defence: no traceback without --debug
            if interrupts.interrupted():  # a Ctrl-C a library turned into another error: not a data problem
                raise fail(interrupts.message(), 130) from None
            if debug:
                traceback.print_exc()
            if isinstance(error, LoramergeError):
                raise fail(f"error: {error}") from None
            raise fail(f"internal error: {type(error).__name__}: {error} (rerun with --debug)") from None
        if interrupts.interrupted():  # swallowed by a library, and the work finished anyway
            raise fail(interrupts.message(), 130)
        return result

    return wrapper


def human_console(quiet: bool = False, json_output: bool = False, stdout: bool = False):
    """Rich console for people, on stderr unless it is the command's product; silent under --quiet or --json."""
    from rich.console import Console

    return Console(stderr=not stdout, quiet=quiet or json_output)


def emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def load_config_defaults(ctx: typer.Context, param: typer.CallbackParam, value):
    """--config callback (eager): the YAML's values become the command's defaults (Click's default_map)."""
    if not value or ctx.resilient_parsing:
        return value
    import yaml

    try:
        data = yaml.safe_load(Path(value).read_text())
    except OSError as error:
        raise typer.BadParameter(f"cannot read {value}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise typer.BadParameter(f"{value} is not valid YAML ({one_line(error)})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{value} must map flag names to values")
    by_flag = {opt[2:]: option for option in ctx.command.params for opt in option.opts if opt.startswith("--")}
    defaults = {}
    for key, item in data.items():
        flag = str(key).replace("_", "-")
        option = by_flag.get(flag)
        if option is None or option.name in ("config", "help"):
            raise typer.BadParameter(f"{value}: unknown key {key!r} (keys are this command's flag names)")
        if getattr(option, "multiple", False):
            item = [str(v) for v in item] if isinstance(item, list) else [str(item)]
        elif isinstance(item, list):
            item = ",".join(str(v) for v in item)
        defaults[option.name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def parse_float_list(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise LoramergeError(f"{flag}: expected numbers separated by commas, got {text!r}") from None


def examples_epilog(*lines: str) -> str:
    """The worked examples every command's help ends with."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)  # \b: click keeps the lines
