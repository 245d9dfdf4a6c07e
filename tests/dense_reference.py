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
import math
from fractions import Fraction

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


def _count(size: int, fraction: float, rule: str, at_least_one: bool) -> int:
    if rule == "floor":
        return int(size * fraction)
    return max(1 if at_least_one else 0, math.floor(_decimal(fraction) * size + Fraction(1, 2)))


def _decimal(fraction: float) -> Fraction:
    """The fraction as the decimal it is written as (0.29, not 0.28999…): counts are exact in it."""
    return Fraction(repr(float(fraction)))


def trim_rows(X: torch.Tensor, density, present: torch.Tensor | None = None, rule: str = "round",
              gamma: float = 0.0) -> torch.Tensor:
    """Per row, order the present entries by (|x| descending, index ascending); drop the first
    γ-count (breadcrumbs' outliers, 0 when γ = 0) and keep the next k: k = max(1, ⌊D·κ + 0.5⌋)
    ("round") or int(D·κ) ("floor"), all when κ ≥ 1. `density` is one value or one per row."""
    values = X.tolist()
    flags = present.tolist() if present is not None else None
    densities = list(density) if isinstance(density, (list, tuple)) else [density] * len(values)
    kept = [[0.0] * X.shape[1] for _ in values]
    for t, row in enumerate(values):
        indices = [i for i in range(len(row)) if flags is None or flags[t][i]]
        if not indices:
            continue
        k = len(indices) if densities[t] >= 1.0 else _count(len(indices), densities[t], rule, True)
        top = _count(len(indices), gamma, rule, False) if gamma > 0 else 0
        for i in sorted(indices, key=lambda i: (-abs(row[i]), i))[top : top + k]:
            kept[t][i] = row[i]
    return torch.tensor(kept, dtype=X.dtype).reshape(X.shape)


def elect_merge_rows(trimmed: torch.Tensor, consensus="mass", normalize="count", elect_on="weighted",
                     weights=None) -> torch.Tensor:
    """Elect per column (Σ values or Σ signs, of the weighted rows or the rows divided by their weights;
    mass 0 → majority of the elected signs, then +1; count 0 → +1), then combine the agreeing entries:
    mean, ÷ Σ agreeing weights (1 if 0), or sum."""
    rows = trimmed.tolist()
    weights = list(weights) if weights is not None else [1.0] * len(rows)
    voters = rows if elect_on == "weighted" else [[x / w for x in row] for row, w in zip(rows, weights)]
    columns, voter_columns = list(zip(*rows)), list(zip(*voters))

    def sign(x):
        return 1.0 if x > 0 else -1.0 if x < 0 else 0.0

    votes = [sum(c) if consensus == "mass" else sum(sign(x) for x in c) for c in voter_columns]
    signs = [sign(v) for v in votes]
    fallback = -1.0 if sum(signs) < 0 and consensus == "mass" else 1.0  # count: even splits take +1
    out = []
    for column, voter_column, elected in zip(columns, voter_columns, signs):
        elected = elected or fallback
        agreeing = [t for t, v in enumerate(voter_column) if v != 0 and sign(v) == elected]
        total = sum(column[t] for t in agreeing)
        if normalize == "none":
            out.append(total)
        elif normalize == "weight":
            divisor = sum(weights[t] for t in agreeing)
            out.append(total / (divisor if divisor != 0 else 1.0))
        else:
            out.append(total / len(agreeing) if agreeing else 0.0)
    return torch.tensor(out, dtype=trimmed.dtype)


def ties_rows(X: torch.Tensor, density, present: torch.Tensor | None = None, rule: str = "round",
              gamma: float = 0.0, **options) -> torch.Tensor:
    """Trim (or breadcrumbs' band), elect, disjoint merge."""
    return elect_merge_rows(trim_rows(X, density, present, rule, gamma), **options)


