"""NSC: learn one merge coefficient per (task, LoRA module) by AdamW on a label-free objective
(docs/algorithms.md, NSC), through the low-rank side path on one copy of the base model.

Only inputs are read. Batches are drawn per task in a seeded order that depends on nothing but
(seed, task, epoch), so a run checkpointed every few steps and resumed equals an uninterrupted one.
The result is a weight table (unit = module, scale 1): `merge --mask` with `ta` is the NSC merge.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from loramerge_cli import __version__
from loramerge_cli import atomic
from loramerge_cli.errors import LoramergeError, is_finite_number
from loramerge_cli.evaluation.batches import model_inputs_of
from loramerge_cli.search.nsc_settings import OBJECTIVES, STATE_NAME, NscSettings  # noqa: F401  (imported from here)
from loramerge_cli.search.state_io import (RunClock, hub_base_record, loads_finite, run_id, searched_data,
                                           started_command, write_progress)

CHECK_EXAMPLES = 256  # per task: the after-training check of each task's objective reads at most these


# --- data -------------------------------------------------------------------------------------------

def example_inputs(engine, task: str) -> list[dict[str, torch.Tensor]]:
    """One model-input dict per example, in example order, from an engine prepared with batch size 1.

    Causal-LM tasks keep the prompt only (the tokens before the first choice token)."""
    prepared = engine.prepared[task]
    by_example: dict[int, dict] = {}
    for batch in prepared.batches:
        index = int(batch.indices[0])
        if engine.task_file.type.choices:
            if index % prepared.choices:
                continue
            cut = int(batch.positions.min())
            by_example[index // prepared.choices] = {key: value[:, :cut] for key, value in batch.inputs.items()}
        else:
            by_example[index] = batch.inputs
    return [by_example[index] for index in range(prepared.count)]


def collate(examples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack single-example inputs: token tensors right-padded (ids with pad_id, masks and segments with 0)."""
    out = {}
    for key in examples[0]:
        parts = [example[key] for example in examples]
        if parts[0].dim() == 2:  # per-token inputs
            width = max(part.shape[1] for part in parts)
            fill = pad_id if key == "input_ids" else 0
            parts = [torch.nn.functional.pad(part, (0, width - part.shape[1]), value=fill) for part in parts]
        out[key] = torch.cat(parts)
    return out


def batch_indices(seed: int, task: str, count: int, batch_size: int, step: int) -> list[int]:
    """Example indices of `task`'s batch at `step`: epochs of seeded permutations cut into batches
    (the last batch of an epoch may be short), cycled. Stateless, so resuming needs no RNG state."""
    per_epoch = -(-count // batch_size)
    epoch, position = divmod(step, per_epoch)
    digest = hashlib.sha256(f"{seed}|{task}|{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") & ((1 << 63) - 1))
    order = torch.randperm(count, generator=generator).tolist()
    return order[position * batch_size:(position + 1) * batch_size]


# --- the problem ------------------------------------------------------------------------------------

@dataclass
class NscProblem:
    adapters: list
    engine: object  # Evaluator (batch size 1: one prepared entry per example)
    paths: list[str]  # every LoRA module, natural order: the table's units
    targets: list[str]  # empty for the entropy objective
    objective: object
    examples: dict[str, list[dict]]
    pad_id: int


def label_free_task_file(task_file, adapters, objective: str):
    """The task spec as a label-free search reads it: no labels (an unlabelled split, GLUE's `-1`, is fine), and
    for the NSC objective, which needs no head, tasks whose adapter carries none run with the base's head."""
    from loramerge_cli.evaluation.specs import FROM_ADAPTER, NO_HEAD

    task_file = without_labels(task_file)
    if objective != "nsc":
        return task_file
    headless = {adapter.name for adapter in adapters if not adapter.heads}
    tasks = [replace(task, head=NO_HEAD) if task.head == FROM_ADAPTER and task.name in headless else task
             for task in task_file.tasks]
    return replace(task_file, tasks=tasks)


def without_labels(task_file):
    """The task spec with no label column read (folder trees still name their classes)."""
    return replace(task_file, tasks=[replace(task, label=None) for task in task_file.tasks])


