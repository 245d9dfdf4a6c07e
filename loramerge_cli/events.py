"""Progress events: how library code reports long work without printing.

A reporter is any callable `report(kind, data)`. A long loop is a *stage*: `stage_start` with its size,
one `stage_step` per item (with a short `info` text), then `stage_end`. The CLI draws them (a rich bar with
ETA on a terminal, plain lines otherwise); other callers pass nothing and get `silent`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

Reporter = Callable[[str, dict], None]


def silent(kind: str, data: dict) -> None:
    """The reporter that reports nothing."""


@contextmanager
def stage(report: Reporter | None, name: str, total: int | None) -> Iterator[Callable[..., None]]:
    """Announce a stage of `total` steps; yields `step(info="")`, called once per finished step."""
    report = report or silent
    report("stage_start", {"stage": name, "total": total})
    try:
        yield lambda info="": report("stage_step", {"stage": name, "info": info})
    finally:
        report("stage_end", {"stage": name})
