"""What every subcommand shares: the error policy, output streams, --config files, argv spreading.

Nothing here imports torch: `loramerge --help` must answer in well under a second.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import functools
import json
import logging
import math
import os
import re
import shlex
import sys
import traceback
from pathlib import Path

import typer
from typer.core import TyperGroup

from loramerge_cli.adapters.sources import BASE_ID
from loramerge_cli.errors import LoramergeError, UsageError, WorkerLost, brief

MULTI_VALUE_OPTIONS = ("--adapters", "--merged")  # take several values after one flag

# Help texts of the options several commands share.
ADAPTERS_HELP = "Adapters in task order: folders, .safetensors files or Hub ids, each optionally name=source."
ALLOW_PICKLE_HELP = "DANGEROUS: also read pickle (.bin) weights; unpickling a file can run code."
ALLOW_BASE_MISMATCH_HELP = "DANGEROUS: merge adapters whose configs name different base models."
JSON_HELP = ("Machine-readable output on stdout, and nothing else printed: no tables, progress or notes (warnings "
             "are in the JSON; errors still go to stderr).")
QUIET_HELP = ("No progress, notes, warnings or summary on stderr (errors are still printed; warnings stay in "
              "--json and in an output's loramerge.json).")
THREADS_HELP = "Torch CPU threads. [default: OMP_NUM_THREADS if set, else torch's]"
DEBUG_HELP = "Show the full traceback of errors."
CONFIG_HELP = ("YAML recipe: flag names to values, `adapters` as a map of task name to path (or to path, weight, "
               "density); paths relative to the file; flags on the command line win. Every output's "
               "loramerge.yaml is one (another command's settings in it are noted and not used).")


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


# Metavars that say what to give (Typer's defaults read `<list[str]>`, `<path>`, `<str>`).
METAVARS = {"adapters": "ADAPTER...", "merged": "ADAPTER...", "out": "PATH", "tasks": "TASKS.yaml",
            "mask": "MASK.json", "config": "RECIPE.yaml", "lam": "λ|auto", "weights": "W1,W2,...",
            "indices": "[I,...]",
            "devices": "DEVICE,...", "target_blocks": "BLOCKS", "target_modules": "MODULES", "run_dir": "DIR",
            "plot": "DIR", "base": "MODEL", "head": "TASK"}


def readable_metavars(command) -> None:
    """Give every option without a metavar one from METAVARS, else from its type: N, X, a|b, or its name."""
    import typing

    for param in getattr(command, "params", ()):
        if getattr(param, "param_type_name", None) == "argument" and param.metavar:
            param.display_type_rich = lambda ctx: None  # the metavar says it all; no `<list[str]>` after it
        if getattr(param, "param_type_name", None) != "option" or param.metavar or getattr(param, "is_flag", False):
            continue
        annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1 and typing.get_origin(annotation) is not typing.Literal:
            annotation = args[0]
        if param.name in METAVARS:
            param.metavar = METAVARS[param.name]
        elif typing.get_origin(annotation) is typing.Literal:
            param.metavar = "|".join(str(choice) for choice in typing.get_args(annotation))
        elif annotation is int:
            param.metavar = "N"
        elif annotation is float:
            param.metavar = "X"
        elif annotation is not None:
            param.metavar = param.name.upper()


HELP_FLAGS = {"-h", "--help"}


class LoramergeGroup(TyperGroup):
    """The top-level group: spreads multi-value options, remembers the command line, readable metavars."""

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        readable_metavars(command)
        return command

    def main(self, args=None, prog_name=None, **extra):
        args = spread_multi_values(list(sys.argv[1:] if args is None else args))
        extra.setdefault("obj", {"argv": list(args)})
        if _unproxied(sys.stdout) is None and HELP_FLAGS & set(args[: args.index("--") if "--" in args else None]):
            StandardError().write("error: cannot write to standard output: it is closed\n")  # rich drops the help
            sys.exit(1)
        return super().main(args=args, prog_name=prog_name or "loramerge", **extra)

    def make_context(self, info_name, args, parent=None, **extra):
        with usage_errors_in_one_line(), stdout_failures():  # the group's own options (its help), a bad command
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx):
        def command():  # an error Click raises without its context (a missing value) is the subcommand's
            return " ".join(filter(None, (ctx.command_path, ctx.invoked_subcommand)))

        # A command's options are parsed here, its help printed; its body turns every error into one line.
        with usage_errors_in_one_line(command), stdout_failures():
            return super().invoke(ctx)


@contextlib.contextmanager
def usage_errors_in_one_line(command=lambda: "loramerge"):
    """Click's usage errors (unknown option, bad choice, missing value) as one line and exit 2, like ours."""
    try:  # Typer >= 0.24 carries its own Click
        from typer._click import exceptions as click_exceptions
    except ImportError:
        from click import exceptions as click_exceptions

    try:
        yield
    except getattr(click_exceptions, "NoArgsIsHelpError", ()):  # `loramerge` alone: the help, as Click prints it
        raise
    except click_exceptions.UsageError as error:
        message = error.format_message().replace("Value error, ", "")
        path = error.ctx.command_path if error.ctx is not None else command()
        raise fail(f"error: {message} (see '{path} -h')", 2) from None


