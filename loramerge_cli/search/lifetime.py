"""Worker processes live no longer than their parent, and leave Ctrl-C to it.

A worker asks the kernel to kill it when its parent dies (Linux PR_SET_PDEATHSIG), and also watches its
parent's pid from a thread (every system), so a parent killed with SIGKILL leaves no worker holding memory
and its caller's pipes. SIGINT (Ctrl-C reaches the whole process group), SIGTERM (a job cancelled, sent to
the group) and SIGHUP (a closed terminal) are ignored by workers: the parent alone handles them and ends them,
so the interrupt is never reported as a worker failure.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from contextlib import contextmanager

from loramerge_cli.interrupts import SIGNALS

PR_SET_PDEATHSIG = 1
POLL_SECONDS = 0.5


@contextmanager
def signals_blocked():
    """Block SIGINT, SIGTERM and SIGHUP while starting workers: a spawned child inherits the blocked mask through
    exec, so it cannot die of one before `become_worker` ignores it; the parent gets the pending signal afterwards."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(SIGNALS))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def become_worker(parent_pid: int) -> None:
    """Call first thing in a worker: ignore SIGINT, SIGTERM and SIGHUP, die with the parent."""
    for number in SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(SIGNALS))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the watchdog thread alone
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(target=_watch, args=(parent_pid,), name="parent-watchdog", daemon=True).start()


def _watch(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(POLL_SECONDS)