def build_nsc_problem(request, batch_size: int | None = 1, report=None) -> NscProblem:
    """Load and check everything before the first step: adapters, tasks, model, targets, inputs; `report`
    receives the loading as a progress stage."""
    from loramerge_cli.adapters.compat import check_compatible
    from loramerge_cli.evaluation.engine import checked_evaluator
    from loramerge_cli.evaluation.functional import freeze
    from loramerge_cli.evaluation.specs import load_task_file
    from loramerge_cli.merging.merge import module_paths
    from loramerge_cli.search.nsc_objectives import EntropyObjective, NullSpaceObjective
    from loramerge_cli.search.nsc_targets import resolve_targets
    from loramerge_cli.search.problem import request_adapters

    settings: NscSettings = request.nsc
    adapters = request_adapters(request)
    check_compatible(adapters, request.allow_base_mismatch)
    task_file = label_free_task_file(load_task_file(request.tasks), adapters, settings.objective)
    names = [a.name for a in adapters]
    task_file.check_covers(names)
    eval_settings = replace(request.eval, batch_size=batch_size or request.eval.batch_size)
    engine = checked_evaluator(task_file, adapters, eval_settings, request.base, request.allow_base_mismatch,
                               request.allow_pickle, report)
    freeze(engine.model)
    paths = module_paths(adapters)
    if settings.objective == "entropy":
        targets, objective = [], EntropyObjective(engine.task_file)
    else:
        targets = resolve_targets(list(engine.model.named_modules()), paths, settings.target_blocks,
                                  settings.target_modules)
        objective = NullSpaceObjective(adapters, engine.modules, targets, engine.device)
        check_targets_move(engine, adapters, paths, targets, names[0])
    examples = {name: example_inputs(engine, name) for name in names} if batch_size == 1 else {}
    pad_id = getattr(engine.model.config, "pad_token_id", None)  # image models have none
    return NscProblem(adapters, engine, paths, targets, objective, examples, 0 if pad_id is None else pad_id)


def check_targets_move(engine, adapters, paths: list[str], targets: list[str], task: str) -> None:
    """An error naming every target whose input no merge coefficient reaches (no LoRA module runs before it,
    as for the first LoRA block's projections): its ratio is a constant, so it could neither be lowered nor
    score a candidate. Found by one forward of one batch of `task`, up to the last target."""
    from loramerge_cli.evaluation.functional import InputRecorder, SidePath

    side_path = SidePath(engine.modules, adapters, paths, engine.device, engine.dtype)
    inputs = engine.prepared[task].batches[0].inputs
    with torch.enable_grad(), side_path.installed(), model_inputs_of(task):
        recorded = InputRecorder(engine.modules, targets, stop=True).run(engine.model, inputs)
    fixed = [path for path in targets if not recorded[path].requires_grad]
    if fixed:
        raise LoramergeError(f"NSC: no merge coefficient reaches the input of {', '.join(fixed)} (no LoRA module "
                             f"runs before it), so its ratio cannot change; choose later blocks or other modules "
                             f"with --target-blocks and --target-modules")


# --- training ---------------------------------------------------------------------------------------

def train_step(problem: NscProblem, side_path, settings: NscSettings, step: int) -> list[float]:
    """Forward one batch per task, backward each task's loss / K (the same gradient as one backward of
    the mean, with one task's activations alive at a time). Returns the per-task losses."""
    task_count = len(problem.adapters)
    losses = []
    with side_path.installed():
        for index, adapter in enumerate(problem.adapters):
            examples = problem.examples[adapter.name]
            chosen = batch_indices(settings.seed, adapter.name, len(examples), settings.batch_size, step)
            inputs = collate([examples[i] for i in chosen], problem.pad_id)
            with model_inputs_of(adapter.name):
                sums, counts = problem.objective.statistics(problem.engine, index, adapter.name, inputs)
            loss = problem.objective.loss(sums, counts)
            if not torch.isfinite(loss):
                raise LoramergeError(f"NSC: the {problem.objective.name} loss of task {adapter.name} is not finite")
            (loss / task_count).backward()
            losses.append(float(loss.detach()))
    return losses


