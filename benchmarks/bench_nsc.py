"""NSC benchmark: step time and peak memory of the NSC objective and of the entropy objective (AdaMerging)
on one copy of a Llama-style base, against one LoRA model's forward + backward on the same batch.

Run by hand (never from the tests):

    .venv/bin/python benchmarks/bench_nsc.py --json bench_nsc.json
    .venv/bin/python benchmarks/bench_nsc.py --hidden 1024 --layers 16 --device cuda

Each measurement runs in a fresh subprocess. Peak memory is what the steps needed above the memory the
process held once the model and adapters were built: on CUDA max_memory_allocated; on CPU the peak RSS
(VmHWM, reset through /proc/self/clear_refs after setup; ru_maxrss where that is unavailable), measured in
a second process whose glibc allocator returns freed memory at once (with the default one, the peak RSS
says more about what malloc kept cached than about what a step needs: 0.6× to 2.0× across identical runs). The
target is NSC peak ≤ 1.3 × the single LoRA model's (the issue's memory criterion).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loramerge_cli.adapters.model import Adapter, AdapterSource, LoraModule  # noqa: E402
from loramerge_cli.evaluation.functional import SidePath, freeze  # noqa: E402
from loramerge_cli.evaluation.task_types import TASK_TYPES  # noqa: E402
from loramerge_cli.merging.merge import module_paths  # noqa: E402
from loramerge_cli.search.nsc_objectives import EntropyObjective, NullSpaceObjective  # noqa: E402
from loramerge_cli.search.nsc_targets import resolve_targets  # noqa: E402

PHASES = ("nsc", "entropy", "lora")


def build_model(args):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         max_position_embeddings=args.length, num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config).to(args.device).eval()


def build_adapters(model, args) -> list[Adapter]:
    """`args.tasks` random adapters of rank `args.rank` (α = 2r) on q_proj and v_proj of every block."""
    generator = torch.Generator().manual_seed(1)
    paths = [name for name, _ in model.named_modules() if name.endswith(("q_proj", "v_proj"))]
    adapters = []
    for task in range(args.tasks):
        modules = {}
        for path in paths:
            weight = model.get_submodule(path).weight
            A = torch.randn(args.rank, weight.shape[1], generator=generator) / weight.shape[1] ** 0.5
            B = torch.randn(weight.shape[0], args.rank, generator=generator) * 0.01
            modules[path] = LoraModule(path, A, B, scale=2.0, alpha=2.0 * args.rank)
        source = AdapterSource(f"task{task}", "dir", "", None, f"sha{task}")
        adapters.append(Adapter(f"task{task}", source, {"peft_type": "LORA"}, dict(sorted(modules.items()))))
    return adapters


def batch(args, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 1000, (args.batch, args.length), generator=generator)
    mask = torch.ones_like(ids)
    mask[: args.batch // 2, args.length // 2:] = 0  # half the rows padded to half length
    return {"input_ids": ids.to(args.device), "attention_mask": mask.to(args.device)}


class SavedActivations:
    """Bytes autograd saves for backward in one forward (distinct storages), model and factor tensors excluded:
    the activation memory a method needs, measured exactly whatever the allocator does."""

    def __init__(self, fixed_tensors):
        self.fixed = {t.untyped_storage().data_ptr() for t in fixed_tensors}
        self.peak = 0
        self.storages: dict[int, int] = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.fixed:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor.detach()  # the tensor itself would tie its graph in a cycle gc cannot see

    def forward(self):
        """Context of one forward: records what it saves; `backward_done()` closes the count."""
        self.storages = {}
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    def backward_done(self) -> None:
        self.peak = max(self.peak, sum(self.storages.values()))


def nsc_like_step(args, objective_name: str):
    """Returns (step, SavedActivations) for the NSC or entropy objective: one forward + backward per task."""
    model = build_model(args)
    freeze(model)
    adapters = build_adapters(model, args)
    modules = dict(model.named_modules())
    engine = SimpleNamespace(model=model, use_head=lambda task: None)
    paths = module_paths(adapters)
    side = SidePath(modules, adapters, paths, args.device, torch.float32)
    if objective_name == "nsc":
        targets = resolve_targets(list(model.named_modules()), paths)
        objective = NullSpaceObjective(adapters, modules, targets, args.device)
    else:
        objective = EntropyObjective(SimpleNamespace(model_type="sequence-classification",
                                                     type=TASK_TYPES["sequence-classification"],
                                                     tasks=[SimpleNamespace(name=a.name, masked_labels=[])
                                                            for a in adapters]))
    optimizer = torch.optim.AdamW([side.coefficients], lr=1e-3, weight_decay=0.01)
    inputs = [batch(args, seed) for seed in range(len(adapters))]
    fixed = [*model.parameters(), *model.buffers()]
    fixed += [t for f in side.factors.values() for t in (f.A, f.scaled_B)]
    fixed += [t for own in getattr(objective, "factors", []) for pair in own.values() for t in pair]
    saved = SavedActivations(fixed)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with side.installed():
            for index, adapter in enumerate(adapters):
                with saved.forward():
                    sums, counts = objective.statistics(engine, index, adapter.name, inputs[index])
                    loss = objective.loss(sums, counts) / len(adapters)
                saved.backward_done()
                loss.backward()
        optimizer.step()

    return step, saved


def lora_step(args):
    """One PEFT LoRA model (rank r, q/v), LoRA factors trainable: forward + backward of a batch."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_model(args), LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                         target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    inputs = batch(args, 0)
    labels = torch.zeros(args.batch, dtype=torch.long, device=args.device)
    saved = SavedActivations([*model.parameters(), *model.buffers()])

    def step():
        optimizer.zero_grad(set_to_none=True)
        with saved.forward():
            loss = model(**inputs, labels=labels).loss
        saved.backward_done()
        loss.backward()
        optimizer.step()

    return step, saved


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    step, saved = lora_step(args) if args.phase == "lora" else nsc_like_step(args, args.phase)
    step()  # warm-up (allocator, AdamW state)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        start_memory = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        start_memory = _rss_kib("VmRSS") * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - start_memory
    else:
        high = _rss_kib("VmHWM")
        peak = (high * 1024 if high is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        peak -= start_memory
    return {"phase": args.phase, "seconds_per_step": sorted(times)[len(times) // 2], "peak_bytes": max(0, peak),
            "saved_activation_bytes": saved.peak}


def run_phase(phase: str, forwarded: list[str], timing: bool) -> dict:
    """One measurement in a fresh process. For memory on CPU, glibc serves every allocation of 64 KiB or
    more by mmap and gives freed memory back at once, so RSS follows the tensors alive rather than what
    the allocator keeps cached (that costs time: the timing run keeps the default allocator)."""
    environment = {"PYTHONWARNINGS": "ignore::FutureWarning", **os.environ}  # (transformers' deprecation notes)
    if not timing:
        environment.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    done = subprocess.run([sys.executable, __file__, *forwarded, "--phase", phase], stdout=subprocess.PIPE,
                          text=True, env=environment)  # (its stderr is the user's: a failure shows its traceback)
    if done.returncode != 0:
        raise SystemExit(f"the {phase} phase failed (exit {done.returncode}; its error is above)")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from examples.arguments import at_least, output_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=at_least(1), default=256)
    parser.add_argument("--layers", type=at_least(1), default=8)
    parser.add_argument("--length", type=at_least(1), default=64)
    parser.add_argument("--batch", type=at_least(1), default=16, help="examples per task and step (NSC default 16)")
    parser.add_argument("--tasks", type=at_least(1), default=4)
    parser.add_argument("--rank", type=at_least(1), default=16)
    parser.add_argument("--steps", type=at_least(1), default=3, help="timed steps (median reported) after one warm-up")
    parser.add_argument("--threads", type=at_least(1), default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--json", type=output_file, help="also write the results here")
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(measure(args)))
        return
    settings = {key: value for key, value in vars(args).items() if key not in ("json", "phase")}
    forwarded = [part for key, value in settings.items() for part in (f"--{key}", str(value))]
    results = {phase: run_phase(phase, forwarded, timing=True) for phase in PHASES}
    if not args.device.startswith("cuda"):  # CPU: peak RSS from a second run with an allocator that hoards nothing
        for phase in PHASES:
            results[phase]["peak_bytes"] = run_phase(phase, forwarded, timing=False)["peak_bytes"]
    lora_peak = results["lora"]["peak_bytes"] or 1
    lora_saved = results["lora"]["saved_activation_bytes"] or 1
    print(f"{args.tasks} tasks, rank {args.rank}, Llama hidden {args.hidden} × {args.layers} blocks, "
          f"{args.batch} × {args.length} tokens per task and step, {args.device}, {args.threads} thread(s)")
    memory = "peak MiB (GPU)" if args.device.startswith("cuda") else "peak RSS MiB"
    print(f"{'phase':<10}{'s/step':>9}{'s/task':>9}{memory:>16}{'× LoRA':>8}{'saved act. MiB':>16}{'× LoRA':>8}")
    for phase in PHASES:
        row = results[phase]
        row["peak_vs_lora"] = row["peak_bytes"] / lora_peak
        row["saved_vs_lora"] = row["saved_activation_bytes"] / lora_saved
        label = {"nsc": "NSC", "entropy": "entropy", "lora": "1 LoRA"}[phase]
        row["seconds_per_task"] = row["seconds_per_step"] / (1 if phase == "lora" else args.tasks)
        print(f"{label:<10}{row['seconds_per_step']:>9.3f}{row['seconds_per_task']:>9.3f}"
              f"{row['peak_bytes'] / 2**20:>16.1f}{row['peak_vs_lora']:>8.2f}"
              f"{row['saved_activation_bytes'] / 2**20:>16.1f}{row['saved_vs_lora']:>8.2f}")
    print("note: NSC and entropy steps run one forward + backward per task (K of them); 1 LoRA runs one.")
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, "results": results}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    from examples.arguments import run_script

    run_script(main)
