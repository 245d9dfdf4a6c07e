"""Ctrl-C (SIGINT), SIGTERM (`timeout`, a CI job cancelled, `docker stop`) and SIGHUP (a closed terminal or ssh
session), told apart from everything else. A signal the parent process ignores (SIGHUP under `nohup`, SIGINT for
a script's background job) stays ignored.

The CLI's handler records that a signal arrived before raising KeyboardInterrupt. Libraries sometimes turn
that KeyboardInterrupt into another error (safetensors reports a "corrupt" file) or swallow it (a bare
`except` during an import); the record lets the CLI still answer "interrupted" with exit 130 (SIGTERM:
"terminated", 143; SIGHUP: "hung up", 129), and lets writers refuse to commit an output after it (`check`).
Cleanup runs `shielded`: a second Ctrl-C cannot cut it short.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM, *((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()))
WORDS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated",
         **({signal.SIGHUP: "hung up"} if hasattr(signal, "SIGHUP") else {})}
_state = {"interrupted": False, "hint": None, "resumable": False, "reported": False, "signal": signal.SIGINT,
          "shielded": 0}


def record(signum: int) -> None:
    """Note that a signal arrived (the first one decides the exit code), where a library's handler caught it."""
    if not _state["interrupted"]:
        _state.update(interrupted=True, signal=signum)


def _handler(signum, frame) -> None:
    record(signum)
    if _state["shielded"]:  # (Python runs handlers in the main thread, whichever thread the signal reached)
        return
    importing = _native_imports(frame)
    if importing:  # raised now, the process would abort: raised again once the import is over
        threading.Thread(target=_deliver_after, args=(importing, signum), daemon=True).start()
        return
    raise KeyboardInterrupt


# Packages whose import runs C++ that calls back into Python: a KeyboardInterrupt raised in such a callback
# cannot pass through the C++ (pybind11) and ends the process with "terminate called", SIGABRT (torch's
# autograd registration, about 1 s into a command).
NATIVE_PACKAGES = frozenset({"torch"})


def _native_imports(frame) -> list:
    """The module specs of NATIVE_PACKAGES whose import is running in `frame` or its callers."""
    specs = []
    while frame is not None:
        spec = frame.f_globals.get("__spec__")
        if getattr(spec, "_initializing", False) and spec.name.partition(".")[0] in NATIVE_PACKAGES:
            specs.append(spec)
        frame = frame.f_back
    return specs


def _deliver_after(specs: list, signum: int) -> None:
    """Send the signal again once none of `specs` is being imported any more."""
    import os
    import time

    while any(getattr(spec, "_initializing", False) for spec in specs):
        time.sleep(0.01)
    os.kill(os.getpid(), signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def handled() -> tuple[int, ...]:
    """The signals loramerge answers: those of SIGNALS its parent did not set to be ignored (`nohup` ignores
    SIGHUP; a non-interactive shell starts a background job with SIGINT ignored, so that Ctrl-C is not its)."""
    return tuple(number for number in SIGNALS if signal.getsignal(number) is not signal.SIG_IGN)


def install() -> dict:
    """Record interrupts from now on (main thread only; elsewhere a no-op); returns the handlers it replaced."""
    previous = {}
    if _main_thread():
        for number in handled():
            previous[number] = signal.signal(number, _handler)
    return previous


def restore(previous: dict) -> None:
    """Put back the handlers `install` replaced (a command run in-process leaves its caller's in place)."""
    if _main_thread():
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)


@contextmanager
def handlers_kept():
    """The SIGINT and SIGTERM handlers in place before the block are put back after it (a library that installs
    its own, as ray.init does for SIGTERM, would end the process without the one line and 143)."""
    before = {number: signal.getsignal(number) for number in SIGNALS} if _main_thread() else {}
    try:
        yield
    finally:
        for number, handler in before.items():  # (always set: a C extension may have changed the OS-level
            if handler is not None:  # handler behind Python's back, which getsignal would not show)
                signal.signal(number, handler)


@contextmanager
def shielded():
    """While the block runs (removing a half-written output, on the way out of a failure or an interrupt), a
    SIGINT or SIGTERM is recorded, not raised: the way out goes on, and still ends as an interrupt."""
    _state["shielded"] += 1
    try:
        yield
    finally:
        _state["shielded"] -= 1


def exit_code() -> int:
    """128 + the signal's number, as a shell reports a process it killed: 130 for Ctrl-C, 143 for SIGTERM, 129
    for SIGHUP."""
    return 128 + int(_state["signal"])


def interrupted() -> bool:
    return _state["interrupted"]


def check() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C arrived, even one a library swallowed; not once it was reported (the
    command it ended is over: a library call after it, in the same process, starts afresh)."""
    if _state["interrupted"] and not _state["reported"]:
        raise KeyboardInterrupt


def reset() -> None:
    _state.update(interrupted=False, hint=None, resumable=False, reported=False, signal=signal.SIGINT, shielded=0)


def reported() -> bool:
    return _state["reported"]


def set_hint(text: str | None, resumable: bool = False) -> None:
    """What the 'interrupted' message adds: what was written, or (`resumable`) how to resume the work."""
    _state.update(hint=text, resumable=resumable)


def hint() -> str | None:
    """What the 'interrupted' message would add now."""
    return _state["hint"]


def resume_hint() -> str | None:
    """The hint when it says how to resume (a search with a run directory), else None."""
    return _state["hint"] if _state["resumable"] else None


def message() -> str:
    """The one line an interrupt is reported with (and the record that it was)."""
    _state["reported"] = True
    hint = _state["hint"]
    word = WORDS.get(_state["signal"], "interrupted")
    return f"{word}; {hint}" if hint else f"{word}; nothing was written"