def path_value(value) -> Path:
    """A path option's value, `~` expanded (given quoted, or from a recipe: the check and the write must see one
    path). An empty one (`--out "$OUT"` with OUT unset) is a usage error, not the working folder, and so is a
    recipe's value that YAML did not read as text (`out: 2024-01-01` is a date)."""
    return Path(_expanded(_text(value, "path")))


def file_path_value(value) -> Path:
    """A path option that names a file: as `path_value`, and a trailing slash (a folder, which Path would drop)
    is a usage error."""
    text = _text(value, "path")
    if text.endswith(("/", os.sep)):
        raise typer.BadParameter(f"{text} names a folder: give a file")
    return path_value(text)


def source_value(value) -> str:
    """A base model source (a path or a Hub id), `~` expanded; empty is a usage error, not the working folder. A
    local folder is made absolute: it is written into adapter configs, which load from anywhere."""
    source = _expanded(_text(value, "source"))
    if os.path.isdir(source):
        return os.path.abspath(source)
    if "@" in source and not os.path.exists(source) and not BASE_ID.match(source.removeprefix("hf://")):
        raise typer.BadParameter(f"{source}: a base model is a folder or a Hub id (org/name[@revision])")
    return source


def adapter_source_value(value) -> str:
    """An adapter source, `name=source` or a source (`~` is the loader's to expand); `name=` alone (`a=$UNSET`)
    is empty too."""
    from loramerge_cli.adapters.sources import NAME

    text = _text(value, "source")
    name, sep, rest = text.partition("=")
    if sep and NAME.match(name) and not rest.strip() and not os.path.exists(text):
        raise typer.BadParameter(f"the source is empty (after {name}=)")
    return text


def _text(value, what: str) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise typer.BadParameter(f"{value!r} is not a {what} (quote it in the recipe)")
    text = str(value)
    if not text.strip():
        raise typer.BadParameter(f"the {what} is empty")
    if "\x00" in text:
        raise typer.BadParameter(f"the {what} holds a NUL character")
    return text


def _expanded(text: str) -> str:
    if not text.startswith("~"):
        return text
    try:
        return str(Path(text).expanduser())
    except RuntimeError:  # ~user of no such user, or no home at all
        raise typer.BadParameter(f"{text}: cannot expand {text.split('/', 1)[0]} (no such user or home)") from None


def given_arguments(ctx: typer.Context) -> list[str]:
    """The command line's arguments as the user gave them (after spreading)."""
    root = ctx.find_root()
    return list(root.obj.get("argv", ())) if isinstance(root.obj, dict) else sys.argv[1:]


def command_line(ctx: typer.Context, local_paths: bool = False) -> str:
    """The command as the user ran it (after spreading), for provenance and model cards. With `local_paths`,
    every local path a path option or a source names is made absolute: an output folder's writer then names
    each relative to the folder (adapters/card.py portable_command), so the recorded command runs from there."""
    arguments = given_arguments(ctx)
    return shlex.join(["loramerge", *(_absolute_paths(ctx, arguments) if local_paths else arguments)])


