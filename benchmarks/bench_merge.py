"""Merge benchmark: every method × space on Llama-3-8B attention shapes, and versus the papers' dense code.

The second part compares loramerge with the dense formulation of the reference code (docs/differences.md)
on a subset of modules.

Run by hand (never from the tests):

    .venv/bin/python benchmarks/bench_merge.py --blocks 2 --json bench.json

Each measurement runs in a fresh subprocess, so its peak RSS (ru_maxrss) minus the RSS it had once the
adapters were built is the memory that merge needed. See benchmarks/README.md.
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

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from loramerge_cli.adapters.model import Adapter, AdapterSource, LoraModule  # noqa: E402
from loramerge_cli.merging import elementwise, registry  # noqa: E402
from loramerge_cli.merging.merge import MergeConfig, merge  # noqa: E402
from loramerge_cli.merging.spaces import knots_basis  # noqa: E402

LLAMA_ATTENTION = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096)}
METHODS = ("ta", "ties", "magnitude", "dare", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "tsv", "iso_c",
           "tsv_iso")
SPACES = ("full", "knots", "core")
# loramerge mergers compared with the papers' dense formulation: (label, method, space, parameters)
COMPARISONS = {
    "knots_ties": ("ties", "knots", {"density": 0.9}),
    "tsv": ("tsv", "full", {}),
    "iso_c": ("iso_c", "full", {}),
    "core_tsv": ("tsv", "core", {}),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_adapters(blocks: int, count: int, rank: int, seed: int, only: list[str] | None = None) -> list[Adapter]:
    """`count` random rank-`rank` adapters (α = 2r, float32 factors), seeded per (adapter, module)."""
    adapters = []
    for index in range(count):
        modules = {}
        for block in range(blocks):
            for position, (name, (d_out, d_in)) in enumerate(LLAMA_ATTENTION.items()):
                path = f"model.layers.{block}.self_attn.{name}"
                if only is not None and path not in only:
                    continue
                generator = torch.Generator().manual_seed(((seed * 1009 + index) * 1009 + block) * 8 + position)
                A = torch.randn(rank, d_in, generator=generator) / d_in**0.5
                B = torch.randn(d_out, rank, generator=generator) / rank**0.5
                modules[path] = LoraModule(path, A, B, scale=2.0, alpha=2.0 * rank)
        source = AdapterSource(f"task{index}", "dir", "", None, f"bench-{seed}-{index}")
        config = {"peft_type": "LORA", "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B"}
        adapters.append(Adapter(f"task{index}", source, config, dict(sorted(modules.items()))))
    return adapters


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


# ---------------------------------------------------------------- the dense formulation (papers' code)


def dense_deltas(adapters, path, dtype):
    return [a.modules[path].delta(dtype) for a in adapters]


def canonical_signs(U, V):
    """Flip each pair (u_i, v_i) so that the largest-magnitude entry of u_i is positive."""
    signs = torch.sign(U.gather(0, U.abs().argmax(dim=0, keepdim=True)))
    signs[signs == 0] = 1
    return U * signs, V * signs


def epsilon_rank(S: torch.Tensor, cap: int) -> int:
    """ε-rank, capped at Σ r_t: in float32 the rounding noise of a dense product has singular values
    above 1e-6·σ_max, which exact factored arithmetic never sees."""
    return min(cap, int((S > 1e-6 * S[0]).sum()))


def dense_ties(rows: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES with loramerge's keep count, vectorised as the references do (kthvalue threshold)."""
    k = elementwise.keep_count(rows.shape[1], density)
    threshold = rows.abs().kthvalue(rows.shape[1] - k + 1, dim=1, keepdim=True).values
    kept = rows.abs() >= threshold
    trimmed = rows * kept
    signs = torch.sign(trimmed.sum(dim=0))
    majority = torch.sign(signs.sum())
    signs = torch.where(signs == 0, majority if majority != 0 else signs.new_tensor(1.0), signs)
    agree = (torch.sign(trimmed) == signs) & (trimmed != 0)
    return (trimmed * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1), kept


