"""Rich rendering of the label-free searches: NSC training progress and summaries. Never under --json."""

from __future__ import annotations

from rich.text import Text


def nsc_progress(console, steps: int, every: int = 10):
    """A callback for run_search --strategy nsc: the resolved targets, then a line every `every` steps with
    the time left; on a live ProgressDisplay also a steps bar with ETA and the loss."""
    import time

    from loramerge_cli.cli.progress import eta

    live = getattr(console, "live", False)
    clock = {"started": time.monotonic()}

    def on_event(kind: str, data: dict) -> None:
        if kind == "nsc_start":
            targets = ", ".join(data["targets"]) or "(none: the entropy objective reads the heads' predictions)"
            console.print(f"{data['objective']} objective over {data['modules']} modules × {data['tasks']} tasks; "
                          f"targets: {targets}", highlight=False)
            clock["started"] = time.monotonic()
        elif kind == "step":
            if clock.get("before") is None:  # steps done before this process (a resumed run) took no time here
                clock["before"] = data["step"] - 1
                if live:
                    console.start("NSC steps", steps - clock["before"], clock["started"])
            before = clock["before"]
            if live:
                console.advance("NSC steps", f"loss {data['loss']:.5f}")
            if data["step"] % every == 0 or data["step"] in (1, steps):
                console.print(f"step {data['step']:>4}/{steps}  loss {data['loss']:.5f}  {data['seconds']:.2f} s/step"
                              f"  eta {eta(clock['started'], data['step'] - before, steps - before)}", highlight=False)

    return on_event


def label_free_progress(console, generations: int):
    """A callback for ENMP / greedy / random with --fitness nsc (fitness: % reduction of the loss)."""
    from loramerge_cli.cli.render import search_progress

    inner = search_progress(console, generations)

    def on_event(kind: str, data: dict) -> None:
        if kind == "start":
            targets = ", ".join(data["targets"]) or "-"
            console.print(f"unpruned merge: {data['objective']} loss {data['reference_loss']:.5f} "
                          f"(λ = {data['lambda']:.4g}); {data['units']} units × {data['tasks']} tasks; "
                          f"targets: {targets}; fitness = % reduction of the loss", highlight=False)
        else:
            inner(kind, data)

    return on_event


def nsc_summary(table, provenance: dict):
    from rich.console import Group
    from rich.table import Table

    from loramerge_cli.cli.render import Fitting

    grid = Table(title="learned coefficients (rows: modules, columns: tasks)", title_justify="left")
    grid.add_column("module")
    for task in table.tasks:
        grid.add_column(task, justify="right")
    for column, unit in enumerate(table.units):
        grid.add_row(unit, *(f"{row[column]:.4f}" for row in table.weights))
    loss = provenance["loss"]
    steps = len(provenance["history"])  # (each step's loss is of its own mini-batches: they may not fall)
    training = sum(record.get("seconds", 0.0) for record in provenance["history"])
    parts = [Fitting(grid), Text(f"{provenance['objective']} loss of a step's mini-batches: step 1 "
                                 f"{loss['first']:.5f}, step {steps} {loss['last']:.5f} ({steps} steps in "
                                 f"{training:.1f} s; {provenance['seconds']:.1f} s in all)")]
    per_task = provenance["task_losses"]
    parts.append(Text(f"{provenance['objective']} loss over each task's inputs, start -> learned: " + "; ".join(
        f"{name} {before:.4f} -> {after:.4f}"
        for name, before, after in zip(per_task["tasks"], per_task["start"], per_task["end"]))))
    test = provenance.get("test")
    if test:
        parts.append(Text(f"test mean normalized accuracy: ta at its default λ "
                          f"{test['ta_default_mean_normalized_accuracy']:.2f}, with these coefficients "
                          f"{test['coefficients_mean_normalized_accuracy']:.2f}"))
    return Group(*parts)


def label_free_summary(table, provenance: dict):
    from rich.console import Group

    from loramerge_cli.cli.render import Fitting, mask_heatmap

    validation = provenance["validation"]
    parts = [Fitting(mask_heatmap(table)), Text(
        f"pruned {table.pruned_count()} of {len(table.tasks) * len(table.units)} units; validation "
        f"{provenance['objective']} loss {validation['unpruned_loss']:.5f} -> {validation['best_loss']:.5f} "
        f"({validation['fitness']:+.2f}%); {provenance['evaluations']} evaluations in {provenance['seconds']:.1f} s")]
    test = provenance.get("test")
    if test:
        parts.append(Text(f"test mean normalized accuracy {test['unpruned_mean_normalized_accuracy']:.2f} -> "
                          f"{test['best_mean_normalized_accuracy']:.2f}"))
    return Group(*parts)
