"""The in-memory form of a LoRA adapter: factors per module, scale kept apart, heads, provenance."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from loramerge_cli.adapters.units import unit_of


@dataclass
class LoraModule:
    """One LoRA-adapted weight. ΔW = scale · B @ A, in (d_out, d_in) orientation.

    For GPT-2 style Conv1D (`fan_in_fan_out`) the base weight is stored (d_in, d_out); the factors
    here are still in Linear orientation and the update is transposed only when touching W0.
    """

    path: str
    lora_A: torch.Tensor  # (r, d_in)
    lora_B: torch.Tensor  # (d_out, r), raw: the scale is not folded in
    scale: float
    alpha: float
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.lora_B.shape[0]), int(self.lora_A.shape[1])

    @property
    def unit(self) -> str | None:
        return unit_of(self.path)

    def factors(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """(B̃, A) in `dtype`, with the scale folded into B̃."""
        return self.lora_B.to(dtype) * self.scale, self.lora_A.to(dtype)

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense update ΔW = B̃ A, (d_out, d_in). Only for tests, references and small modules."""
        scaled_B, A = self.factors(dtype)
        return scaled_B @ A


@dataclass
class AdapterSource:
    """Where an adapter came from, resolved to local files."""

    spec: str  # what the user wrote
    kind: str  # "dir", "file" or "hub"
    weights_file: str  # local path of the weights file
    config_file: str | None
    sha256: str
    repo_id: str | None = None
    revision: str | None = None  # resolved commit for Hub sources
    # how the adapter was changed in memory since it was read (a weight table applied), and the sha256 of its
    # tensors then (content_sha256): what tables, run directories and caches identify it by, not the file's
    modified: str | None = None
    modified_sha256: str | None = None

    @property
    def local_path(self) -> str:
        """The local folder (kind "dir") or file ("file") the spec named, absolute: where a recipe or a record
        finds it from any folder, after a chdir too."""
        return os.path.dirname(self.weights_file) if self.kind == "dir" else self.weights_file

    @property
    def identity(self) -> str:
        """The sha256 that identifies these weights: the file's, or the tensors' once changed in memory."""
        return self.modified_sha256 or self.sha256

    def hub_record(self) -> dict:
        """A Hub adapter's `repo_id` and `revision` (the commit read, whatever branch or tag named it); {} else."""
        return {"repo_id": self.repo_id, "revision": self.revision} if self.repo_id else {}

    def describe(self) -> dict:
        """For provenance: the file read (its sha256) and, if so, how it was changed in memory."""
        out = {"source": self.spec, "kind": self.kind, "sha256": self.sha256, **self.hub_record()}
        if self.modified:
            out.update(modified=self.modified, modified_sha256=self.modified_sha256)
        return out


@dataclass
class Adapter:
    """A LoRA adapter: its modules (sorted by path), task heads and PEFT config."""

    name: str
    source: AdapterSource
    config: dict
    modules: dict[str, LoraModule]
    heads: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save tensors by key
    # base weights PEFT saved beside the factors (save_embedding_layers: the input and output embeddings), by the
    # base's parameter name (`lm_head.weight`): the base's own unless its vocabulary was resized
    base_copies: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None

    @property
    def dtype(self) -> torch.dtype | None:
        """The factors' dtype; None for an adapter a weight table left without modules."""
        module = next(iter(self.modules.values()), None)
        return None if module is None else module.lora_A.dtype

    @property
    def units(self) -> list[str]:
        return sorted({m.unit for m in self.modules.values() if m.unit is not None})

    @property
    def head_modules(self) -> list[str]:
        """Module names of the heads as `modules_to_save` names them: the config's names that hold head
        tensors (a head of several layers, RoBERTa's `classifier`, is one name: PEFT cannot load its layers
        listed one by one), and the module of every tensor no such name holds."""
        owners = {key.rsplit(".", 1)[0] for key in self.heads}
        listed = [name for name in self.config.get("modules_to_save") or [] if isinstance(name, str) and name]

        def holds(name: str, owner: str) -> bool:  # a name holding a dotted part of the path (`classifier` holds
            return f".{owner}.".find(f".{name}.") >= 0  # `classifier.dense`, not `pre_classifier`)

        names = {name for name in listed if any(holds(name, owner) for owner in owners)}
        names |= {owner for owner in owners if not any(holds(name, owner) for name in names)}
        return sorted(names)


def head_class_count(head: dict[str, torch.Tensor]) -> int | None:
    """The classes a head predicts: the rows of its one 2-D weight, or of its one non-square one (a head of
    several layers: RoBERTa's `classifier.dense` + `classifier.out_proj`, DistilBERT's `pre_classifier` +
    `classifier`); None when no single matrix says it."""
    matrices = [value for key, value in head.items() if key.endswith("weight") and value.dim() == 2]
    if len(matrices) > 1:
        matrices = [value for value in matrices if value.shape[0] != value.shape[1]]
    return int(matrices[0].shape[0]) if len(matrices) == 1 else None


def saved_whole(names, owner: str) -> bool:
    """PEFT wraps module `owner`, or a module above it, in a ModulesToSaveWrapper for these `modules_to_save`
    names: its rule is a plain suffix match of the module's path (`classifier` wraps `pre_classifier` too)."""
    parts = owner.split(".")
    return any(".".join(parts[:end]).endswith(name) for name in names for end in range(1, len(parts) + 1))


def content_sha256(adapter: Adapter) -> str:
    """sha256 of what fixes an adapter's outputs, from the tensors themselves: each module's path, scale,
    orientation and factors, and the heads (the config's other settings are refused on reading or only name
    things: the writer lists target modules in full). lora_B is hashed in lora_A's dtype, as the writer stores
    it by default, so an adapter pruned in memory (lora_B × weight, kept in float64) hashes as its written copy
    (float16 copies are rebalanced: they do not)."""
    import hashlib

    digest = hashlib.sha256(b"loramerge.content/v2")
    tensors = [(f"{path}|{m.scale!r}|{m.fan_in_fan_out}", (m.lora_A, m.lora_B.to(m.lora_A.dtype)))
               for path, m in sorted(adapter.modules.items())]
    tensors += [(f"head|{key}", (tensor,)) for key, tensor in sorted(adapter.heads.items())]
    for name, parts in tensors:
        digest.update(name.encode())
        for tensor in parts:
            flat = tensor.detach().to("cpu").contiguous()
            digest.update(f"|{flat.dtype}|{tuple(flat.shape)}|".encode())
            digest.update(flat.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
