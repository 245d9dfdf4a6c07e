"""Random adapters built in memory, for kernel and merge tests."""

from __future__ import annotations

import json

import torch

from loramerge_cli.adapters.model import Adapter, AdapterSource, LoraModule


def random_adapter(
    name: str,
    shapes: dict[str, tuple[int, int]],
    rank: int | dict[str, int] = 3,
    alpha: float = 5.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    base_model: str | None = "tiny/base",
) -> Adapter:
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for path, (d_out, d_in) in shapes.items():
        r = rank[path] if isinstance(rank, dict) else rank
        A = torch.randn(r, d_in, generator=generator, dtype=dtype)
        B = torch.randn(d_out, r, generator=generator, dtype=dtype)
        modules[path] = LoraModule(path, A, B, scale=alpha / r, alpha=alpha)
    source = AdapterSource(spec=name, kind="dir", weights_file="", config_file=None, sha256=f"sha-{name}-{seed}")
    config = {"peft_type": "LORA", "base_model_name_or_path": base_model}
    return Adapter(name, source, config, dict(sorted(modules.items())), {})


def attention_shapes(blocks: int = 2, m: int = 20, n: int = 24) -> dict[str, tuple[int, int]]:
    return {
        f"model.layers.{b}.self_attn.{proj}": (m, n) for b in range(blocks) for proj in ("q_proj", "v_proj")
    }


def write_peft_folder(
    folder,
    adapter: Adapter,
    config_updates: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
):
    """Write an in-memory adapter as a real PEFT folder (adapter_config.json + adapter_model.safetensors).

    Keys are PEFT's (`base_model.model.<path>.lora_A.weight`), B is stored raw with r / lora_alpha (and
    rank_pattern / alpha_pattern for the other modules) giving back each module's scale. Independent of
    loramerge's writer, so tests of the writer are not circular.
    """
    from collections import Counter
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    modules = adapter.modules
    r = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = next(m.alpha for m in modules.values() if m.rank == r)
    config = {
        "peft_type": "LORA",
        "task_type": adapter.config.get("task_type"),
        "base_model_name_or_path": adapter.base_model,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(modules),
        "rank_pattern": {p: m.rank for p, m in modules.items() if m.rank != r},
        "alpha_pattern": {p: m.alpha for p, m in modules.items() if m.rank != r or m.alpha != alpha},
        "use_rslora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": adapter.head_modules or None,
    }
    config.update(config_updates or {})
    tensors = {}
    for path, module in modules.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = module.lora_A.contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = module.lora_B.contiguous()
    for key, tensor in adapter.heads.items():
        tensors[f"base_model.model.{key}"] = tensor.contiguous()
    tensors.update(extra_tensors or {})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def write_task_folders(root, names=("a", "b", "c"), blocks: int = 3, seed: int = 0, head: bool = True) -> dict:
    """PEFT folders of float32 random adapters with mixed ranks, α ≠ r, a module outside any block and
    (optionally) a `score` head per task: {name: folder}."""
    from pathlib import Path

    shapes = attention_shapes(blocks=blocks, m=12, n=10)
    shapes["pooler.dense"] = (6, 10)
    folders = {}
    for index, name in enumerate(names):
        adapter = random_adapter(name, shapes, rank=2 + index, alpha=3.0 + index, seed=seed + index,
                                 dtype=torch.float32)
        if head:
            generator = torch.Generator().manual_seed(100 + seed + index)
            adapter.heads = {"score.weight": torch.randn(3, 10, generator=generator)}
        adapter.config["task_type"] = "SEQ_CLS"
        folders[name] = write_peft_folder(Path(root) / name, adapter)
    return folders


def invoke_cli(args):
    """Run the loramerge CLI in-process (CliRunner); returns click's Result (stdout, stderr, exit_code)."""
    from typer.testing import CliRunner

    from loramerge_cli.cli.app import app

    return CliRunner().invoke(app, [str(arg) for arg in args])


def merge_config(**settings):
    """A MergeConfig from flat keyword settings: MergeConfig's own fields, the other method parameters in `params`."""
    from loramerge_cli.merging.config import SETTINGS, MergeConfig

    fields = {name: value for name, value in settings.items() if name in SETTINGS or name == "compute_dtype"}
    return MergeConfig(**fields, params={name: value for name, value in settings.items() if name not in fields})


def run_or_stop(search, stop_after: int | None = None, resume: bool = False):
    """(best, search): a search run to its end (or resumed), or (None, search) started and stopped after
    `stop_after` steps, as a killed run would be."""
    if stop_after is None:
        return search.run(resume=resume), search
    search.start()
    for _ in range(stop_after):
        search.step()
    return None, search


def run_until_killed(script: str) -> None:
    """Run `script` (indented lines that end with the process sending itself SIGKILL) in a fresh interpreter
    with the tests folder importable; asserts it died of that signal."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    prelude = f"import os, signal, sys\nsys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
    process = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)], capture_output=True,
                             env={**os.environ, "PYTHONHASHSEED": "0"})
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()
