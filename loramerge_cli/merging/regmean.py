"""RegMean for LoRA updates (Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language
Models, arXiv:2212.09849): the update whose outputs are closest, in least squares, to every task's own
outputs on that task's inputs.

For one linear module with task updates ΔW_t = B̃_t A_t and input Gram matrices G_t = X_tᵀX_t / N_t
(the task's inputs to this module, through its own expert), RegMean solves
min_W Σ_t ‖X_t W − X_t ΔW_tᵀ‖² = Σ_t tr((W − ΔW_t) G_t (W − ΔW_t)ᵀ), whose solution is
ΔW = (Σ_t ΔW_t G̃_t)(Σ_t G̃_t)⁻¹ with G̃_t = α G_t + (1 − α) diag(G_t) (α < 1 shrinks the off-diagonal
entries, the paper's regularisation). The shared W0 drops out (its own RegMean is W0), and the result is
exactly low rank: [B̃_1 … B̃_T] · [A_1 G̃_1; …; A_T G̃_T] (Σ G̃_t)⁻¹, of rank ≤ Σ r_t.
"""

from __future__ import annotations

import torch

from loramerge_cli.errors import LoramergeError
from loramerge_cli.merging.lowrank import LowRank


def shrunk(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """α G + (1 − α) diag(G)."""
    return gram * alpha + torch.diag(torch.diagonal(gram)) * (1.0 - alpha)


def regmean(tasks: list[LowRank], grams: list[torch.Tensor], alpha: float) -> LowRank:
    """The RegMean merge of factored task updates (m×n each) given each task's n×n input Gram matrix.
    A singular Σ G̃_t (an input feature no task ever uses) is inverted on its range (pseudo-inverse)."""
    if len(grams) != len(tasks):
        raise LoramergeError(f"RegMean: {len(grams)} Gram matrices for {len(tasks)} tasks")
    dtype = tasks[0].right.dtype
    shrunk_grams = [shrunk(gram.to(dtype), alpha) for gram in grams]
    total = torch.stack(shrunk_grams).sum(dim=0)
    right = torch.cat([task.right @ gram for task, gram in zip(tasks, shrunk_grams)])
    inverse = torch.linalg.pinv(total, hermitian=True)
    return LowRank(torch.cat([task.left for task in tasks], dim=1), right @ inverse)
