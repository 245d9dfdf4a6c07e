"""Plain dense float64 reference implementations of every merger (docs/algorithms.md), for tests and benchmarks.

Written independently of `loramerge_cli.merging`: every update is a dense m×n matrix, every basis a
dense SVD (of the m × T·n concatenation for KnOTS), trimming sorts, election and means loop over
columns. Conventions shared with the library (docs/algorithms.md, Spaces): ε-rank = #σ > 1e-6·σ_max; each singular
pair (u_i, v_i) is flipped so that the largest-magnitude entry of u_i is positive (lowest index on a
tie); weights multiply B̃_t (hence ΔW_t) before anything else; DARE keeps an entry where a float32
`torch.rand` draw from a CPU generator seeded by sha256(f"{seed}|{task}|{module}")[:8] (big-endian)
is >= p.
"""

from __future__ import annotations

import hashlib

import torch

EPS = 1e-6


# ---------------------------------------------------------------- SVD conventions


def flip_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make the largest-|·| entry of each column of U positive (first such entry on ties), flip V along."""
    U, V = U.clone(), V.clone()
    for i in range(U.shape[1]):
        column = U[:, i].abs()
        top = int(torch.nonzero(column == column.max())[0])
        if U[top, i] < 0:
            U[:, i] = -U[:, i]
            V[:, i] = -V[:, i]
    return U, V


def dense_svd(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (m×q), S (q), V (n×q) of the ε-rank components of a dense matrix, canonical signs."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    q = 0 if S.numel() == 0 or S[0] <= 0 else int((S > EPS * S[0]).sum())
    U, V = flip_signs(U[:, :q], Vh[:q].T)
    return U, S[:q], V


# ---------------------------------------------------------------- kernels


def trim_rows(X: torch.Tensor, density: float, present: torch.Tensor | None = None) -> torch.Tensor:
    """Keep k = max(1, ⌊D·κ + 0.5⌋) largest |x| per row among the present entries; sort-based."""
    values = X.tolist()
    flags = present.tolist() if present is not None else None
    kept = [[0.0] * X.shape[1] for _ in values]
    for t, row in enumerate(values):
        indices = [i for i in range(len(row)) if flags is None or flags[t][i]]
        if not indices:
            continue
        k = len(indices) if density >= 1.0 else max(1, int(len(indices) * density + 0.5))
        for i in sorted(indices, key=lambda i: (-abs(row[i]), i))[:k]:
            kept[t][i] = row[i]
    return torch.tensor(kept, dtype=X.dtype).reshape(X.shape)


def ties_rows(X: torch.Tensor, density: float, present: torch.Tensor | None = None) -> torch.Tensor:
    """Trim, elect the sign by mass (zero → majority of the elected signs, then +1), disjoint mean."""
    columns = list(zip(*trim_rows(X, density, present).tolist()))
    signs = [1.0 if sum(c) > 0 else -1.0 if sum(c) < 0 else 0.0 for c in columns]
    fallback = -1.0 if sum(signs) < 0 else 1.0
    out = []
    for column, sign in zip(columns, signs):
        sign = sign or fallback
        agreeing = [x for x in column if x != 0 and (x > 0) == (sign > 0)]
        out.append(sum(agreeing) / len(agreeing) if agreeing else 0.0)
    return torch.tensor(out, dtype=X.dtype)


def dare_mask(shape, drop_rate: float, seed: int, task: str, module: str) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}|{task}|{module}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big"))
    return torch.rand(shape, generator=generator, dtype=torch.float32) >= drop_rate


def dare(X: torch.Tensor, drop_rate: float, seed: int, task: str, module: str) -> torch.Tensor:
    if drop_rate == 0.0:
        return X.clone()
    return torch.where(dare_mask(X.shape, drop_rate, seed, task, module), X / (1.0 - drop_rate), 0.0)


def polar(M: torch.Tensor) -> torch.Tensor:
    P, _, Qh = torch.linalg.svd(M, full_matrices=False)
    return P @ Qh


def tsv(tasks: list[torch.Tensor]) -> torch.Tensor:
    """Per-task dense SVDs, k_t = ε-rank (or min(⌊min(m,n)/T⌋, ε-rank) when Σ exceeds min(m,n))."""
    m, n = tasks[0].shape
    svds = [dense_svd(X) for X in tasks]
    ranks = [S.numel() for _, S, _ in svds]
    if sum(ranks) > min(m, n):
        ranks = [min(min(m, n) // len(tasks), r) for r in ranks]
    U_hat = torch.cat([U[:, :k] for (U, _, _), k in zip(svds, ranks)], dim=1)
    S_hat = torch.cat([S[:k] for (_, S, _), k in zip(svds, ranks)])
    V_hat = torch.cat([V[:, :k] for (_, _, V), k in zip(svds, ranks)], dim=1)
    if U_hat.shape[1] == 0:
        return torch.zeros(m, n, dtype=tasks[0].dtype)
    return polar(U_hat) @ torch.diag(S_hat) @ polar(V_hat).T


def isotropize(X: torch.Tensor) -> torch.Tensor:
    U, S, V = dense_svd(X)
    if S.numel() == 0:
        return torch.zeros_like(X)
    return S.mean() * U @ V.T


# ---------------------------------------------------------------- spaces


def to_space(space: str, factors: list[tuple[torch.Tensor, torch.Tensor]], knots_scaled: bool = False):
    """(task tensors in the space, function mapping a merged tensor back to a dense ΔW)."""
    deltas = [B @ A for B, A in factors]
    if space == "full":
        return deltas, lambda merged: merged
    if space == "knots":
        n = deltas[0].shape[1]
        U, S, V = dense_svd(torch.cat(deltas, dim=1))
        blocks = [V[t * n : (t + 1) * n].T for t in range(len(deltas))]  # q×n each
        if knots_scaled:
            return [S[:, None] * block for block in blocks], lambda merged: U @ merged
        return blocks, lambda merged: U @ torch.diag(S) @ merged
    if space == "core":
        U_B, _, _ = dense_svd(torch.cat([B for B, _ in factors], dim=1))
        _, _, V_A = dense_svd(torch.cat([A for _, A in factors], dim=0))
        return [U_B.T @ X @ V_A for X in deltas], lambda merged: U_B @ merged @ V_A.T
    raise ValueError(space)


# ---------------------------------------------------------------- whole merges

ELEMENTWISE = ("ties", "magnitude", "dare", "dare_ties")


def combine(method: str, rows: torch.Tensor, density: float, present=None) -> torch.Tensor:
    """Elementwise methods on a (T × D) matrix whose rows are already DARE'd where needed."""
    if method in ("ties", "dare_ties"):
        return ties_rows(rows, density, present)
    if method == "magnitude":
        return trim_rows(rows, density, present).sum(dim=0)
    if method == "dare":
        return rows.sum(dim=0)
    raise ValueError(method)