def _absolute_paths(ctx: typer.Context, arguments: list[str]) -> list[str]:
    """`arguments` with the values of path options (--out, --mask, --tasks, …) absolute, and those of source
    options (--adapters, --base: a local path, name=path, or a Hub id) absolute where they name a local path."""
    from loramerge_cli.cli.recipe import SOURCE_KEYS, is_path

    options = {opt: option for option in ctx.command.params for opt in getattr(option, "opts", ())
               if opt.startswith("--")}

    def absolute(value: str, option) -> str:
        if option is None or os.path.isabs(value) or value == "-":  # `-`: standard input (--mask -)
            return value
        if option.name in SOURCE_KEYS:
            head, sep, tail = value.partition("=")
            if sep and tail and not os.path.exists(value) and os.path.exists(os.path.expanduser(tail)):
                return f"{head}={os.path.abspath(os.path.expanduser(tail))}"
            local = os.path.expanduser(value)
            return os.path.abspath(local) if os.path.exists(local) else value
        return os.path.abspath(os.path.expanduser(value)) if is_path(option) else value

    resolved, current = [], None
    for token in arguments:
        if token.startswith("--"):
            flag, sep, inline = token.partition("=")
            current = options.get(flag)
            resolved.append(f"{flag}={absolute(inline, current)}" if sep else token)
            if sep or getattr(current, "is_flag", False):
                current = None  # no values follow
            continue
        resolved.append(absolute(token, current))
    return resolved


def one_line(text: str) -> str:
    return " ".join(str(text).splitlines()).strip()


def fail(message: str, code: int = 1) -> typer.Exit:
    """Say `message` in one line on stderr (if stderr can be written: the exit code says it anyway)."""
    StandardError().write(one_line(message) + "\n")
    return typer.Exit(code)


def command_errors(function):
    """Error policy of every command: one line on stderr; exit 2 for usage errors (UsageError; Click's own
    pass through), 1 for data errors, 130 after Ctrl-C (143 after SIGTERM); --debug adds the traceback of data
    errors."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        from loramerge_cli import interrupts

        debug = bool(kwargs.get("debug"))
        if interrupts.reported():  # a command run in-process after one an interrupt ended: not its record
            interrupts.reset()
        interrupts.set_hint(None)  # a command run in-process after another: not the other's hint
        previous = interrupts.install()  # the caller's handlers come back afterwards (in-process runs)
        try:
            with logged_warnings(bool(kwargs.get("quiet")), bool(kwargs.get("json_output"))):
                return _run(function, args, kwargs, debug)
        finally:
            interrupts.restore(previous)

    return wrapper


_LOGGED_WARNINGS: list[list[str]] = []  # per running command (a stack: commands run in-process nest in tests)


class _WarningLines(logging.Handler):
    """The library's logged warnings (an old output that could not be removed, a lost Ray worker) as a command's
    other warnings: a `warning:` line on stderr but under --quiet or --json, and kept for the --json document."""

    def __init__(self, quiet: bool, json_output: bool):
        super().__init__(logging.WARNING)
        self.console = human_console(quiet, json_output)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = record.getMessage()
        except Exception:  # noqa: BLE001 - a badly formatted message must not end the command
            line = str(record.msg)
        self.lines.append(line)
        print_warnings(self.console, [line])


@contextlib.contextmanager
def logged_warnings(quiet: bool, json_output: bool):
    """While a command runs, the `loramerge_cli` loggers' warnings go to `_WarningLines` (which also keeps
    Python's last-resort handler from printing them bare)."""
    handler = _WarningLines(quiet, json_output)
    logger = logging.getLogger("loramerge_cli")
    logger.addHandler(handler)
    _LOGGED_WARNINGS.append(handler.lines)
    try:
        yield handler.lines
    finally:
        _LOGGED_WARNINGS.pop()
        logger.removeHandler(handler)


def _reads_false(value) -> bool:
    """A recipe's value that says no (`false`, `'false'`, `no`, `off`, `0`)."""
    return value is False or value == 0 or (isinstance(value, str) and value.strip().lower() in
                                              ("false", "no", "off", "n", "0", ""))


