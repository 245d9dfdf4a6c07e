"""Defects found by the reviews of 2026-12-07 (tenth session), each test failing on the code before its fix."""

import torch


def test_energy_one_does_not_call_a_full_rank_factorisation_capped():
    """`--energy 1.0` on a module whose every singular value fits under the cap: Σσ² a rounding hair below
    ‖X‖² left the target "not reached", so the module was called capped (and counted in the warning)."""
    from loramerge_cli.merging.lowrank import truncate_dense

    for seed in range(8):
        X = torch.randn(16, 32, generator=torch.Generator().manual_seed(seed))
        factors, error, capped = truncate_dense(X, None, 1.0, 16)
        assert factors.left.shape[1] == 16 and error < 1e-5 and not capped, (seed, error)
    _, _, capped = truncate_dense(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)), None, 1.0, 16)
    assert capped  # rank 32 needed, 16 allowed: the cap binds
