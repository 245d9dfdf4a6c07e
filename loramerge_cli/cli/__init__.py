"""The command-line interface. `main` is the console script: it records Ctrl-C (and SIGTERM) before importing
anything heavy, so an interrupt at any moment, even during the first imports, is one line and exit 130 (143)."""


def main() -> None:
    import sys

    from loramerge_cli import interrupts

    interrupts.install()
    try:
        from loramerge_cli.cli.app import app

        app()
    except KeyboardInterrupt:
        _exit_interrupted()
    except SystemExit as exit:
        if exit.code in (130, 143):
            _exit_interrupted()
        _finish()
        raise
    _finish()
    sys.exit(0)


def _finish() -> None:
    """The command is done and has said so: a signal from now on (while Python and torch shut down) ends the
    process as it would any program, not with a traceback from an exit handler and exit 0."""
    import signal
    import sys

    from loramerge_cli import interrupts

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    interrupts.restore(dict.fromkeys(interrupts.SIGNALS, signal.SIG_DFL))


def _exit_interrupted() -> None:
    """Say so (unless the command did), then exit 130 (SIGTERM: 143) at once: CPython turns an interrupt that
    passed through some C-level code paths into death by SIGINT at shutdown, whatever the exit code asked for."""
    import atexit
    import os
    import signal
    import sys

    from loramerge_cli import interrupts

    for number in interrupts.SIGNALS:  # leaving anyway: a second Ctrl-C must not cut the cleanup short
        signal.signal(number, signal.SIG_IGN)
    if not interrupts.reported():  # click ends an interrupt during parsing with 130 and no word
        try:
            sys.stderr.write(interrupts.message() + "\n")
        except (AttributeError, OSError, ValueError):  # stderr closed or gone: the exit code says it
            pass
    try:
        atexit._run_exitfuncs()  # multiprocessing's cleanup: workers, queues' semaphores
    except BaseException:  # noqa: BLE001 - exiting anyway
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # None: closed when Python started
            pass
    os._exit(interrupts.exit_code())