def train(problem: NscProblem, settings: NscSettings, run_dir: Path | None = None, resume: bool = False,
          on_event: Callable[[str, dict], None] = lambda kind, data: None):
    """AdamW on the coefficients; returns (SidePath, history). Checkpoints every `checkpoint_every` steps."""
    from loramerge_cli.evaluation.functional import SidePath

    engine = problem.engine
    side_path = SidePath(engine.modules, problem.adapters, problem.paths, engine.device, engine.dtype, settings.init)
    optimizer = torch.optim.AdamW([side_path.coefficients], lr=settings.lr, weight_decay=settings.weight_decay)
    step, history = 0, []
    if resume and run_dir is not None and (run_dir / STATE_NAME).is_file():  # else: killed before a checkpoint
        step, history = _load_state(run_dir, side_path, optimizer)
    while step < settings.steps:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        losses = train_step(problem, side_path, settings, step)
        gradient = side_path.coefficients.grad
        if gradient is None or not bool(torch.isfinite(gradient).all()):
            from loramerge_cli.search.nsc_objectives import DIVERGED

            raise LoramergeError(f"NSC: step {step + 1}: the gradient of the coefficients is not finite: {DIVERGED}")
        optimizer.step()
        step += 1
        record = {"step": step, "loss": sum(losses) / len(losses), "task_losses": losses,
                  "seconds": time.perf_counter() - started}
        history.append(record)
        if run_dir is not None and (step % settings.checkpoint_every == 0 or step == settings.steps):
            _save_state(run_dir, step, side_path, optimizer, history)
        on_event("step", {**record, "steps": settings.steps})
    return side_path, history


def _save_state(run_dir: Path, step: int, side_path, optimizer, history: list[dict]) -> None:
    """Coefficients and AdamW moments as safetensors tensors, step, AdamW settings and history as JSON
    metadata, in one file replaced atomically: resuming reads no pickle."""
    run_dir.mkdir(parents=True, exist_ok=True)
    optimizer_state = optimizer.state_dict()
    tensors = {"coefficients": side_path.coefficients.detach().cpu().contiguous()}
    for key, value in optimizer_state["state"].get(0, {}).items():
        tensors[f"adamw.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    metadata = {"step": str(step), "param_groups": json.dumps(optimizer_state["param_groups"]),
                "history": json.dumps(history), "run_id": run_id(run_dir) or ""}
    with atomic.replacing(run_dir / STATE_NAME) as temporary:
        atomic.save_safetensors(tensors, temporary, metadata)
    write_progress(run_dir, None, None, history)