def dense_knots_ties(adapters, path, dtype, density):
    deltas = dense_deltas(adapters, path, dtype)
    n = deltas[0].shape[1]
    U, S, Vh = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
    q = epsilon_rank(S, sum(a.modules[path].rank for a in adapters))
    U, V = canonical_signs(U[:, :q], Vh[:q].T)
    S = S[:q]
    blocks = [V[t * n : (t + 1) * n].T for t in range(len(deltas))]
    merged, kept = dense_ties(torch.stack([b.reshape(-1) for b in blocks]), density)
    return (U * S) @ merged.reshape(blocks[0].shape), kept


def polar(M):
    P, _, Qh = torch.linalg.svd(M, full_matrices=False)
    return P @ Qh


def dense_tsv_tasks(tasks, ranks):
    """Per-task dense SVDs, k_t = min(⌊min(m, n)/T⌋, r_t) (loramerge's rule), polar factors."""
    m, n = tasks[0].shape
    share = min(m, n) // len(tasks) if sum(ranks) > min(m, n) else max(ranks)
    parts = []
    for X, rank in zip(tasks, ranks):
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
        k = min(share, rank, epsilon_rank(S, rank))
        parts.append((U[:, :k], S[:k], Vh[:k].T))
    U_hat = torch.cat([p[0] for p in parts], dim=1)
    S_hat = torch.cat([p[1] for p in parts])
    V_hat = torch.cat([p[2] for p in parts], dim=1)
    return (polar(U_hat) * S_hat) @ polar(V_hat).T


def dense_isotropize(X, cap):
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    q = epsilon_rank(S, cap)
    return (U[:, :q] * S[:q].mean()) @ Vh[:q]


def dense_core_tsv(adapters, path, dtype):
    factors = [a.modules[path].factors(dtype) for a in adapters]
    U_B, _, _ = torch.linalg.svd(torch.cat([B for B, _ in factors], dim=1), full_matrices=False)
    _, _, Vh_A = torch.linalg.svd(torch.cat([A for _, A in factors], dim=0), full_matrices=False)
    deltas = [B @ A for B, A in factors]  # the papers' code forms ΔW_t, then projects it
    cores = [U_B.T @ X @ Vh_A.T for X in deltas]
    return U_B @ dense_tsv_tasks(cores, [a.modules[path].rank for a in adapters]) @ Vh_A


def run_dense(label, adapters, path, dtype):
    ranks = [a.modules[path].rank for a in adapters]
    if label == "knots_ties":
        return dense_knots_ties(adapters, path, dtype, COMPARISONS[label][2]["density"])
    if label == "tsv":
        return dense_tsv_tasks(dense_deltas(adapters, path, dtype), ranks), None
    if label == "iso_c":
        return dense_isotropize(sum(dense_deltas(adapters, path, dtype)), sum(ranks)), None
    if label == "core_tsv":
        return dense_core_tsv(adapters, path, dtype), None
    raise ValueError(label)


def loramerge_kept_masks(adapters, path, density):
    """The entries loramerge's KnOTS-TIES keeps, for the flipped-entry count."""
    factors = [a.modules[path].factors(torch.float64) for a in adapters]
    _, _, blocks = knots_basis(factors)
    rows = torch.stack([b.reshape(-1) for b in blocks])
    return elementwise.trim(rows, density) != 0


# ---------------------------------------------------------------- the previous full-space path


def legacy_randomized_svd(X, width, generator, power_iterations=6):
    """loramerge ≤ 0.x before the chunked kernel: a float64 range finder with 6 power iterations."""
    omega = torch.randn(X.shape[1], width, generator=generator, dtype=X.dtype).to(X.device)
    Q, _ = torch.linalg.qr(X @ omega)
    for _ in range(power_iterations):
        Q, _ = torch.linalg.qr(X.T @ Q)
        Q, _ = torch.linalg.qr(X @ Q)
    U_small, S, Vh = torch.linalg.svd(Q.T @ X, full_matrices=False)
    return Q @ U_small, S, Vh


def use_legacy_path() -> None:
    """Route full-space elementwise merges through the previous path: the whole (T × m·n) matrix of
    dense task updates with the generic kernels, and the float64 6-iteration range finder."""
    import dataclasses

    from loramerge_cli.merging import lowrank, registry

    for name, method in registry.METHODS.items():
        registry.METHODS[name] = dataclasses.replace(method, full_space=None)
    lowrank._randomized_svd = legacy_randomized_svd


