"""The command-line interface. `main` is the console script: it records Ctrl-C before importing anything
heavy, so an interrupt at any moment, even during the first imports, is one line and exit 130."""


def main() -> None:
    import sys

    from loramerge_cli import interrupts

    interrupts.install()
    try:
        from loramerge_cli.cli.app import app

        app()
    except KeyboardInterrupt:
        sys.stderr.write(interrupts.message() + "\n")
        raise SystemExit(130) from None
    except SystemExit as exit:
        if exit.code == 130 and not interrupts.reported():  # click ended it while parsing, without a word
            sys.stderr.write(interrupts.message() + "\n")
        raise
