"""Label-free objectives of merge coefficients: the NSC null-space ratio (docs/algorithms.md, NSC) and the
AdaMerging baseline (mean prediction entropy). Pure tensor functions first, then the objectives.

An objective gives, per task and batch, statistics (`sums`, `counts`) that `loss` turns into the task's
loss, so a loss over many batches is exact (a token-weighted mean), not a mean of batch means.
"""

from __future__ import annotations

import torch

from loramerge_cli.errors import LoramergeError
from loramerge_cli.evaluation.functional import InputRecorder
from loramerge_cli.search.nsc_targets import HINT

MIN_NORM = 1e-12  # rows with ‖z‖ below this carry no direction and are skipped
DIVERGED = "the training diverged; give a smaller --lr or --init"  # what every blow-up of the coefficients says


def inverse_gram(A: torch.Tensor) -> torch.Tensor:
    """(A Aᵀ + δI)⁻¹ in float64 for an unscaled A (r × n), δ = 1e-8 · max diag(A Aᵀ)."""
    A = A.to(torch.float64)
    gram = A @ A.T
    delta = 1e-8 * float(gram.diagonal().max()) if gram.numel() else 0.0
    gram = gram + delta * torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(gram))


def null_space_ratio(z: torch.Tensor, A: torch.Tensor, gram_inverse: torch.Tensor) -> torch.Tensor:
    """ω = ‖z − Aᵀ G⁻¹ A z‖ / ‖z‖ per row of z (N × n): the share of z outside A's row space.

    Computed in float32 or better whatever the input dtype (autocast off), as the residual norm: it
    equals sqrt(max(0, 1 − yᵀG⁻¹y/‖z‖²)) with y = A z, but is never negative, loses no digits when z
    lies almost in the row space, and errs O(δ²) instead of O(δ) for the regularised G.
    """
    dtype = torch.promote_types(z.dtype, torch.float32)
    with torch.autocast(z.device.type, enabled=False):
        z = z.to(dtype)
        A, gram_inverse = A.to(dtype), gram_inverse.to(dtype)
        projected = ((z @ A.T) @ gram_inverse) @ A
        residual = torch.linalg.vector_norm(z - projected, dim=-1)
        return residual / torch.linalg.vector_norm(z, dim=-1)


def prediction_entropy(logits: torch.Tensor, masked_labels: list[int] = ()) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) per row, over the classes the task uses."""
    if masked_labels:
        keep = [c for c in range(logits.shape[-1]) if c not in set(masked_labels)]
        logits = logits[..., keep]
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def token_rows(z: torch.Tensor, token_mask: torch.Tensor | None, path: str) -> torch.Tensor:
    """The rows of a module input (…, n) that are real tokens (padding dropped). A model that flattens batch and
    tokens before a module (OPT's fc1 and fc2: (batch·tokens, n)) gives one row per token, in the mask's order."""
    if token_mask is None:
        return z.reshape(-1, z.shape[-1])
    if z.dim() == 2 and z.shape[0] == token_mask.numel():
        return z[token_mask.reshape(-1)]
    if tuple(token_mask.shape) != tuple(z.shape[:-1]):
        raise LoramergeError(f"NSC: the input of {path} ({tuple(z.shape)}) does not line up with the attention mask")
    return z[token_mask]


def loss_over_batches(objective, engine, task_index: int, task: str, batches) -> float:
    """One task's loss over several batches of inputs: the statistics summed, then the objective's `loss`
    (exact, token-weighted; not a mean of batch means)."""
    from loramerge_cli.evaluation.batches import model_inputs_of

    sums, counts = 0.0, 0.0
    for inputs in batches:
        with model_inputs_of(task):
            batch_sums, batch_counts = objective.statistics(engine, task_index, task, inputs)
        sums, counts = sums + batch_sums.double(), counts + batch_counts
    return float(objective.loss(sums, counts))


class NullSpaceObjective:
    """Mean null-space ratio of each task's own A_k at the targeted modules, on the task's own inputs."""

    name = "nsc"

    def __init__(self, adapters, modules: dict, targets: list[str], device):
        self.targets = targets
        self.recorder = InputRecorder(modules, targets, stop=True)
        self.factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        for adapter in adapters:
            own = {}
            for path in targets:
                module = adapter.modules.get(path)
                if module is not None:
                    # unscaled (the reference's quirk: docs/differences.md)
                    A = module.lora_A.to(device=device, dtype=torch.float32)
                    own[path] = (A, inverse_gram(module.lora_A).to(device))
            if not own:
                raise LoramergeError(f"NSC: adapter {adapter.name!r} has none of the targeted modules {targets}; "
                                     f"{HINT}")
            self.factors.append(own)

    def statistics(self, engine, task_index: int, task: str, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ ω, count) per targeted module of task `task_index`'s own, for one batch."""
        recorded = self.recorder.run(engine.model, inputs)
        mask = inputs.get("attention_mask")
        mask = mask.bool() if mask is not None else None
        sums, counts = [], []
        for path, (A, gram_inverse) in self.factors[task_index].items():
            rows = token_rows(recorded[path], mask, path)
            norms = torch.linalg.vector_norm(rows.detach().float(), dim=-1)
            if not bool(torch.isfinite(norms).all()):  # else they would fail the norm test, and read as padding
                raise LoramergeError(f"NSC: the activations at {path} are not finite (coefficients grew past the "
                                     f"model's range): {DIVERGED}")
            kept = rows[norms >= MIN_NORM]
            if rows.shape[0] and not kept.shape[0]:  # tokens there, each one's activation gone to (near) zero
                raise LoramergeError(f"NSC: every activation at {path} vanished (norms below {MIN_NORM:g}) under "
                                     f"the coefficients: {DIVERGED}")
            rows = kept
            sums.append(null_space_ratio(rows, A, gram_inverse).sum())
            counts.append(rows.shape[0])
        return torch.stack(sums), torch.tensor(counts, dtype=torch.float64)

    @staticmethod
    def loss(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """(1/|J_k|) Σ_j mean over tokens of ω_k^j."""
        if bool((counts == 0).any()):
            raise LoramergeError("NSC: a batch has no non-padding token at a targeted module")
        return (sums / counts.to(sums)).mean()  # counts live on the CPU, sums on the model's device


class EntropyObjective:
    """AdaMerging: mean entropy of each task's predictions with its own head (classification tasks)."""

    name = "entropy"

    def __init__(self, task_file):
        if not task_file.type.classifier:
            raise LoramergeError("--objective entropy needs classification tasks (model_type causal-lm has none)")
        self.masked = {task.name: list(task.masked_labels) for task in task_file.tasks}

    def statistics(self, engine, task_index: int, task: str, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        engine.use_head(task)
        entropy = prediction_entropy(engine.model(**inputs).logits, self.masked[task])
        return entropy.sum().reshape(1), torch.tensor([float(entropy.shape[0])], dtype=torch.float64)

    @staticmethod
    def loss(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return (sums / counts.to(sums)).mean()