def _from_recipe(message: str, args: tuple, kwargs: dict) -> str:
    """Where a usage error starts by naming a flag that the user did not type but a --config recipe gave
    (`--density does not apply to method ta` after `--merger ta` over a della recipe): that the recipe gave it.
    The command's context is its `ctx` argument."""
    import re

    ctx = next((value for value in (*args, *kwargs.values())  # (typer's Context, or the click it vendors)
                if callable(getattr(value, "get_parameter_source", None))), None)
    flag = re.match(r"--[a-z][a-z-]*", message)
    if ctx is None or flag is None:
        return ""
    option = next((p for p in ctx.command.params if flag.group() in getattr(p, "opts", ())), None)
    if option is None or getattr(ctx.get_parameter_source(option.name), "name", "") != "DEFAULT_MAP":
        return ""
    return f" ({flag.group()} comes from the recipe {ctx.params.get('config')})"


# A full disk, a quota, a read-only or forbidden folder, a failing device: one line, not an internal error.
STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def _run(function, args, kwargs, debug: bool):
    """`function` under the error policy of `command_errors`."""
    from loramerge_cli import interrupts

    if sys.stdout is None:  # started with stdout closed (`>&-`): every command ends by printing its result there
        raise fail("error: cannot write to standard output: it is closed (redirect it to a file or /dev/null)")
    try:
        result = function(*args, **kwargs)
    except (typer.Exit, typer.Abort, typer.BadParameter):
        raise
    except UsageError as error:
        raise fail(f"error: {error}{_from_recipe(str(error), args, kwargs)}", 2) from None
    except KeyboardInterrupt:
        raise fail(interrupts.message(), interrupts.exit_code()) from None
    except Exception as error:  # noqa: BLE001 - the last line of defence: no traceback without --debug
        if interrupts.interrupted():  # a Ctrl-C a library turned into another error: not a data problem
            raise fail(interrupts.message(), interrupts.exit_code()) from None
        if debug:  # to stderr as it can be: never onto stdout (Python's fallback when stderr is closed)
            traceback.print_exc(file=StandardError())
        if isinstance(error, OSError) and error.errno in STORAGE_ERRORS:  # the machine's, not loramerge's
            resume = interrupts.resume_hint()
            where = f": {error.filename}" if error.filename else ""
            verb = "write" if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else "access"  # (a read too)
            raise fail(f"error: cannot {verb}{where} ({error.strerror})"
                       + (f"; the run dir keeps what was scored: {resume}" if resume else "")) from None
        resume = interrupts.resume_hint()
        kept = f"; the run dir keeps what was scored: {resume}" if resume else ""
        if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE):  # `ulimit -n`: the machine's
            raise fail(f"error: too many open files ({error.strerror}): raise the limit (ulimit -n) or use fewer "
                       f"--workers{kept}") from None
        if isinstance(error, MemoryError) or (isinstance(error, ImportError) and any(  # a library loaded late
                sign in str(error) for sign in ("failed to map segment", "Cannot allocate memory"))):  # under it
            # (`ulimit -v`, a cgroup, or too little memory: the machine's)
            raise fail(f"error: out of memory{f' ({error})' if str(error) else ''}: raise the memory limit (ulimit -v) "
                       f"or give the command more memory{kept}") from None
        if isinstance(error, LoramergeError):
            resume = interrupts.resume_hint() if isinstance(error, WorkerLost) else None
            raise fail(f"error: {error}" + (f"; the run dir keeps what was scored: {resume}" if resume else "")) \
                from None
        hint = "" if debug else " (rerun with --debug)"
        raise fail(f"internal error: {type(error).__name__}: {error}{hint}") from None
    if interrupts.interrupted():  # swallowed by a library, and the work finished anyway
        raise fail(interrupts.message(), interrupts.exit_code())
    return result


def human_console(quiet: bool = False, json_output: bool = False):
    """Rich console for people (notes, warnings) on stderr; silent under --quiet or --json."""
    from rich.console import Console

    return Console(file=StandardError(), quiet=quiet or json_output, markup=False)  # text as written: a path or
    # a name may hold brackets (`runs[exp1]/`), which markup would drop or fail on


def print_warnings(console, warnings) -> None:
    """Each warning on a line of its own, in yellow, as written (no markup: a path or a list may hold brackets)."""
    for warning in warnings:
        console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False, soft_wrap=True)


