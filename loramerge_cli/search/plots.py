"""PNG plots of a search (the `plot` extra): the fitness curve and the weight-table heatmap."""

from __future__ import annotations

from pathlib import Path

from loramerge_cli.errors import LoramergeError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LoramergeError("--plot needs matplotlib: pip install 'loramerge[plot]'") from None
    return plt


def write_plots(table, history: list[dict], folder: str | Path) -> list[Path]:
    """fitness.png (best and mean fitness per generation or round) and mask.png; returns the paths."""
    plt = _pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    figure, axis = plt.subplots(figsize=(6, 3.5))
    steps = [record.get("generation", record.get("round")) for record in history]
    axis.plot(steps, [record["best_fitness"] for record in history], label="best")
    if history and "mean_fitness" in history[0]:
        axis.plot(steps, [record["mean_fitness"] for record in history], label="mean", alpha=0.7)
    axis.set_xlabel("generation")
    axis.set_ylabel("fitness (points over the unpruned merge)")
    axis.legend()
    figure.tight_layout()
    written.append(folder / "fitness.png")
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(max(4, 0.25 * len(table.units) + 2), 0.4 * len(table.tasks) + 1.5))
    image = axis.imshow(table.weights, aspect="auto", cmap="viridis", interpolation="nearest")
    axis.set_yticks(range(len(table.tasks)), table.tasks)
    axis.set_xlabel(f"unit (0 = {table.units[0]})" if table.units else "unit")
    axis.set_title("weight table (1 kept, 0 pruned)")
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    written.append(folder / "mask.png")
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)
    return written
