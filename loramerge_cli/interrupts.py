"""Ctrl-C, told apart from everything else.

The CLI's SIGINT handler records that an interrupt arrived before raising KeyboardInterrupt. Libraries
sometimes turn that KeyboardInterrupt into another error (safetensors reports a "corrupt" file) or swallow
it (a bare `except` during an import); the record lets the CLI still answer "interrupted" with exit 130,
and lets writers refuse to commit an output after it (`check`).
"""

from __future__ import annotations

import signal
import threading

_state = {"interrupted": False, "hint": None, "resumable": False, "reported": False}


def _handler(signum, frame) -> None:
    _state["interrupted"] = True
    raise KeyboardInterrupt


def install() -> None:
    """Record interrupts from now on (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)


def interrupted() -> bool:
    return _state["interrupted"]


def check() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C arrived, even one a library swallowed."""
    if _state["interrupted"]:
        raise KeyboardInterrupt


def reset() -> None:
    _state.update(interrupted=False, hint=None, resumable=False, reported=False)


def reported() -> bool:
    return _state["reported"]


def set_hint(text: str | None, resumable: bool = False) -> None:
    """What the 'interrupted' message adds: what was written, or (`resumable`) how to resume the work."""
    _state.update(hint=text, resumable=resumable)


def resume_hint() -> str | None:
    """The hint when it says how to resume (a search with a run directory), else None."""
    return _state["hint"] if _state["resumable"] else None


def message() -> str:
    """The one line an interrupt is reported with (and the record that it was)."""
    _state["reported"] = True
    hint = _state["hint"]
    return f"interrupted; {hint}" if hint else "interrupted; nothing was written"
