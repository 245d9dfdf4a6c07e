"""Rich rendering for people: tables, the norm heatmap, merge progress. Never used under --json."""

from __future__ import annotations

from contextlib import contextmanager

from rich.table import Table
from rich.text import Text

HEAT = ("grey35", "blue", "cyan", "green", "yellow", "red")  # low -> high


def _compact(counts: dict) -> str:
    return ", ".join(f"{value}×{count}" if len(counts) > 1 else str(value) for value, count in counts.items())


def adapters_table(summary: dict) -> Table:
    """One column per adapter, one row per property (adapters are few, properties many)."""
    rows = summary["adapters"]
    table = Table(title="adapters", title_justify="left")
    table.add_column("")
    for row in rows:
        table.add_column(row["name"], overflow="fold")
    fields = {
        "base model": lambda r: r["base_model"] or "?",
        "type": lambda r: r["task_type"] or "-",
        "dtype": lambda r: r["dtype"],
        "modules": lambda r: f"{r['modules']} in {r['units']} units",
        "ranks": lambda r: _compact(r["ranks"]),
        "alphas": lambda r: _compact(r["alphas"]),
        "targets": lambda r: ", ".join(r["targets"]),
        "heads": lambda r: ", ".join(r["heads"]) or "-",
        "size": lambda r: _size(r["size_bytes"]),
        "sha256": lambda r: r["sha256"][:12],
    }
    for label, value in fields.items():
        table.add_row(label, *(value(row) for row in rows))
    return table


def _size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def norms_table(norms: dict, heatmap: bool = False) -> Table:
    """‖B̃A‖_F per (unit, task); with `heatmap`, cells coloured by their share of the largest value."""
    table = Table(title="‖ΔW‖_F per unit and task", title_justify="left")
    table.add_column("unit")
    for task in norms["tasks"]:
        table.add_column(task, justify="right")
    largest = max((v for row in norms["values"] for v in row if v is not None), default=0.0) or 1.0
    for unit, row in zip(norms["units"], norms["values"]):
        cells = []
        for value in row:
            if value is None:
                cells.append(Text("-", style="dim"))
            elif heatmap:
                level = min(len(HEAT) - 1, int(value / largest * len(HEAT)))
                cells.append(Text(f"{value:.3g}", style=f"bold white on {HEAT[level]}"))
            else:
                cells.append(Text(f"{value:.4g}"))
        table.add_row(unit, *cells)
    return table


def compatibility_lines(summary: dict) -> list[str]:
    lines = [f"{adapter['name']}: {note}" for adapter in summary["adapters"] for note in adapter.get("notes", [])]
    for pair in summary["pairs"]:
        first, second = pair["adapters"]
        verdict = "[green]compatible[/]" if pair["compatible"] else "[red]" + "; ".join(pair["problems"]) + "[/]"
        lines.append(f"{first} / {second}: {verdict}")
    refusals = summary["merge_refusals"]
    lines.append("merge would refuse: " + ("; ".join(refusals) if refusals else "nothing"))
    return lines


def merge_table(report: dict) -> Table:
    table = Table(title=f"merged into {report['out']}", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    shown = {k: v for k, v in report["parameters"].items() if k not in ("merger", "method", "space")}
    parameters = ", ".join(f"{k}={v}" for k, v in shown.items())
    table.add_row("merger", f"{report['merger']} (method {report['method']}, space {report['space']})")
    table.add_row("parameters", parameters)
    table.add_row("modules", f"{report['modules']} written, {len(report['omitted'])} omitted (every task pruned)")
    table.add_row("ranks", _compact(report["ranks"]))
    if report.get("max_truncation_error") is not None:
        table.add_row("truncation", f"largest relative error {report['max_truncation_error']:.3g}")
    return table


@contextmanager
def module_progress(console, total: int, description: str = "merging"):
    """A per-module progress bar on a terminal console (nothing when quiet or redirected); yields `advance(path)`."""
    if console.quiet or not console.is_terminal:
        yield lambda path: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda path: progress.update(task, advance=1, description=f"{description} {path}")


def search_progress(console, generations: int):
    """A callback for run_search: one line per generation (or greedy/random round) on the console."""

    def on_event(kind: str, data: dict) -> None:
        if kind == "lambda":
            console.print(f"λ tuned on validation: {data['lambda']:.4g}", highlight=False)
        elif kind == "start":
            console.print(
                f"unpruned merge: {data['reference']:.2f} mean normalized accuracy (λ = {data['lambda']:.4g}); "
                f"{data['units']} units × {data['tasks']} tasks", highlight=False)
        elif kind == "generation":
            console.print(
                f"gen {data['generation']:>3}/{generations}  best {data['best_fitness']:+.3f}  "
                f"mean {data['mean_fitness']:+.3f}  sparsity {100 * data['mean_sparsity']:.1f}%  "
                f"distinct {data['distinct_evaluated']}  cache hits {data['cache_hits']}  "
                f"{data['seconds_per_evaluation']:.2f} s/eval"
                + (f"  forward examples {data['forward_examples']}" if "forward_examples" in data else ""),
                highlight=False)
        elif kind == "round":
            console.print(f"round {data['round']:>3}  best {data['best_fitness']:+.3f}  "
                          f"distinct {data['distinct_evaluated']}", highlight=False)

    return on_event


def mask_heatmap(table) -> Table:
    """Tasks × units: '█' kept, '·' pruned (real-valued weights shown as numbers)."""
    grid = Table(title="kept █  pruned ·", title_justify="left", show_header=True, box=None, pad_edge=False)
    grid.add_column("task")
    grid.add_column("units " + (table.units[0] + " …" if table.units else ""), no_wrap=True)
    for task, row in zip(table.tasks, table.weights):
        cells = "".join("█" if value == 1 else ("·" if value == 0 else "▒") for value in row)
        grid.add_row(task, cells)
    return grid


def search_summary(table, provenance: dict):
    from rich.console import Group

    validation = provenance["validation"]
    lines = Text(
        f"pruned {table.pruned_count()} of {len(table.tasks) * len(table.units)} units; "
        f"validation mean normalized accuracy {validation['unpruned_mean_normalized_accuracy']:.2f} -> "
        f"{validation['best_mean_normalized_accuracy']:.2f} ({validation['fitness']:+.2f}); "
        f"{provenance['evaluations']} full-set evaluations, {provenance.get('forward_examples', 0)} forward "
        f"examples in {provenance['seconds']:.1f} s"
    )
    parts = [mask_heatmap(table), lines]
    test = provenance.get("test")
    if test:
        parts.append(Text(f"test mean normalized accuracy {test['unpruned_mean_normalized_accuracy']:.2f} -> "
                          f"{test['best_mean_normalized_accuracy']:.2f}"))
    return Group(*parts)