def della_rows(X: torch.Tensor, density, epsilon: float, seeds: list[int]) -> torch.Tensor:
    """MagPrune: rank by (|x| ascending, index ascending); keep i when its float32 draw < q_i =
    κ − ε/2 + ε·rank/(D−1), divided by q_i."""
    densities = list(density) if isinstance(density, (list, tuple)) else [density] * X.shape[0]
    out = torch.zeros_like(X)
    size = X.shape[1]
    for t in range(X.shape[0]):
        row = X[t].tolist()
        order = sorted(range(size), key=lambda i: (abs(row[i]), i))
        draws = torch.rand(size, generator=torch.Generator().manual_seed(seeds[t]), dtype=torch.float32).tolist()
        for rank, i in enumerate(order):
            q = densities[t] if size == 1 else densities[t] - epsilon / 2 + epsilon * rank / (size - 1)
            if float(draws[i]) < q:
                out[t, i] = row[i] / q
    return out


def dare_mask(shape, drop_rate: float, seed: int, task: str, module: str) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}|{task}|{module}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big"))
    return torch.rand(shape, generator=generator, dtype=torch.float32) >= drop_rate


def dare(X: torch.Tensor, drop_rate: float, seed: int, task: str, module: str) -> torch.Tensor:
    if drop_rate == 0.0:
        return X.clone()
    return torch.where(dare_mask(X.shape, drop_rate, seed, task, module), X / (1.0 - drop_rate), 0.0)


def past_ties(S: torch.Tensor, k: int) -> int:
    """A cut after the k-th singular value, moved past the values tied with it to within ε (relative)."""
    if not 0 < k < S.numel():
        return k
    floor = S[k - 1] * (1 - EPS)  # within ε of the k-th value itself
    while k < S.numel() and S[k] >= floor:
        k += 1
    return k


