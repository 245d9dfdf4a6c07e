"""PNG plots of a search (the `plot` extra): the fitness curve and the kept/pruned grid."""

from __future__ import annotations

import os
from pathlib import Path

from loramerge_cli.errors import LoramergeError

KEPT, PRUNED = "#4c9f70", "#d1495b"  # green kept, red pruned: distinct also in greyscale


def import_matplotlib() -> None:
    """Import matplotlib with its import-time warnings held back (a read-only HOME: "mkdir -p failed …",
    "Matplotlib created a temporary cache directory …"), which --quiet and --json runs would otherwise print;
    its logger's level is given back. ImportError as it comes."""
    import logging

    logger = logging.getLogger("matplotlib")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import matplotlib  # noqa: F401
    finally:
        logger.setLevel(level)


def new_figure(figsize: tuple[float, float], columns: int = 1):
    """(figure, axes) drawn without pyplot: the caller's matplotlib backend (a notebook's) is left as it is, and
    nothing is kept in pyplot's list of open figures."""
    try:
        import_matplotlib()
        from matplotlib.figure import Figure
    except ImportError:
        raise LoramergeError("--plot needs matplotlib: pip install 'loramerge[plot]'") from None
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(1, columns, squeeze=False)[0] if columns > 1 else figure.subplots()


def search_title(table) -> str:
    """'surrogate search, ta, λ 0.4, seed 1': the strategy and what it merged with, for plot titles."""
    merger = table.merger if isinstance(table.merger, dict) else {}
    provenance = table.provenance or {}
    seed = provenance.get("seed", merger.get("seed"))
    parts = [f"{provenance['strategy']} search"] if provenance.get("strategy") else []
    parts.append(str(merger.get("merger") or "?"))
    lam = table.scale if table.scale is not None else merger.get("lambda")
    if lam is not None:
        parts.append(f"λ {float(lam):.3g}")
    if seed is not None:
        parts.append(f"seed {seed}")
    return ", ".join(parts)


FITNESS_LABELS = {"accuracy": "fitness (points over the unpruned merge)",
                  "nsc": "fitness (% of the unpruned merge's label-free loss removed)"}