def spectral(method: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    if method == "ta":
        return sum(tensors)
    if method == "tsv":
        return tsv(tensors)
    if method == "iso_c":
        return isotropize(sum(tensors))
    if method == "tsv_iso":
        return isotropize(tsv(tensors))
    raise ValueError(method)


def retained(adapters, path, weights, table) -> list[tuple[int, float]]:
    """(task index, weight) for the tasks that keep a nonzero weight on this module."""
    out = []
    for t, adapter in enumerate(adapters):
        if path not in adapter.modules:
            continue
        w = weights[t] * (table.weight(t, path) if table is not None else 1.0)
        if w != 0.0:
            out.append((t, w))
    return out


def reference_merge(
    adapters,
    method: str,
    space: str = "full",
    lam: float = 1.0,
    weights: list[float] | None = None,
    table=None,
    density: float = 1.0,
    drop_rate: float = 0.0,
    scope: str = "module",
    knots_scaled: bool = False,
    seed: int = 1,
) -> dict[str, torch.Tensor]:
    """Dense λ·ΔW per module path; modules every task left are absent."""
    weights = weights or [1.0] * len(adapters)
    paths = sorted({p for a in adapters for p in a.modules})
    active = {p: retained(adapters, p, weights, table) for p in paths}
    active = {p: tasks for p, tasks in active.items() if tasks}
    spaces = {}
    for path, tasks in active.items():
        factors = []
        for t, w in tasks:
            module = adapters[t].modules[path]
            factors.append((module.scale * w * module.lora_B.double(), module.lora_A.double()))
        tensors, back = to_space(space, factors, knots_scaled)
        if method in ("dare", "dare_ties"):
            tensors = [dare(X, drop_rate, seed, adapters[t].name, path) for X, (t, _) in zip(tensors, tasks)]
        spaces[path] = (tensors, back)
    out = {}
    if method not in ELEMENTWISE:
        for path, (tensors, back) in spaces.items():
            out[path] = lam * back(spectral(method, tensors))
        return out
    if scope == "module":
        for path, (tensors, back) in spaces.items():
            merged = combine(method, torch.stack([X.reshape(-1) for X in tensors]), density)
            out[path] = lam * back(merged.reshape(tensors[0].shape))
        return out
    # scope adapter: one row per task over all modules in sorted path order, absent entries excluded
    T = len(adapters)
    blocks, masks = [], []
    for path, (tensors, _) in spaces.items():
        width = tensors[0].numel()
        block = torch.zeros(T, width, dtype=torch.float64)
        mask = torch.zeros(T, width, dtype=torch.bool)
        for X, (t, _) in zip(tensors, active[path]):
            block[t] = X.reshape(-1)
            mask[t] = True
        blocks.append(block)
        masks.append(mask)
    merged = combine(method, torch.cat(blocks, dim=1), density, torch.cat(masks, dim=1))
    start = 0
    for path, (tensors, back) in spaces.items():
        width = tensors[0].numel()
        out[path] = lam * back(merged[start : start + width].reshape(tensors[0].shape))
        start += width
    return out


def optimal_truncation(X: torch.Tensor, rank: int) -> torch.Tensor:
    """Eckart–Young: the best rank-`rank` approximation of X."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