# ---------------------------------------------------------------- workers (one subprocess each)


def worker(job: dict) -> dict:
    torch.set_num_threads(job["threads"])
    if job.get("legacy"):
        use_legacy_path()
    only = job.get("modules")
    adapters = build_adapters(job["blocks"], job["adapters"], job["rank"], job["seed"], only)
    baseline = rss_bytes()
    if job["kind"] == "merge":
        config = MergeConfig(merger=job["method"], space=job["space"], compute_dtype=DTYPES[job["compute_dtype"]],
                             lam=1.0, **job.get("params", {}))
        start = time.perf_counter()
        result = merge(adapters, config)
        seconds = time.perf_counter() - start
        out = {"seconds": seconds, "peak_mb": (peak_rss_bytes() - baseline) / 2**20, "modules": len(result.modules),
               "ranks": sorted({m.rank for m in result.modules.values()})}
        if job.get("save"):
            save_file({p: (m.lora_B @ m.lora_A).float().contiguous() for p, m in result.modules.items()}, job["save"])
        return out
    # kind == "dense": the papers' formulation on the same modules, compared with the saved loramerge result
    dtype = DTYPES[job["dense_dtype"]]
    start = time.perf_counter()
    results = {path: run_dense(job["label"], adapters, path, dtype) for path in only}
    seconds = time.perf_counter() - start
    peak = (peak_rss_bytes() - baseline) / 2**20
    fast = load_file(job["save"])
    difference = max(
        float(torch.linalg.norm(fast[p].double() - d.double()) / torch.linalg.norm(fast[p].double()))
        for p, (d, _) in results.items()
    )
    out = {"seconds": seconds, "peak_mb": peak, "relative_difference": difference}
    if job["label"] == "knots_ties":
        flipped = kept = 0
        for path, (_, dense_kept) in results.items():
            mine = loramerge_kept_masks(adapters, path, COMPARISONS["knots_ties"][2]["density"])
            if mine.shape != dense_kept.shape:  # different ε-rank: every entry counts as flipped
                flipped, kept = flipped + int(mine.sum()), kept + int(mine.sum())
                continue
            flipped += int((mine ^ dense_kept).sum())
            kept += int(mine.sum())
        out["flipped_kept_share"] = flipped / max(1, kept)
    return out


