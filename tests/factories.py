"""Random adapters built in memory, for kernel and merge tests."""

from __future__ import annotations

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