def read_state(path: Path) -> tuple[dict, int, list, list[dict]]:
    """(tensors, step, AdamW param groups, history) of a saved NSC state; anything malformed is one line."""
    from safetensors import SafetensorError

    from loramerge_cli.atomic import read_safetensors, safetensors_metadata

    try:
        tensors, metadata = read_safetensors(path), safetensors_metadata(path)
        step, groups, history = int(metadata["step"]), loads_finite(metadata["param_groups"]), \
            loads_finite(metadata["history"])
        if not isinstance(groups, list) or not isinstance(history, list):
            raise ValueError("param_groups and history must be lists")
        damaged = [key for key, tensor in tensors.items()
                   if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
        if damaged:
            raise ValueError(f"{damaged[0]} holds NaN or Inf")
        if not (isinstance(groups[0] if len(groups) == 1 else None, dict) and groups[0].get("params") == [0]):
            raise ValueError("param_groups is not AdamW's one group of the coefficients")
        if step < 1 or [record.get("step") if isinstance(record, dict) else None for record in history] != \
                list(range(1, step + 1)):
            raise ValueError(f"its history is not one record per step up to its step {step}")
        if any(not is_finite_number(record.get("loss")) for record in history):
            raise ValueError("a record of its history has no loss")
        if set(tensors) != {"coefficients", "adamw.step", "adamw.exp_avg", "adamw.exp_avg_sq"}:
            raise ValueError(f"it holds {', '.join(sorted(tensors))}, not the coefficients and AdamW's step and "
                             "moments")
        if not (tensors["adamw.exp_avg"].shape == tensors["adamw.exp_avg_sq"].shape == tensors["coefficients"].shape
                and tensors["adamw.step"].numel() == 1):
            raise ValueError("AdamW's moments are not of the coefficients' shape")
    except (OSError, KeyError, ValueError, TypeError, SafetensorError, RecursionError) as error:
        raise LoramergeError(f"--resume: {path} is not a readable NSC state ({error})") from None
    return tensors, step, groups, history


def _load_state(run_dir: Path | None, side_path, optimizer) -> tuple[int, list[dict]]:
    path = run_dir / STATE_NAME if run_dir is not None else None
    if path is None or not path.is_file():
        raise LoramergeError(f"--resume: no saved NSC state in {run_dir}")
    tensors, step, groups, history = read_state(path)
    coefficients = tensors.pop("coefficients", None)
    if coefficients is None or tuple(coefficients.shape) != tuple(side_path.coefficients.shape):
        raise LoramergeError(f"--resume: {path} holds coefficients of another shape")
    with torch.no_grad():
        side_path.coefficients.copy_(coefficients)
    fresh = optimizer.state_dict()["param_groups"]  # the run's AdamW settings, as this process made them
    if any(json.loads(json.dumps(fresh[0].get(key))) != groups[0].get(key) for key in ("lr", "betas", "eps",
                                                                                        "weight_decay")):
        raise LoramergeError(f"--resume: {path} holds other AdamW settings than this run's: start a new run")
    moments = {key.removeprefix("adamw."): value for key, value in tensors.items()}
    optimizer.load_state_dict({"state": {0: moments}, "param_groups": fresh})
    return step, history


def task_losses(problem: NscProblem, side_path, batch_size: int, limit: int | None = None) -> list[float]:
    """Each task's objective over its inputs (the first `limit` of them; token-weighted, exact over
    batches), no gradient."""
    from loramerge_cli.search.nsc_objectives import loss_over_batches

    losses = []
    with torch.no_grad(), side_path.installed():
        for index, adapter in enumerate(problem.adapters):
            examples = problem.examples[adapter.name][:limit]
            batches = (collate(examples[start:start + batch_size], problem.pad_id)
                       for start in range(0, len(examples), batch_size))
            losses.append(loss_over_batches(problem.objective, problem.engine, index, adapter.name, batches))
    return losses


def raised_tasks(problem: NscProblem, side_path, settings: NscSettings) -> tuple[dict, list[str]]:
    """Per-task objective at the start (every coefficient = init) and with the learned coefficients, and
    a warning for each task whose objective rose: the loss is a mean over tasks, so it can buy lower values
    on some tasks with a higher one on another, and that task's accuracy tends to fall with it."""
    learned = side_path.coefficients.detach().clone()
    end = task_losses(problem, side_path, settings.batch_size, CHECK_EXAMPLES)
    with torch.no_grad():
        side_path.coefficients.fill_(settings.init)
        start = task_losses(problem, side_path, settings.batch_size, CHECK_EXAMPLES)
        side_path.coefficients.copy_(learned)
    names = [adapter.name for adapter in problem.adapters]
    elsewhere = ", or measure the ratio elsewhere (--target-modules, --target-blocks)" \
        if settings.objective == "nsc" else ""
    warnings = [f"the {settings.objective} loss of task {name} rose under the learned coefficients "
                f"({before:.4f} -> {after:.4f}): the mean over tasks may have traded that task's accuracy for "
                f"the others'; check on labelled data{elsewhere}"
                for name, before, after in zip(names, start, end) if round(after, 4) > round(before, 4)]
    # (a rise below the shown precision is rounding: 2.28708992 -> 2.28709126 is no trade)
    examples = {name: min(CHECK_EXAMPLES, len(problem.examples[name])) for name in names}
    return {"tasks": names, "start": start, "end": end, "examples": examples}, warnings


def unmoved_coefficients(side_path, settings: NscSettings) -> list[str]:
    """A warning when training left every coefficient at --init (an --lr too small to change a float32
    coefficient): the table is then --init everywhere, learned from nothing."""
    with torch.no_grad():
        coefficients = side_path.coefficients[side_path.present]
        unmoved = bool(torch.all(coefficients == torch.tensor(settings.init, dtype=coefficients.dtype)))
    if not unmoved:
        return []
    return [f"no coefficient moved from --init {settings.init:g} in {settings.steps} steps (--lr {settings.lr:g} "
            "too small a step to change them?): the table is --init everywhere"]


# --- end to end -------------------------------------------------------------------------------------

def run_nsc(request, on_event: Callable[[str, dict], None] = lambda kind, data: None):
    """search-mask --strategy nsc: returns (WeightTable, provenance)."""
    from loramerge_cli.masks import WeightTable, adapter_records

    settings: NscSettings = request.nsc
    settings.check()
    run_dir = Path(request.run_dir) if request.run_dir else None
    clock = RunClock(run_dir, request.resume)
    problem = build_nsc_problem(request, report=on_event)
    on_event("nsc_start", {"objective": settings.objective, "targets": problem.targets,
                           "modules": len(problem.paths), "tasks": len(problem.adapters)})

    def on_step(kind: str, data: dict) -> None:
        clock.tick()
        on_event(kind, data)

    side_path, history = train(problem, settings, run_dir, request.resume, on_step)
    per_task, warnings = raised_tasks(problem, side_path, settings)
    warnings = problem.engine.data_warnings() + warnings + unmoved_coefficients(side_path, settings)
    provenance = {
        "loramerge": __version__,
        **started_command(request),
        **searched_data(request),
        **hub_base_record(problem.engine.base),
        "strategy": "nsc",
        "objective": settings.objective,
        "seed": settings.seed,
        "search": asdict(settings),
        "targets": problem.targets,
        "max_length": dict(problem.engine.max_lengths),
        "eval_dtype": problem.engine.settings.dtype,
        "loss": {"first": history[0]["loss"], "last": history[-1]["loss"]},
        "task_losses": per_task,
        "warnings": warnings,
        **clock.provenance(),
        "history": history,
    }
    table = WeightTable(
        tasks=[a.name for a in problem.adapters], units=problem.paths, weights=side_path.table_rows(), unit="module",
        adapters=adapter_records(problem.adapters), scale=1.0,
        provenance=provenance,
    )
    if not any(map(any, table.weights)):  # (merge --mask refuses it: "the merge is empty")
        raise LoramergeError(f"every coefficient NSC learned is 0 (--init {settings.init:g}, --lr {settings.lr:g}: "
                             "too small a step to move them?): the table would merge nothing; nothing written")
    if request.report_test:  # the training engine (its model on the device) goes before the test one loads
        from loramerge_cli.evaluation.engine import release_device_memory

        del problem, side_path
        release_device_memory()
        provenance["test"] = report_on_test(request, table)
    return table, provenance


def report_on_test(request, table) -> dict:
    """Mean normalized test accuracy of the coefficient merge (ta, λ = 1) and of plain ta at its default λ."""
    from loramerge_cli.evaluation.cache import ScoreCache, expert_scores
    from loramerge_cli.evaluation.metrics import mean_defined, normalized_accuracy
    from loramerge_cli.merging.merge import MergeConfig, resolve_config, run_merge
    from loramerge_cli.search.problem import build_problem

    test_request = replace(request, eval=replace(request.eval, split="test", val_limit=None),
                           merge=MergeConfig(merger="ta"))
    problem = build_problem(test_request)
    experts = expert_scores(problem.engine, ScoreCache(request.run_dir))
    out = {"experts_test_accuracy": experts}
    for label, lam, weights in (("ta_default", None, None), ("coefficients", 1.0, table)):
        settings = resolve_config(MergeConfig(merger="ta", lam=lam), len(problem.adapters), weights)
        scores = problem.engine.score_merged(run_merge(problem.adapters, settings, weights))
        out[f"{label}_mean_normalized_accuracy"] = mean_defined(normalized_accuracy(scores, experts)[0])
        out[f"{label}_test_accuracy"] = scores
    return out
