"""Rich rendering for people: tables, the norm heatmap, merge progress. Never used under --json."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from loramerge_cli.merging.registry import shown_parameter

HEAT = ("grey35", "blue", "cyan", "green", "yellow", "red")  # low -> high
HEAT_TEXT = ("white", "white", "black", "black", "black", "white")  # readable on each background


def heat_legend() -> Text:
    """The heatmap's key: each colour and the share of the largest norm it stands for."""
    legend = Text("colour = share of the largest norm: ")
    for level, colour in enumerate(HEAT):
        low, high = 100 * level // len(HEAT), 100 * (level + 1) // len(HEAT)
        legend.append(f" {low}–{high}% ", style=f"{HEAT_TEXT[level]} on {colour}")
        legend.append(" ")
    return legend


NAME_FOLD = 8  # row names and column headers may be folded down to this many characters (a path still reads)


class Fitting:
    """A table in which no value is broken: each column at least as wide as its longest value (a number folded
    over two lines, `43.7` over `5`, reads as another number; a cut one, `0.…`, as none), row names and headers
    folded where needed; in a console too narrow for that, each row as a block of `column: value` lines."""

    def __init__(self, table: Table):
        self.table = table

    def __rich_console__(self, console, options):
        from rich.cells import cell_len

        columns = self.table.columns
        headers = [str(column.header) if self.table.show_header else "" for column in columns]  # (hidden: none)
        widths = []
        for index, (column, header) in enumerate(zip(columns, headers)):
            longest = max((cell_len(word) for cell in column.cells for word in str(cell).split()), default=1)
            widths.append(max(min(cell_len(header), NAME_FOLD), min(longest, NAME_FOLD) if index == 0 else longest))
        frame = (len(columns) + 1 if self.table.box else 0) + 2 * len(columns)  # rules and cell padding
        if sum(widths) + frame <= options.max_width:
            for column, width in zip(columns, widths):
                column.min_width, column.overflow = width, "fold"
            yield self.table
            return
        if self.table.title:
            yield Text(str(self.table.title), style="italic")
        for cells in zip(*(list(column.cells) for column in columns)):
            yield Text(f"{headers[0]}: {cells[0]}" if headers[0] else str(cells[0]), style="bold")
            for header, cell in zip(headers[1:], cells[1:]):
                yield Text(f"  {header}: " if header else "  ") + (cell if isinstance(cell, Text) else Text(str(cell)))
        if self.table.caption:
            yield self.table.caption if isinstance(self.table.caption, Text) else Text(str(self.table.caption))


def _compact(counts: dict) -> str:
    """{value: modules} as "16" (one value) or "24 (4 modules), 28 (28 modules)"."""
    return ", ".join(f"{value} ({count} module{'s' * (count != 1)})" if len(counts) > 1 else str(value)
                     for value, count in counts.items())


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
        "dtype": lambda r: r["dtype"] or "-",
        "modules": lambda r: f"{r['modules']} in {r['units']} units",
        "ranks": lambda r: _compact(r["ranks"]),
        "alphas": lambda r: _compact(r["alphas"]),
        "scales": lambda r: _compact(r["scales"]) + (" (rsLoRA: α/√r)" if r["use_rslora"] else " (α/r)"),
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
    table = Table(title="‖ΔW‖_F per unit and task", title_justify="left",
                  caption=heat_legend() if heatmap else None, caption_justify="left")
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
                cells.append(Text(f"{value:.3g}", style=f"{HEAT_TEXT[level]} on {HEAT[level]}"))
            else:
                cells.append(Text(f"{value:.4g}"))
        table.add_row(unit, *cells)
    return table


PAIRS_LISTED = 6  # (4 adapters)


def compatibility_lines(summary: dict) -> list[Text]:
    """The notes, the pairs' verdicts (green or red) and what a merge would refuse, as written (no markup). Past
    PAIRS_LISTED pairs, only incompatible ones have a line each (128 adapters make 8,128 pairs; --json has all)."""
    lines = [Text(f"{adapter['name']}: {note}") for adapter in summary["adapters"] for note in adapter.get("notes", [])]
    pairs = summary["pairs"]
    listed = pairs if len(pairs) <= PAIRS_LISTED else [pair for pair in pairs if not pair["compatible"]]
    for pair in listed:
        first, second = pair["adapters"]
        verdict = Text("compatible", style="green") if pair["compatible"] else \
            Text("; ".join(pair["problems"]), style="red")
        lines.append(Text(f"{first} / {second}: ").append_text(verdict))
    if len(listed) < len(pairs):
        rest = len(pairs) - len(listed)
        lines.append(Text(f"{'the other' if listed else 'all'} {rest} pairs: ").append_text(
            Text("compatible", style="green")))
    refusals = summary["merge_refusals"]
    lines.append(Text("merge would refuse: " + ("; ".join(refusals) if refusals else  # (an update past its
                                                "nothing known before merging")))  # dtype's range: found merging)
    return lines