def spawn(job: dict) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if completed.returncode != 0:
        return {"error": completed.stderr.strip().splitlines()[-1] if completed.stderr.strip() else "failed"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- driver


def default_params(method: str) -> dict:
    params = {}
    if method in ("ties", "magnitude", "dare_ties", "breadcrumbs", "breadcrumbs_ties"):
        params["density"] = 0.8
    if method in ("dare", "dare_ties"):
        params["drop_rate"] = 0.1
    return params


def main(argv=None) -> None:
    from examples.arguments import at_least, names_of, output_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=at_least(1), default=32, help="transformer blocks (Llama-3-8B has 32)")
    parser.add_argument("--adapters", type=at_least(2), default=6)
    parser.add_argument("--rank", type=at_least(1), default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dense-output-blocks", type=at_least(1), default=1,
                        help="blocks for the methods whose full-space output is dense (ties, magnitude, dare, "
                             "dare_ties): they cost seconds per block on one core; reported per block as well")
    parser.add_argument("--threads", type=at_least(1), default=torch.get_num_threads(),
                        help="torch threads per measurement (use 1 on a shared machine: oversubscribed OpenMP "
                             "threads make timings erratic)")
    parser.add_argument("--methods", type=names_of(METHODS, "method"), default=",".join(METHODS))
    parser.add_argument("--spaces", type=names_of(SPACES, "space"), default=",".join(SPACES))
    parser.add_argument("--compute-dtype", choices=DTYPES, default="float64", help="loramerge's compute dtype")
    parser.add_argument("--dense-dtype", choices=DTYPES, default="float32", help="the dense formulation's dtype")
    parser.add_argument("--dense-modules", default="model.layers.0.self_attn.k_proj",
                        help="comma-separated module paths for the dense comparison ('' to skip it)")
    parser.add_argument("--comparisons", type=names_of(COMPARISONS, "comparison"), default=",".join(COMPARISONS))
    parser.add_argument("--legacy", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the previous full-space path (dense T × m·n rows, float64 6-iteration "
                             "range finder) for the dense-output methods, and print the speed-up")
    parser.add_argument("--json", type=output_file, help="write all results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    common = {"blocks": args.blocks, "adapters": args.adapters, "rank": args.rank, "seed": args.seed,
              "threads": args.threads, "compute_dtype": args.compute_dtype}
    print(f"{args.adapters} adapters, rank {args.rank}, {args.blocks} blocks × (q,o 4096×4096; k,v 1024×4096), "
          f"compute {args.compute_dtype}, {args.threads} threads")
    rows = []
    print(f"{'method':<10} {'space':<6} {'blocks':>6} {'seconds':>9} {'s/block':>8} {'peak MB':>9} {'out ranks':>10} "
          f"{'previous s':>10} {'prev MB':>8} {'speed-up':>8}")
    for method in args.methods.split(","):
        for space in args.spaces.split(","):
            dense_output = space == "full" and registry.METHODS[method].elementwise
            blocks = min(args.blocks, args.dense_output_blocks) if dense_output else args.blocks
            result = spawn({**common, "blocks": blocks, "kind": "merge", "method": method, "space": space,
                            "params": default_params(method)})
            rows.append({"method": method, "space": space, "blocks": blocks, **result})
            if "error" in result:
                print(f"{method:<10} {space:<6} error: {result['error']}")
                continue
            ranks = result["ranks"]
            shown = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
            previous = ""
            if dense_output and args.legacy:
                old = spawn({**common, "blocks": blocks, "kind": "merge", "method": method, "space": space,
                             "params": default_params(method), "legacy": True})
                rows[-1]["previous"] = old
                if "error" not in old:
                    previous = (f" {old['seconds']:10.2f} {old['peak_mb']:8.0f} "
                                f"{old['seconds'] / result['seconds']:7.1f}×")
            print(f"{method:<10} {space:<6} {blocks:6d} {result['seconds']:9.2f} {result['seconds'] / blocks:8.2f} "
                  f"{result['peak_mb']:9.0f} {shown:>10}{previous}")

    comparisons = []
    modules = [m for m in args.dense_modules.split(",") if m]
    if modules:
        print(f"\ndense formulation ({args.dense_dtype}) on {', '.join(modules)}")
        print(f"{'merger':<11} {'ours s':>8} {'dense s':>8} {'speed-up':>9} {'ours MB':>8} {'dense MB':>9} "
              f"{'rel diff':>9} {'flipped':>8}")
        scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_merge_{os.getpid()}.safetensors"
        for label in [label for label in args.comparisons.split(",") if label]:
            method, space, params = COMPARISONS[label]
            job = {**common, "modules": modules, "save": str(scratch)}
            ours = spawn({**job, "kind": "merge", "method": method, "space": space, "params": params})
            dense = spawn({**job, "kind": "dense", "label": label, "dense_dtype": args.dense_dtype}) \
                if "error" not in ours else {"error": "loramerge failed"}
            scratch.unlink(missing_ok=True)
            entry = {"merger": label, "method": method, "space": space, "modules": modules, "loramerge": ours,
                     "dense": dense}
            comparisons.append(entry)
            if "error" in ours or "error" in dense:
                print(f"{label:<11} error: {ours.get('error') or dense.get('error')}")
                continue
            flipped = f"{dense['flipped_kept_share']:.2e}" if "flipped_kept_share" in dense else "-"
            print(f"{label:<11} {ours['seconds']:8.2f} {dense['seconds']:8.2f} "
                  f"{dense['seconds'] / ours['seconds']:8.1f}× {ours['peak_mb']:8.0f} {dense['peak_mb']:9.0f} "
                  f"{dense['relative_difference']:9.2e} {flipped:>8}")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "worker")}
        args.json.write_text(json.dumps({"settings": settings, "merges": rows, "dense_comparison": comparisons},
                                        indent=2) + "\n")


if __name__ == "__main__":
    from examples.arguments import run_script

    run_script(main)