def fitness_figure(history: list[dict], title: str, fitness: str = "accuracy"):
    """Best and mean fitness per generation (or round): integer ticks, markers, the unpruned merge at zero;
    `fitness` names what the values are (the search's --fitness)."""
    from matplotlib.ticker import MaxNLocator

    figure, axis = new_figure((6, 3.5))
    kind = "generation" if history and "generation" in history[0] else "round"
    if history and "scores" in history[0]:  # the surrogate search: against evaluations, every table's score too
        kind = "full_evaluations"
        spent = [(record["full_evaluations"] - len(record["scores"]) + 1 + index, score)
                 for record in history for index, score in enumerate(record["scores"])]
        axis.scatter([x for x, _ in spent], [y for _, y in spent], s=6, alpha=0.5, color="grey", label="each table")
    steps, bests = [record.get(kind) for record in history], [record["best_fitness"] for record in history]
    axis.axhline(0.0, color="grey", linewidth=1, linestyle="--", label="unpruned merge")
    if kind == "full_evaluations":  # a step per table that beat the best so far (the screen is one record)
        rises = best_so_far(spent, history)
        last = max([evaluation for evaluation, _ in spent] + [step for step in steps if step is not None], default=0)
        line = [(0, 0.0), *rises, (last, rises[-1][1] if rises else 0.0)]
        axis.plot([x for x, _ in line], [y for _, y in line], drawstyle="steps-post", label="best so far")
        axis.scatter([x for x, _ in rises], [y for _, y in rises], s=14, zorder=3, color=axis.lines[-1].get_color())
    else:
        axis.plot(steps, bests, marker="o", markersize=4, label="best so far")
    if history and "mean_fitness" in history[0]:
        axis.plot(steps, [record["mean_fitness"] for record in history], marker=".", alpha=0.7,
                  label="population mean")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    low, high = axis.get_xlim()
    if high - low < 2:  # (one record: the locator falls back to fractions below a range of 1)
        middle = round((low + high) / 2)
        axis.set_xlim(middle - 1, middle + 1)
    axis.set_xlabel(kind.replace("_", " ").replace("full evaluations", "full-set evaluations"))
    axis.set_ylabel(FITNESS_LABELS.get(fitness, f"fitness ({fitness})"))
    axis.set_title(f"search fitness ({title})", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def best_so_far(spent: list[tuple[int, float]], history: list[dict]) -> list[tuple[int, float]]:
    """(evaluation, best fitness) at each evaluation whose table beat the best so far, the unpruned merge's 0
    counting as the start; a record's own best counts at its last evaluation."""
    ends = {record["full_evaluations"]: record["best_fitness"] for record in history}
    rises, best = [], 0.0
    for evaluation, score in spent:
        score = max(score, ends.get(evaluation, score))
        if score > best:
            best = score
            rises.append((evaluation, best))
    return rises


def mask_figure(table, title: str):
    """Tasks × units as a two-colour grid (kept / pruned), every unit labelled; real weights as numbers."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    tasks, units = len(table.tasks), len(table.units)
    figure, axis = new_figure((max(4.5, 0.32 * units + 2.5), 0.45 * tasks + 2.2))
    kept = [[1 if value != 0 else 0 for value in row] for row in table.weights]
    axis.imshow(kept, aspect="auto", cmap=ListedColormap([PRUNED, KEPT]), vmin=0, vmax=1, interpolation="nearest")
    for task, row in enumerate(table.weights):
        for unit, value in enumerate(row):
            if value not in (0, 1):
                axis.text(unit, task, f"{value:.2g}", ha="center", va="center", fontsize=6, color="white")
    axis.set_yticks(range(tasks), table.tasks)
    axis.set_xticks(range(units), [_short(name) for name in table.units], rotation=90, fontsize=7)
    axis.set_xticks([x - 0.5 for x in range(1, units)], minor=True)
    axis.set_yticks([y - 0.5 for y in range(1, tasks)], minor=True)
    axis.grid(which="minor", color="white", linewidth=1)
    axis.tick_params(which="minor", length=0)
    axis.set_xlabel(table.unit)
    pruned = table.pruned_count()
    axis.set_title(f"weight table: {pruned} of {tasks * units} pruned ({title})", fontsize=10)
    axis.legend(handles=[Patch(color=KEPT, label="kept"), Patch(color=PRUNED, label="pruned")],
                loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    figure.tight_layout()
    return figure


def _short(unit: str) -> str:
    """'model.layers.11' -> 'layers.11': the last two path components label a unit well enough."""
    return ".".join(unit.split(".")[-2:])


PLOT_NAMES = ("fitness.png", "mask.png")


SOFTWARE = "loramerge"  # the PNG's Software text: a picture loramerge drew (only those are ever replaced)


def plots_digest(table, history: list[dict]) -> str:
    """The sha256 of what the pictures show (the table, its title, the history), kept in each PNG's Description:
    a picture of this search is left as it is, one of another search is told apart."""
    import hashlib
    import json

    shown = {"title": search_title(table), "fitness": (table.provenance or {}).get("fitness", "accuracy"),
             "tasks": table.tasks, "units": table.units, "unit": table.unit, "weights": table.weights,
             "history": history}
    return hashlib.sha256(json.dumps(shown, sort_keys=True, default=str).encode()).hexdigest()


def drawn_digest(path: Path) -> str | None:
    """The Description digest of a whole PNG that loramerge drew ("" for one without it); None for any other file
    (a user's picture, one cut short, not a PNG)."""
    import warnings

    if not _whole_png(path):
        return None
    try:
        from PIL import Image

        with warnings.catch_warnings():  # (a huge picture's DecompressionBombWarning: its pixels are never read)
            warnings.simplefilter("ignore")
            with Image.open(path) as image:  # the chunks before the pixels: where the text is written
                text = dict(image.info)
    except Exception:  # noqa: BLE001 - not a PNG Pillow reads, unreadable: not a picture of ours
        return None
    if str(text.get("Software", "")).partition(" ")[0] != SOFTWARE:  # ("loramergeX tool" is another's)
        return None
    return str(text.get("Description", ""))


def _whole_png(path: Path) -> bool:
    """A PNG file from its signature to its closing IEND chunk (one cut short is not)."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(8)
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - 12))
            return start == b"\x89PNG\r\n\x1a\n" and handle.read(12)[4:8] == b"IEND"
    except OSError:
        return False


def write_plots(table, history: list[dict], folder: str | Path, force: bool = False) -> list[Path]:
    """fitness.png and mask.png (PLOT_NAMES) in `folder`, both drawn before either is written, each written whole
    (a picture already showing the same is left as it is); returns the paths. Each PNG says it is loramerge's, and
    what it shows (plots_digest). What is there when they are written is checked again, as `--out` is: without
    `force` a picture is created only where nothing is, with it only a picture loramerge drew is replaced; one
    that appeared or changed during the search is kept, this search's picture written beside it (and named in
    the error)."""
    import io

    from loramerge_cli import __version__, interrupts
    from loramerge_cli.atomic import write_bytes, write_new
    from loramerge_cli.outputs import write_beside

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    title, digest = search_title(table), plots_digest(table, history)
    fitness = (table.provenance or {}).get("fitness", "accuracy")
    metadata = {"Software": f"{SOFTWARE} {__version__}", "Description": digest}
    pictures = {}
    for name, draw in zip(PLOT_NAMES, (lambda: fitness_figure(history, title, fitness),
                                       lambda: mask_figure(table, title))):
        buffer = io.BytesIO()
        draw().savefig(buffer, dpi=110, format="png", metadata=metadata)
        pictures[folder / name] = buffer.getvalue()
    before, written = interrupts.hint(), []
    kept: list[tuple[Path, Path]] = []
    for path, data in pictures.items():
        found = None if path.is_symlink() else drawn_digest(path)
        if found == digest:  # (this search's picture already)
            continue
        try:
            if force and found is not None:
                write_bytes(path, data)
            else:
                write_new(path, data)
            written.append(str(path))
        except FileExistsError:
            beside = write_beside(path, data)
            if beside is None:
                raise LoramergeError(f"--plot {folder}: {path.name} appeared or changed while the search ran, and no "
                                     "free name beside it was found") from None
            kept.append((path, beside))
            written.append(f"{beside} (beside {path.name}, which appeared during the search)")
        note = f"{' and '.join(written)} {'was' if len(written) == 1 else 'were'} drawn whole before it"
        interrupts.set_hint(f"{before}; {note}" if before else note, resumable=interrupts.resume_hint() is not None)
    if kept:
        names = " and ".join(path.name for path, _ in kept)
        raise LoramergeError(f"--plot {folder}: {names} appeared or changed while the search ran; not replaced, this "
                             f"search's {'picture is' if len(kept) == 1 else 'pictures are'} in "
                             f"{' and '.join(str(beside) for _, beside in kept)}")
    return list(pictures)
