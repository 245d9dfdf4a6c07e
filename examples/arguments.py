"""argparse types shared by the example and benchmark scripts: a bad value is argparse's usage line and exit 2,
before any model loads (a traceback after a minute of λ tuning was the alternative)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

LARGEST = 2**32 - 1  # the largest seed numpy (so CMA-ES) takes; no count the scripts take is larger


def at_least(low: float, kind=int):
    """A finite number of `kind` that is >= `low` (`--threads 0` would fail in torch, `--popsize 0` in the
    library)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        if not math.isfinite(value) or not low <= value <= LARGEST:
            raise argparse.ArgumentTypeError(f"must be from {low:g} to {LARGEST} (got {text})")
        return value

    return parse


def fraction(text: str) -> float:
    """A number in (0, 1] (`--max-prune`: 0 would prune nothing)."""
    value = at_least(0, float)(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (got {text})")
    return value


def integer_list(text: str) -> str:
    """Comma-separated whole numbers >= 1 (`--seeds 1,2,3`), as given (the scripts split it themselves)."""
    for item in text.split(","):
        at_least(1)(item)
    return text


def names_of(allowed, what: str = "name", single: bool = False):
    """Comma-separated names, each one of `allowed` (a string, as the scripts split it themselves; `single`: one
    name)."""
    allowed = tuple(allowed)

    def parse(text: str) -> str:
        if single and "," in text:
            raise argparse.ArgumentTypeError(f"one {what} (got {text})")
        unknown = [name for name in text.split(",") if name and name not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown[0]!r} (one of: {', '.join(allowed)})")
        return text

    return parse


def merger_list(text: str) -> str:
    """Comma-separated merger names of loramerge's registry (a preset or a method)."""
    from loramerge_cli.merging.registry import merger_names

    return names_of(merger_names(), "merger")(text)


def merger_name(text: str) -> str:
    """One merger name of loramerge's registry."""
    from loramerge_cli.merging.registry import merger_names

    return names_of(merger_names(), "merger", single=True)(text)


def lambda_map(text: str) -> dict[str, float]:
    """`merger=λ,…` (empty: none)."""
    lambdas = {}
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{item!r}: expected merger=λ")
        merger_name(name)
        if name in lambdas:
            raise argparse.ArgumentTypeError(f"{name}: given twice")
        lambdas[name] = at_least(0.0, float)(value)
    return lambdas


def output_file(text: str) -> Path:
    """A file a script writes when it ends (`--json`): its folder must exist now, not after the run."""
    path = Path(text).expanduser()
    if text.endswith("/") or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} names a folder: give a file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"no folder {path.parent} to write {path.name} in")
    return path


PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff", ".webp")


def plot_file(text: str) -> Path:
    """An image file a script draws (`--plot`): an existing folder, and a suffix matplotlib writes."""
    path = output_file(text)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{path.name}: give a file ending in {', '.join(PLOT_SUFFIXES)}")
    return path


def run_script(main) -> None:
    """A script's entry point, under loramerge's error policy: Ctrl-C is one line and exit 130 (no traceback), a
    refusal of loramerge's one line and exit 2 (usage) or 1."""
    from loramerge_cli.errors import LoramergeError, UsageError

    try:
        result = main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except LoramergeError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    if isinstance(result, int):
        raise SystemExit(result)