def apply_threads(threads: int | None) -> None:
    """--threads: torch's CPU thread count; without it OMP_NUM_THREADS (or torch's default) stands."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


@contextlib.contextmanager
def stdout_failures():
    """Failures to write stdout. A reader that went away (`| head`) ends the command quietly with 141, as a Unix
    tool killed by SIGPIPE; any other (a full disk) is one line and exit 1."""
    try:
        yield
    except BrokenPipeError:
        with contextlib.suppress(AttributeError, OSError, ValueError):  # no second error when Python flushes stdout
            os.dup2(os.open(os.devnull, os.O_WRONLY), _unproxied(sys.stdout).fileno())  # at exit
        raise typer.Exit(141) from None
    except OSError as error:
        if error.filename is not None:  # a file named (--install-completion's script in a read-only HOME)
            raise fail(f"error: {error.filename}: {error.strerror or error}") from None
        raise fail(f"error: cannot write to standard output: {error.strerror or error}") from None


def write_all(descriptor: int, data: bytes) -> None:
    """Every byte of `data` to the file descriptor: a short write goes on where it stopped (Python's own unbuffered
    stdout, PYTHONUNBUFFERED=1, drops the rest), and a non-blocking pipe that is full is waited on (it raised)."""
    import select

    view = memoryview(data)
    while view:
        try:
            view = view[os.write(descriptor, view):]
        except BlockingIOError:
            select.select([], [descriptor], [])


class StandardOutput:
    """sys.stdout for a command's product, its failures as `stdout_failures` says (a closed one, `>&-`: one line
    and exit 1)."""

    encoding = property(lambda self: getattr(sys.stdout, "encoding", None) or "utf-8")

    def write(self, text: str) -> int:
        with stdout_failures():
            stream = self._stream()
            encoding = getattr(stream, "encoding", None) or "utf-8"
            try:
                data = text.encode(encoding, getattr(stream, "errors", None) or "strict")
            except UnicodeEncodeError:  # an ASCII or Latin-1 stdout (PYTHONIOENCODING): what it cannot show is
                data = text.encode(encoding, "backslashreplace")  # escaped, as Python's stderr does
            try:  # (a codec that starts with a byte order mark is left to the stream: it writes the mark once)
                descriptor = stream.fileno() if os.name == "posix" and codecs.lookup(encoding).name not in (
                    "utf-8-sig", "utf-16", "utf-32") else None
            except (AttributeError, OSError, ValueError, LookupError):  # a stream in memory (a test's capture)
                descriptor = None
            if descriptor is None:
                stream.write(data.decode(encoding, "surrogateescape"))
            else:
                stream.flush()  # what went through sys.stdout before comes first
                write_all(descriptor, data)
            return len(text)

    def flush(self) -> None:
        with stdout_failures():
            self._stream().flush()

    def isatty(self) -> bool:
        stream = _unproxied(sys.stdout)
        return stream is not None and stream.isatty()

    def fileno(self) -> int:
        return self._stream().fileno()

    @staticmethod
    def _stream():
        stream = _unproxied(sys.stdout)
        if stream is None:
            raise fail("error: cannot write to standard output: it is closed")
        return stream


def _unproxied(stream):
    """The real stream behind rich's live display, which stands in for sys.stdout and sys.stderr while it runs
    and prints what they receive into its console (which writes here: through the proxy, a loop)."""
    return getattr(stream, "rich_proxied_file", stream)


class StandardError:
    """sys.stderr for what people watch (progress, notes, warnings, the error line). A stderr that cannot be
    written (closed, full, its reader gone) is dropped from then on, and the work goes on: its outputs and
    exit code do not depend on being watched."""

    encoding = property(lambda self: getattr(sys.stderr, "encoding", None) or "utf-8")

    def __init__(self):
        self.lost = False

    def write(self, text: str) -> int:
        self._attempt(lambda stream: (stream.write(text), stream.flush()))
        return len(text)

    def flush(self) -> None:
        self._attempt(lambda stream: stream.flush())

    def isatty(self) -> bool:
        try:
            return _unproxied(sys.stderr).isatty()
        except (AttributeError, OSError, ValueError):
            return False

    def fileno(self) -> int:
        return _unproxied(sys.stderr).fileno()

    def _attempt(self, action) -> None:
        if self.lost:
            return
        try:
            action(_unproxied(sys.stderr))
        except (AttributeError, OSError, ValueError):  # None (closed at start), EPIPE, ENOSPC, closed file
            self.lost = True


def write_stdout(text: str) -> None:
    """Write `text` to stdout now (the failures as StandardOutput says)."""
    output = StandardOutput()
    output.write(text)
    output.flush()


def result_console():
    """Rich console for a command's result (its tables): stdout, also under --quiet; when stdout is a file or a
    pipe, text lines are not wrapped and tables are as wide as their contents (no name cut to `majority_k…`).
    No markup: paths and names in titles, cells and lines are printed as written."""
    from rich.console import Console

    output = StandardOutput()
    terminal = output.isatty()
    return Console(file=output, soft_wrap=not terminal, width=None if terminal else 1000, markup=False)


def emit_json(data: dict, kind: str | None = None) -> None:
    """A command's --json document on stdout; `kind` names its layout first, as "format":
    "loramerge.<kind>/v1" (docs/json.md: eval's report and search-mask's table carry their own)."""
    if kind is not None:
        data = {"format": f"loramerge.{kind}/v1", **data}
    logged = [line for line in (_LOGGED_WARNINGS[-1] if _LOGGED_WARNINGS else []) if line not in
              data.get("warnings", [])]
    if logged:  # what the library logged as the command ran (docs/json.md)
        data = {**data, "warnings": [*data.get("warnings", []), *logged]}
    write_stdout(json.dumps(data, indent=2, default=str) + "\n")


def load_config_defaults(ctx: typer.Context, param: typer.CallbackParam, value):
    """--config callback (eager): the YAML's values become the command's defaults (Click's default_map). With
    --help anywhere on the line, the help comes first, whatever the recipe holds."""
    if not value or ctx.resilient_parsing or any(name in given_arguments(ctx) for name in ctx.help_option_names):
        return value
    if sum(arg == "--config" or arg.startswith("--config=") for arg in given_arguments(ctx)) > 1:
        raise typer.BadParameter("given twice: a run reads one recipe")
    import yaml

    from loramerge_cli.atomic import TooLarge, read_small_file
    from loramerge_cli.cli.recipe import MAX_BYTES, expand_config
    from loramerge_cli.yaml_documents import load_yaml, yaml_problem

    try:
        data = load_yaml(read_small_file(value, MAX_BYTES).decode("utf-8"))
    except TooLarge as error:
        raise fail(f"error: --config {value} is {error}: not a recipe") from None
    except OSError as error:  # a file that cannot be read is bad input (exit 1), as a missing --tasks or --mask
        raise fail(f"error: --config {value}: cannot read it ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise fail(f"error: --config {value} is not UTF-8 text (byte {error.start})") from None
    except (yaml.YAMLError, RecursionError) as error:
        where = (yaml_problem(error) if isinstance(error, yaml.YAMLError) else "") or \
            f" ({one_line(error) or 'nested too deep'})"
        raise fail(f"error: --config {value} is not valid YAML{where}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{value} must map flag names to values")
    data = expand_config(data, Path(value), ctx.command, ctx.meta)
    by_flag = {_recipe_key(option): option for option in ctx.command.params if _recipe_key(option)}
    spelled = {opt[2:]: _recipe_key(option) for option in ctx.command.params for opt in getattr(option, "opts", ())
               if opt.startswith("--") and opt[2:] != _recipe_key(option)}  # eval's dtype: eval-dtype
    defaults, ignored, others = {}, [], _other_commands_flags(ctx)
    spellings: dict[str, str] = {}
    for key, item in data.items():
        flag = str(key).replace("_", "-")
        if flag in spellings:  # drop-rate and drop_rate: one setting given twice (the last would win)
            raise typer.BadParameter(f"{value}: {spellings[flag]!r} and {key!r} are one setting, given twice")
        spellings[flag] = str(key)
        option = by_flag.get(flag)
        if option is None and flag in spelled:
            ignored.append(f"{flag} (a merge's written dtype; this command reads {spelled[flag]})"
                           if flag == "dtype" else f"{flag} (write {spelled[flag]})")
            continue
        if option is None and flag in others:  # another command's recipe: what applies here
            ignored.append(flag)
            continue
        if option is None or option.name in ("config", "help"):
            raise typer.BadParameter(f"{value}: unknown key {brief(key)} (keys are the flag names of loramerge's "
                                     "commands)")
        if item is None or (option.name == "force" and item is False):  # `key: null`: not given
            continue
        # (YAML aliases nest lists without bound: the text of one 500-byte recipe's would take gigabytes)
        if isinstance(item, dict) or (isinstance(item, list) and any(isinstance(v, (list, dict)) for v in item)):
            raise typer.BadParameter(f"{value}: {key}: a nested list or a mapping is no value for --{flag} (a value, "
                                     "or a list of values)")
        if option.name == "force":  # replacing an output is asked for where it is done, not kept in a file
            raise typer.BadParameter(f"{value}: force is given on the command line only (--force), never in a "
                                     "recipe")
        if option.name == "allow_pickle" and not _reads_false(item):  # a file handed around must not turn it on
            raise typer.BadParameter(f"{value}: allow-pickle is given on the command line only (--allow-pickle, "
                                     "for files you trust: unpickling can run code), never in a recipe: delete it "
                                     "there")
        if option.name == "allow_pickle":
            continue
        if isinstance(item, bool) and not getattr(option, "is_flag", False):  # Python's True would pass for 1
            raise typer.BadParameter(f"{value}: {key}: YAML reads this as {str(item).lower()} (yes, no, on, off "
                                     f"too), which is no value for --{flag}: quote it if it is a name")
        if getattr(option, "multiple", False):
            item = [str(v) for v in item] if isinstance(item, list) else [str(item)]
        elif isinstance(item, list) and option.name == "indices":  # --indices takes a JSON list
            item = json.dumps(item)
        elif isinstance(item, list):
            item = ",".join(str(v) for v in item)
        defaults[option.name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    arguments = given_arguments(ctx)
    if ignored and not {"--quiet", "-q", "--json"} & set(arguments):
        human_console().print(f"note: --config {value}: {ctx.info_name} does not use {', '.join(ignored)} (another "
                              "command's settings)", markup=False, highlight=False, soft_wrap=True)
    return value


def _recipe_key(option) -> str | None:
    """An option's key in a recipe: its first long flag without dashes (another spelling, such as eval's
    --dtype beside --eval-dtype, is the command line's only: in a recipe `dtype` is what merge writes)."""
    return next((opt[2:] for opt in getattr(option, "opts", ()) if opt.startswith("--")), None)


def _other_commands_flags(ctx: typer.Context) -> set[str]:
    """The recipe keys of loramerge's other commands: a recipe another command wrote holds some."""
    group = ctx.parent.command if ctx.parent is not None else None
    commands = getattr(group, "commands", {}).values()
    return {key for command in commands if command is not ctx.command for option in command.params
            if (key := _recipe_key(option))}


DECIMAL_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def decimal_number(text: str) -> float:
    """A number as people write it (`0.5`, `-2`, `1e-3`): ValueError for what Python's float() also reads but no
    one means as a number here (`1_0` is 10, `٣` is 3, `nan`, `inf`)."""
    if not DECIMAL_NUMBER.fullmatch(text.strip()):
        raise ValueError(text)
    return float(text)


def parse_float_list(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [decimal_number(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag}: expected finite numbers separated by commas, got {text!r}") from None


def parse_lambda(text: str | None) -> float | str | None:
    """--lambda: a finite number, 'auto', or None (not given)."""
    if text is None or text == "auto":
        return text
    try:
        value = decimal_number(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise UsageError(f"--lambda: expected a finite number or 'auto', got {text!r}")
    return value


def parse_names(text: str | None, flag: str) -> list[str] | None:
    """A comma-separated flag value as a list (None when not given)."""
    if text is None:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise UsageError(f"{flag}: give at least one name")
    return names


def examples_epilog(*lines: str) -> str:
    """The worked examples every command's help ends with."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)  # \b: click keeps the lines