def tsv(tasks: list[torch.Tensor]) -> torch.Tensor:
    """Per-task dense SVDs, k_t = ε-rank (or min(max(1, ⌊min(m,n)/T⌋), ε-rank) when Σ exceeds min(m,n)); polar
    factors over the ε-rank triplets."""
    m, n = tasks[0].shape
    svds = [dense_svd(X) for X in tasks]
    ranks = [S.numel() for _, S, _ in svds]
    if sum(ranks) > min(m, n):
        ranks = [past_ties(S, min(max(1, min(m, n) // len(tasks)), r)) for (_, S, _), r in zip(svds, ranks)]
    U_hat = torch.cat([U[:, :k] for (U, _, _), k in zip(svds, ranks)], dim=1)
    S_hat = torch.cat([S[:k] for (_, S, _), k in zip(svds, ranks)])
    V_hat = torch.cat([V[:, :k] for (_, _, V), k in zip(svds, ranks)], dim=1)
    if U_hat.shape[1] == 0:
        return torch.zeros(m, n, dtype=tasks[0].dtype)
    return partial_polar(U_hat) @ torch.diag(S_hat) @ partial_polar(V_hat).T


def isotropize(X: torch.Tensor) -> torch.Tensor:
    U, S, V = dense_svd(X)
    if S.numel() == 0:
        return torch.zeros_like(X)
    return S.mean() * U @ V.T


def best_rank(X: torch.Tensor, k: int) -> torch.Tensor:
    U, S, V = dense_svd(X)
    k = past_ties(S, min(k, S.numel()))
    return U[:, :k] @ torch.diag(S[:k]) @ V[:, :k].T


def cart(tasks: list[torch.Tensor], rank_fraction: float, scale: float) -> torch.Tensor:
    mean = sum(tasks) / len(tasks)
    k = math.ceil(_decimal(rank_fraction) * min(mean.shape))
    return mean + scale * sum(best_rank(X - mean, k) for X in tasks)


def iso_cts(tasks: list[torch.Tensor], common_fraction: float) -> torch.Tensor:
    total = sum(tasks)
    U, S, V = dense_svd(total)
    if S.numel() == 0:
        return torch.zeros_like(total)
    p = min(total.shape)
    k = past_ties(S, min(math.ceil(_decimal(common_fraction) * p), S.numel()))
    lefts, rights = [U[:, :k]], [V[:, :k]]
    for X in tasks:
        U_t, S_t, V_t = dense_svd(X - U[:, :k] @ (U[:, :k].T @ X))
        s = past_ties(S_t, min((p - k) // len(tasks), int((S_t > EPS * S[0]).sum())))
        lefts.append(U_t[:, :s])
        rights.append(V_t[:, :s])
    return S.mean() * partial_polar(torch.cat(lefts, dim=1)) @ partial_polar(torch.cat(rights, dim=1)).T


def partial_polar(M: torch.Tensor) -> torch.Tensor:
    """The polar factor over the ε-rank singular triplets (unique for dependent columns)."""
    P, S, Qh = torch.linalg.svd(M, full_matrices=False)
    q = int((S > EPS * S[0]).sum())
    return P[:, :q] @ Qh[:q]


def lora_lego(factors: list[tuple[torch.Tensor, torch.Tensor]], clusters: int, seed: int, iterations: int = 10):
    """k-means (plain loops) over the rank-1 units (b, a), features [a/‖a‖; b/‖b‖]."""
    units = [(B[:, i], A[i]) for B, A in factors for i in range(A.shape[0])]
    default = max(A.shape[0] for _, A in factors)
    K = min(clusters or default, len(units))
    features = [torch.cat([a / a.norm(), b / b.norm()]) for b, a in units]
    start = torch.randperm(len(units), generator=torch.Generator().manual_seed(seed))[:K].tolist()
    centroids = [features[i].clone() for i in start]
    labels = [0] * len(units)
    for _ in range(iterations):
        for u, f in enumerate(features):
            distances = [float((f - c).norm()) for c in centroids]
            labels[u] = distances.index(min(distances))
        for c in range(K):
            members = [features[u] for u in range(len(units)) if labels[u] == c]
            if members:
                centroids[c] = sum(members) / len(members)
    out = 0
    for c in range(K):
        members = [units[u] for u in range(len(units)) if labels[u] == c]
        if not members:
            continue
        b_bar = sum(b for b, _ in members) / len(members)
        a_bar = sum(a for _, a in members) / len(members)
        b_bar = b_bar * (sum(float(b.abs().max()) for b, _ in members) / len(members)) / float(b_bar.abs().max())
        a_bar = a_bar * (sum(float(a.abs().max()) for _, a in members) / len(members)) / float(a_bar.abs().max())
        out = out + torch.outer(b_bar, a_bar)
    return out * math.sqrt(default) / math.sqrt(K)


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

ELEMENTWISE = ("ties", "magnitude", "dare", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della")
TIES_OPTIONS = ("consensus", "normalize", "elect_on")


def combine(method: str, rows: torch.Tensor, density, present=None, weights=None, seeds=None,
            **options) -> torch.Tensor:
    """Elementwise methods on a (T × D) matrix whose rows are already DARE'd where needed."""
    rule, gamma = options.pop("keep_rule", "round"), options.pop("gamma", 0.0)
    epsilon = options.pop("epsilon", 0.0)
    elect = {name: options[name] for name in TIES_OPTIONS if name in options}
    if method in ("ties", "dare_ties", "breadcrumbs_ties"):
        return ties_rows(rows, density, present, rule, gamma if method == "breadcrumbs_ties" else 0.0,
                         weights=weights, **elect)
    if method in ("magnitude", "breadcrumbs"):
        return trim_rows(rows, density, present, rule, gamma if method == "breadcrumbs" else 0.0).sum(dim=0)
    if method == "della":
        return elect_merge_rows(della_rows(rows, density, epsilon, seeds), weights=weights, **elect)
    if method == "dare":
        return rows.sum(dim=0)
    raise ValueError(method)


def spectral(method: str, tensors: list[torch.Tensor], **options) -> torch.Tensor:
    if method == "ta":
        return sum(tensors)
    if method == "tsv":
        return tsv(tensors)
    if method == "iso_c":
        return isotropize(sum(tensors))
    if method == "tsv_iso":
        return isotropize(tsv(tensors))
    if method == "cart":
        return cart(tensors, options["rank_fraction"], options["cart_scale"])
    if method == "iso_cts":
        return iso_cts(tensors, options["common_fraction"])
    raise ValueError(method)


def dare_l1(X: torch.Tensor, drop_rate: float, seed: int, task: str, module: str) -> torch.Tensor:
    """mergekit's rescale: the dropped tensor times ‖X‖₁ / ‖dropped‖₁ (unless either is < 1e-8)."""
    if drop_rate == 0.0:
        return X.clone()
    kept = torch.where(dare_mask(X.shape, drop_rate, seed, task, module), X, 0.0)
    before, after = float(X.abs().sum()), float(kept.abs().sum())
    return kept * (before / after) if before >= 1e-8 and after >= 1e-8 else kept


def retained(adapters, path, weights, table) -> list[tuple[int, float]]:
    """(task index, weight) for the tasks that keep a nonzero weight and a nonzero update on this module."""
    out = []
    for t, adapter in enumerate(adapters):
        if path not in adapter.modules:
            continue
        module = adapter.modules[path]
        if module.scale == 0 or not (module.lora_A.any() and module.lora_B.any()):
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
    isotropize_step: bool = False,
    dare_rescale: str = "inverse",
    **options,
) -> dict[str, torch.Tensor]:
    """Dense λ·ΔW per module path; modules every task left are absent. `options`: the TIES options
    (keep_rule, consensus, normalize, elect_on), gamma, epsilon, and the spectral methods' parameters."""
    weights = weights or [1.0] * len(adapters)
    finish = isotropize if isotropize_step else (lambda X: X)
    paths = sorted({p for a in adapters for p in a.modules})
    active = {p: retained(adapters, p, weights, table) for p in paths}
    active = {p: tasks for p, tasks in active.items() if tasks}
    spaces = {}
    for path, tasks in active.items():
        factors = []
        for t, w in tasks:
            module = adapters[t].modules[path]
            factors.append((module.scale * w * module.lora_B.double(), module.lora_A.double()))
        if method == "lora_lego":
            module_seed = int.from_bytes(hashlib.sha256(f"{seed}||{path}".encode()).digest()[:8], "big")
            spaces[path] = (lora_lego(factors, options.get("clusters", 0), module_seed), None)
            continue
        tensors, back = to_space(space, factors, knots_scaled)
        if method in ("dare", "dare_ties"):
            drop = dare if dare_rescale == "inverse" else dare_l1
            tensors = [drop(X, drop_rate, seed, adapters[t].name, path) for X, (t, _) in zip(tensors, tasks)]
        spaces[path] = (tensors, back)
    out = {}
    if method == "lora_lego":
        return {path: lam * finish(merged) for path, (merged, _) in spaces.items()}
    if method not in ELEMENTWISE:
        for path, (tensors, back) in spaces.items():
            out[path] = lam * finish(back(spectral(method, tensors, **options)))
        return out
    if scope == "module":
        for path, (tensors, back) in spaces.items():
            seeds = [int.from_bytes(hashlib.sha256(f"{seed}|{adapters[t].name}|{path}".encode()).digest()[:8], "big")
                     for t, _ in active[path]]
            densities = [density[t] for t, _ in active[path]] if isinstance(density, list) else density
            merged = combine(method, torch.stack([X.reshape(-1) for X in tensors]), densities,
                             weights=[w for _, w in active[path]], seeds=seeds, **options)
            out[path] = lam * finish(back(merged.reshape(tensors[0].shape)))
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
    merged = combine(method, torch.cat(blocks, dim=1), density, torch.cat(masks, dim=1), **options)
    start = 0
    for path, (tensors, back) in spaces.items():
        width = tensors[0].numel()
        out[path] = lam * finish(back(merged[start : start + width].reshape(tensors[0].shape)))
        start += width
    return out


def optimal_truncation(X: torch.Tensor, rank: int) -> torch.Tensor:
    """Eckart–Young: the best rank-`rank` approximation of X."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
