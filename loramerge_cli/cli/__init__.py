"""The command-line interface. `main` is the console script: it records Ctrl-C (and SIGTERM, SIGHUP) before
importing anything heavy, so an interrupt at any moment, even during the first imports or while the process ends,
is one line and exit 130 (143, 129)."""


def main() -> None:
    import os
    import signal
    import sys

    hangup = (signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()
    for number in (signal.SIGINT, signal.SIGTERM, *hangup):  # until the handler below is in place (its imports:
        if signal.getsignal(number) is not signal.SIG_IGN:  # ms); one the parent ignores (nohup) stays ignored
            signal.signal(number, _exit_before_work)
    from loramerge_cli import interrupts

    interrupts.install()
    sys.unraisablehook = _quiet_interrupted_finalizers(sys.unraisablehook)
    code = 0
    try:
        os.getcwd()
    except FileNotFoundError:  # removed under the shell: torch's own import would die on it with exit 2
        sys.stderr.write("error: the working folder no longer exists: cd to one that does\n")
        raise SystemExit(1) from None
    try:
        from loramerge_cli.cli.app import app

        app()
    except KeyboardInterrupt:
        _exit_interrupted()
    except SystemExit as exit:
        if exit.code in {128 + number for number in interrupts.SIGNALS}:  # (an interrupt click reported)
            _exit_interrupted()
        code = exit.code
    except Exception:  # the interrupt turned into another error where nothing catches it for the command (a
        if interrupts.interrupted():  # dataclass built while an option is parsed: RuntimeError from __set_name__)
            _exit_interrupted()
        raise
    try:
        _finish(code)
    except KeyboardInterrupt:  # before _finish put its own handler in place
        _exit_interrupted()


def _quiet_interrupted_finalizers(default_hook):
    """sys.unraisablehook: the KeyboardInterrupt an interrupt raised inside a finalizer (`__del__`), which
    Python cannot propagate and prints as "Exception ignored in …", is left unprinted: the interrupt is recorded,
    and the command ends with its one line."""
    def hook(unraisable) -> None:
        from loramerge_cli import interrupts

        if isinstance(unraisable.exc_value, KeyboardInterrupt) and interrupts.interrupted():
            return
        default_hook(unraisable)

    return hook


_LATE_SIGNAL: list[int] = []  # a signal that arrived after the command finished, while the process ends


def _finish(code) -> None:
    """The command is done and has said so. It ends without Python's finalization, during which CPython puts
    the default handlers back (a Ctrl-C there killed the process by the signal, without an exit code), after
    doing what that finalization does for loramerge: threads joined, exit functions run (Ray's shutdown, the
    workers' cleanup), streams flushed. A signal meanwhile lets them finish and makes the exit code 130 (143); a
    second one ends the process at once. `code`: SystemExit's (None: 0; a message: printed, 1)."""
    from loramerge_cli import interrupts

    interrupts.restore(dict.fromkeys(interrupts.handled(), _late_signal))
    if isinstance(code, str):
        _write_error(code)
    _flush()
    _leave(0 if code is None else code if isinstance(code, int) else 1, join_threads=True)


def _late_signal(number, frame) -> None:
    """After the command finished: the first signal is noted (the exit code says it), a second one exits now."""
    if _LATE_SIGNAL:
        _exit_at_once(number, frame)
    _LATE_SIGNAL.append(number)


def _leave(code: int, join_threads: bool = False) -> None:
    """Exit with `code`: non-daemon threads joined (`join_threads`: as Python does; not on an interrupt), exit
    functions run (multiprocessing's cleanup: workers, queues' semaphores; Ray's shutdown), streams flushed,
    then os._exit."""
    import atexit
    import os
    import sys
    import threading

    for thread in threading.enumerate() if join_threads else ():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    if not join_threads and "multiprocessing" in sys.modules:  # an interrupt: no worker left for an exit function
        for child in sys.modules["multiprocessing"].active_children():  # to wait on (workers ignore SIGTERM)
            child.kill()
    try:
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 - exiting anyway
        pass
    if _LATE_SIGNAL:  # the exit code says the signal: one line says the command had ended (its output is whole)
        from loramerge_cli.interrupts import WORDS

        _write_error(f"{WORDS.get(_LATE_SIGNAL[0], 'stopped')} as it exited: the command had finished (see above)")
    _flush()
    os._exit(128 + _LATE_SIGNAL[0] if _LATE_SIGNAL else code)


def _flush() -> None:
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # None: closed when Python started
            pass


def _write_error(text: str) -> None:
    import sys

    try:
        sys.stderr.write(text + "\n")
    except (AttributeError, OSError, ValueError):  # stderr closed or gone: the exit code says it
        pass


def _exit_at_once(number, frame) -> None:
    """Exit 128 + the signal's number now, saying nothing more (the command has reported)."""
    import os

    _flush()
    os._exit(128 + number)


def _exit_before_work(number, frame) -> None:
    """An interrupt before loramerge's own handler is installed: one line, and 130 (143)."""
    import os
    import signal

    word = {signal.SIGTERM: b"terminated", getattr(signal, "SIGHUP", None): b"hung up"}.get(number, b"interrupted")
    try:  # (no import of loramerge's here: the signal may have come in the middle of one)
        os.write(2, word + b"; nothing was written\n")
    except OSError:  # stderr closed, or a terminal that hung up: the exit code says it
        pass
    os._exit(128 + number)


def _exit_interrupted() -> None:
    """Say so (unless the command did), then exit 130 (SIGTERM: 143) at once: CPython turns an interrupt that
    passed through some C-level code paths into death by SIGINT at shutdown, whatever the exit code asked for."""
    import signal

    from loramerge_cli import interrupts

    for number in interrupts.handled():  # leaving anyway: a second Ctrl-C must not cut the cleanup short
        signal.signal(number, signal.SIG_IGN)
    if not interrupts.reported():  # click ends an interrupt during parsing with 130 and no word
        _write_error(interrupts.message())
    _leave(interrupts.exit_code())