def merge_table(report: dict) -> Table:
    table = Table(title=f"merged into {report['out']}", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    shown = {k: v for k, v in report["parameters"].items() if k not in ("merger", "method", "space")}
    if shown.get("out_rank") is not None:  # a fixed rank: the energy target does not apply
        shown.pop("energy", None)
    elif "out_rank" in shown:
        shown.pop("out_rank")
    parameters = ", ".join(shown_parameter(k, v) for k, v in shown.items())
    table.add_row("merger", f"{report['merger']} (method {report['method']}, space {report['space']})")
    table.add_row("parameters", parameters)
    omitted = len(report["omitted"])
    table.add_row("modules", f"{report['modules']} written" + (f", {omitted} left out (pruned in every task)"
                                                              if omitted else ""))
    table.add_row("ranks", _compact(report["ranks"]))
    if report.get("max_truncation_error") is not None:
        table.add_row("truncation", f"largest relative error {report['max_truncation_error']:.3g}")
    tuning = report.get("lambda_tuning")
    if tuning:
        score = _score(tuning["best_mean_normalized_accuracy"])
        table.add_row("λ auto", f"{tuning['best']:g} (validation mean normalized accuracy {score}; "
                      f"the method's default {tuning['default']:.3g})")
        table.add_row("λ grid", " ".join(f"{r['lambda']:g}:{_score(r['mean_normalized_accuracy'], 1)}"
                                          for r in tuning["grid"]))
    return table


def _score(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def search_progress(console, generations: int, budget: int | None = None):
    """A callback for run_search: one line per generation (or greedy/random round), with the time left,
    on the console; on a live ProgressDisplay also a bar with ETA and the best so far (generations, or
    evaluations of the `budget`), and a "searching" one, with its elapsed time, until that bar's first step."""
    import time

    from loramerge_cli.cli.common import print_warnings
    from loramerge_cli.cli.progress import eta

    live = getattr(console, "live", False)
    clock = {"started": time.monotonic()}

    def on_event(kind: str, data: dict) -> None:
        if kind == "lambda":
            console.print(f"λ tuned on validation: {data['lambda']:.4g} ({data['points']} points)", highlight=False)
            print_warnings(console, data["warnings"])
        elif kind == "start":
            console.print(
                f"unpruned merge: {data['reference']:.2f} mean normalized accuracy (λ = {data['lambda']:.4g}); "
                f"{data['units']} units × {data['tasks']} tasks", highlight=False)
            print_warnings(console, data.get("warnings", []))
            clock["started"] = time.monotonic()
            if live:
                console.start("searching", None)
        elif kind == "generation":
            done = data.get("cma_generation", data["generation"])  # the screened search's steps include others
            if clock.get("before") is None:  # generations done before this process (a resumed run) took no time here
                clock["before"] = done - 1
            before = clock["before"]
            left = eta(clock["started"], done - before, generations - before)
            if live and "generations" not in console.stages:  # started here: the label-free start differs
                console.finish("searching")
                console.start("generations", generations - before, clock["started"])  # those this process runs
            console.print(
                f"gen {done:>3}/{generations}  best {data['best_fitness']:+.3f}  "
                f"mean {data['mean_fitness']:+.3f}  sparsity {100 * data['mean_sparsity']:.1f}%  "
                f"distinct {data['distinct_evaluated']}  cache hits {data['cache_hits']}  "
                f"{data['seconds_per_evaluation']:.2f} s/eval  eta {left}"
                + (f"  forward examples {data['forward_examples']}" if "forward_examples" in data else ""),
                highlight=False)
            if live:
                console.advance("generations", f"best {data['best_fitness']:+.3f}")
        elif kind == "screen" and "total" not in data:  # the screened search (the surrogate one: below)
            console.print(
                f"screen: {data.get('new_tables', data['new_evaluations'])} tables scored "
                f"({data['full_evaluations']} on the full set), "
                f"best {data['best_fitness']:+.3f}  forward examples {data['forward_examples']}", highlight=False)
            clock["started"] = time.monotonic()  # the generations' ETA starts after the screen
        elif kind == "greedy":
            console.print(f"greedy round {data['round']}: {data['new_evaluations']} tables scored, table "
                          f"{data['greedy_table']} {data['greedy_fitness']:+.3f}  best {data['best_fitness']:+.3f}  "
                          f"forward examples {data['forward_examples']}", highlight=False)
            clock["started"] = time.monotonic()
        elif kind == "proposal" or (kind == "screen" and "total" in data):  # the surrogate search: its budget
            done, total = data["full_evaluations"], data["total"]  # is distinct evaluations
            if clock.get("before") is None:  # evaluations done before this process (a resumed run's)
                clock["before"] = done - data["new_evaluations"]
            before = clock["before"]
            if live and "evaluations" not in console.stages:
                console.finish("searching")
                console.start("evaluations", total - before, clock["started"])
            tables = "".join(f"{table} {score:+.3f}  " for table, score in zip(data["tables"], data["scores"]))
            console.print(f"{'screen' if kind == 'screen' else 'table '} {done:>4}/{total}  "
                          + (tables if kind == "proposal" else "")
                          + f"best {data['best_fitness']:+.3f}  {data['seconds_per_evaluation']:.2f} s/eval  "
                          f"eta {eta(clock['started'], done - before, total - before)}  "
                          f"forward examples {data['forward_examples']}", highlight=False)
            for _ in range(data["new_evaluations"]) if live else ():
                console.advance("evaluations", f"best {data['best_fitness']:+.3f}")
        elif kind == "round":  # greedy, random: the budget is distinct tables beside the unpruned merge
            done, before = data["distinct_evaluated"] - 1, clock.setdefault("scored", 0)
            left = f"  eta {eta(clock['started'], done, budget)}" if budget else ""
            console.print(f"round {data['round']:>3}  best {data['best_fitness']:+.3f}  "
                          f"distinct {data['distinct_evaluated']}{left}", highlight=False)
            if live and budget:
                if "evaluations" not in console.stages:
                    console.finish("searching")
                    console.start("evaluations", budget, clock["started"])
                for _ in range(max(0, done - before)):
                    console.advance("evaluations", f"best {data['best_fitness']:+.3f}")
            clock["scored"] = done

    return on_event


def mask_heatmap(table) -> Table:
    """Tasks × units: '█' kept, '·' pruned (real-valued weights shown as numbers)."""
    scaled = any(value not in (0, 1) for row in table.weights for value in row)
    grid = Table(title="█ kept  · pruned" + ("  ▒ scaled" if scaled else ""), title_justify="left",
                 show_header=True, box=None, pad_edge=False)
    grid.add_column("task")
    grid.add_column("units " + (table.units[0] + " …" if table.units else ""), no_wrap=True)
    for task, row in zip(table.tasks, table.weights):
        cells = Text()
        for value in row:
            cells.append(*(("█", "green") if value == 1 else ("·", "bold red") if value == 0 else ("▒", "yellow")))
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
        + ("; that is every table the --max-prune cap allows, so no budget could buy more"
           if provenance.get("every_allowed_table_scored") else "")
        + ("; it stopped there: every table the --max-prune cap allows was scored, some on a validation subset "
           "only (successive halving left them there)" if provenance.get("every_allowed_table_seen") else "")
    )
    parts = [Fitting(mask_heatmap(table)), lines]
    test = provenance.get("test")
    if test:
        parts.append(Text(f"test mean normalized accuracy {test['unpruned_mean_normalized_accuracy']:.2f} -> "
                          f"{test['best_mean_normalized_accuracy']:.2f}"))
    return Group(*parts)


def push_lines(report: dict) -> list[str]:
    """What a push did (or, dry, would do), for people."""
    where = f"{report['repo_id']} (revision {report['revision']}{', private' if report['private'] else ''})"
    head = f"would upload to {where}:" if report["dry_run"] else f"uploaded to {where}: {report['url']}"
    return [head, *(f"  {name}" for name in report["files"])]
