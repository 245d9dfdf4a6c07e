"""Errors that reach the user as one line, never as a traceback: data errors exit 1, usage errors exit 2."""

import math


class LoramergeError(Exception):
    """A data error (exit 1): a refused adapter, a mask that does not fit, an unreadable file."""


class WorkerLost(LoramergeError):
    """A worker process or machine that died or stopped answering (exit 1): a run directory can go on."""


class NonFiniteError(LoramergeError):
    """A model whose weights or outputs hold NaN or Inf in the evaluation's dtype (exit 1): its scores mean nothing."""


class UsageError(LoramergeError):
    """A usage error (exit 2): a flag value or a combination of flags that cannot work, found before any work."""


def first_line(error: BaseException) -> str:
    """An exception's first non-blank line (its type's name when it has no text): how a library's error reaches
    the user inside one of loramerge's one-line messages."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def shell_words(words) -> str:
    """A command for a one-line message, each word quoted as a POSIX shell reads it; a word holding a newline or
    another control character in bash's $'…' quoting, which keeps the line one line and the word intact."""
    import os
    import shlex

    def quoted(word: str) -> str:
        if word.isprintable():
            return shlex.quote(word)
        return "$'" + "".join(  # a character not printable as it is: its bytes as the file system has them
            "\\" + char if char in "\\'" else char if char.isprintable() else
            "".join(f"\\x{byte:02x}" for byte in os.fsencode(char)) for char in word) + "'"

    return " ".join(quoted(str(word)) for word in words)


def brief(value) -> str:
    """repr() of a value for a one-line message, bounded: a few items per list, a few levels, long text cut (YAML
    aliases make a 500-byte recipe's value a list whose full repr takes gigabytes)."""
    import reprlib

    shortened = reprlib.Repr()
    shortened.maxlevel, shortened.maxlist, shortened.maxdict, shortened.maxstring, shortened.maxother = 2, 4, 4, 60, 60
    return shortened.repr(value)


def expect(value, kind, what: str) -> None:
    """A usage error unless `value` is a `kind` (a class or a tuple of them); `what` says what was expected."""
    if not isinstance(value, kind):
        raise UsageError(f"{what}, not {brief(value)}")


def expect_adapters(adapters, what: str) -> None:
    """A usage error unless `adapters` is a list (or tuple) of loaded adapters."""
    from loramerge_cli.adapters.model import Adapter

    if not isinstance(adapters, (list, tuple)) or not all(isinstance(adapter, Adapter) for adapter in adapters):
        raise UsageError(f"{what} takes loaded adapters (api.load_adapters), not {brief(adapters)}")


MAX_SEED = 2**32 - 1  # numpy's and so pycma's largest seed


def check_seed(seed: int | None, flag: str = "--seed") -> None:
    """The one seed rule, for every strategy and merge: an integer in 1 … 2^32 − 1 (pycma reads 0 as 'seed
    from the clock'; numpy, under CMA-ES, takes no larger one). A numpy integer is the integer it holds."""
    seed = plain_value(seed)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 1 <= seed <= MAX_SEED):
        raise UsageError(f"{flag} must be an integer from 1 to {MAX_SEED} (0 would mean a clock seed to CMA-ES)")


def is_finite_number(value) -> bool:
    """An int or float (not a bool) that is finite; an int too large for a float is not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def plain_value(value):
    """A numpy number as the Python number it holds (`np.float32(0.5)` is 0.5; lists and tuples item by item):
    settings a library caller computed with numpy are checked, compared and written to JSON as given by hand."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        import numbers

        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real):  # (np.longdouble's item() is a longdouble)
            return float(value)
        return value.item()  # np.bool_, a 0-d array
    if isinstance(value, (list, tuple)):
        return type(value)(plain_value(item) for item in value)
    return value


def plain_fields(settings) -> None:
    """Every field of a settings dataclass as plain_value gives it (in place)."""
    from dataclasses import fields

    for item in fields(settings):
        setattr(settings, item.name, plain_value(getattr(settings, item.name)))


def check_integer(value, low: int, flag: str, high: int | None = None) -> None:
    """`flag` must be an integer >= low (and <= high, if given; None: not given)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise UsageError(f"{flag} must be an integer >= {low} (got {value!r})")
    if value is not None and high is not None and value > high:
        raise UsageError(f"{flag} must be at most {high} (got {value})")


def check_at_least(value, low: float, flag: str) -> None:
    """`flag` must be a number >= low (None: not given)."""
    if value is not None and not value >= low:
        raise UsageError(f"{flag} must be >= {low:g} (got {value})")
