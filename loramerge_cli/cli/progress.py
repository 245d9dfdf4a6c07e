"""Progress on stderr: a rich display with ETA on a terminal, periodic plain lines otherwise, nothing
under --quiet. It draws the stage events of loramerge_cli.events; other events go to `inner` (a command's
own renderer of search generations or NSC steps)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.text import Text

from loramerge_cli.cli.common import StandardError

PLAIN_INTERVAL = 10.0  # seconds between plain progress lines of one stage


def duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def eta(started: float, done: int, total: int | None, now: float | None = None,
        stepped: float | None = None) -> str | None:
    """Time left at the mean pace of the steps done ('?' before the first step, None without a total), counted
    down from the last step (`stepped`, else `now`): a step under way does not make it climb."""
    if not total:
        return None
    if done <= 0:
        return "?"
    now = now if now is not None else time.monotonic()
    stepped = now if stepped is None else stepped
    return duration(max(0.0, (stepped - started) / done * max(0, total - done) - (now - stepped)))


def _eta_column():
    """A bar's time left at the mean pace since its stage began, as the plain lines compute it (rich's own
    estimate uses the recent pace, and none at all while the steps come in batches), counted down between steps."""
    from rich.progress import ProgressColumn

    class EtaColumn(ProgressColumn):
        def render(self, task) -> Text:
            left = eta(task.start_time, int(task.completed), task.total, task.get_time(), task.fields.get("stepped")) \
                if task.start_time is not None and task.total is not None and not task.finished else None
            return Text(f"eta {left}" if left else "", style="progress.remaining")

    return EtaColumn()


@dataclass
class _Stage:
    total: int | None
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    last_line: float = 0.0
    task_id: object = None


class ProgressDisplay:
    """A reporter (callable `(kind, data)`) and a context manager; `print` writes above the live display."""

    def __init__(self, quiet: bool = False, inner=None, console: Console | None = None,
                 interval: float = PLAIN_INTERVAL, terminal_only: tuple[str, ...] = ()):
        self.console = console or Console(file=StandardError(), markup=False)  # lines as written (paths)
        self.enabled = not quiet
        self.terminal_only = terminal_only  # stages of many quick steps: in a log, plain lines only after an interval
        # (on a dumb terminal rich draws no bar: the plain lines instead)
        self.live = self.enabled and self.console.is_terminal and not self.console.is_dumb_terminal
        self.inner = inner
        self.interval = interval
        self.stages: dict[str, _Stage] = {}
        self._progress = None

    def __enter__(self) -> ProgressDisplay:
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                _eta_column(), TextColumn("{task.fields[info]}", markup=False),
                console=self.console, transient=True)
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def print(self, *objects, **options) -> None:
        if self.enabled:
            options.setdefault("highlight", False)
            options.setdefault("soft_wrap", not self.live)  # plain lines stay one line each in a log file
            (self._progress.console if self._progress is not None else self.console).print(*objects, **options)

    def __call__(self, kind: str, data: dict) -> None:
        if kind == "stage_start":
            self.start(data["stage"], data.get("total"))
        elif kind == "stage_step":
            self.advance(data["stage"], data.get("info", ""))
        elif kind == "stage_end":
            self.finish(data["stage"])
        elif self.inner is not None:
            self.inner(kind, data)

    def start(self, name: str, total: int | None, started: float | None = None) -> None:
        """A stage of `total` steps (None: unknown), begun now or at `started` (time.monotonic(): a stage whose bar
        is drawn once its first steps are done)."""
        stage = self.stages[name] = _Stage(total) if started is None else _Stage(total, started)
        if self._progress is not None:
            stage.task_id = self._progress.add_task(name, total=total, info="", stepped=stage.started)
            if started is not None:  # (rich's clock is time.monotonic too)
                next(task for task in self._progress.tasks if task.id == stage.task_id).start_time = started
        elif name in self.terminal_only:  # (many quick steps) a plain line only once it has lasted an interval
            stage.last_line = stage.started
        elif self.enabled and total != 1:
            self.console.print(f"{name}: {total} steps" if total else f"{name} …", highlight=False, soft_wrap=True)
            stage.last_line = stage.started

    def advance(self, name: str, info: str = "") -> None:
        if name not in self.stages:
            self.start(name, None)
        stage = self.stages[name]
        stage.done += 1
        if self._progress is not None and stage.task_id is not None:
            self._progress.update(stage.task_id, advance=1, info=info, stepped=time.monotonic())
            return
        now = time.monotonic()
        last = stage.done == stage.total and (name not in self.terminal_only or stage.last_line > stage.started)
        if self.enabled and (now - stage.last_line >= self.interval or last):
            stage.last_line = now
            of = f"/{stage.total}" if stage.total else ""
            left = eta(stage.started, stage.done, stage.total, now)
            self.console.print(f"{name}: {stage.done}{of}, {duration(now - stage.started)} elapsed"
                               + (f", eta {left}" if left and stage.done != stage.total else "")
                               + (f"  {info}" if info else ""), highlight=False, markup=False, soft_wrap=True)

    def finish(self, name: str) -> None:
        stage = self.stages.pop(name, None)
        if stage is not None and self._progress is not None and stage.task_id is not None:
            self._progress.remove_task(stage.task_id)
        elif stage is not None and self.enabled and stage.total is None and stage.done and (  # its size is known now
                name not in self.terminal_only or stage.last_line > stage.started):
            self.console.print(f"{name}: {stage.done}, {duration(time.monotonic() - stage.started)} elapsed",
                               highlight=False, markup=False, soft_wrap=True)
