"""The SVD math on matrices with known spectra."""

from __future__ import annotations

import pytest
import torch

from sorsa_tools.errors import CheckpointError
from sorsa_tools.svd import (
    Factors,
    _RitzConvergence,
    energy_captured,
    exact_svd,
    krylov_svd,
    randomized_svd,
    reconstruction_error,
    require_finite,
    residual,
)


def spectrum_matrix(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return ((u * s) @ v.T).float()


def test_exact_svd_recovers_known_spectrum_tall_and_wide():
    s = torch.linspace(10, 1, 40, dtype=torch.float64)
    for m, n in [(120, 40), (40, 120)]:
        W = spectrum_matrix(m, n, s)
        f = exact_svd(W, 8)
        assert f.U.shape == (m, 8) and f.Vt.shape == (8, n)
        assert torch.allclose(f.S.double(), s[:8], rtol=1e-5)
        # the principal part is the best rank-8 approximation: residual energy = sum of the rest
        assert abs(float(residual(W, f).double().norm() ** 2) - float((s[8:] ** 2).sum())) < 1e-3


def test_signs_are_normalised():
    W = spectrum_matrix(60, 30, torch.linspace(5, 1, 30, dtype=torch.float64))
    f = exact_svd(W, 5)
    idx = f.U.abs().argmax(dim=0)
    assert torch.all(f.U[idx, torch.arange(5)] > 0)
    g = exact_svd(-W, 5)  # same singular vectors up to sign: normalisation makes U agree
    assert torch.allclose(g.U, f.U, atol=1e-5) and torch.allclose(g.Vt, -f.Vt, atol=1e-5)


def test_randomized_matches_exact_on_decaying_spectrum_both_orientations():
    s = torch.arange(1, 201, dtype=torch.float64).pow(-0.8)
    for m, n in [(400, 200), (200, 400)]:
        W = spectrum_matrix(m, n, s, seed=1)
        f = randomized_svd(W, 16, 16, 4, torch.Generator().manual_seed(0))
        assert torch.allclose(f.S.double(), s[:16], rtol=1e-3)
        eye = torch.eye(16)
        assert torch.allclose(f.U.T @ f.U, eye, atol=1e-5) and torch.allclose(f.Vt @ f.Vt.T, eye, atol=1e-5)
        assert reconstruction_error(W, residual(W, f), f) < 1e-6


def test_adaptive_iterations_reach_tolerance_on_flat_spectrum():
    """A slowly decaying spectrum: 4 fixed iterations miss, tol drives the error below it, and
    the recorded estimate tracks the true error."""
    s = torch.arange(1, 301, dtype=torch.float64).pow(-0.15)
    W = spectrum_matrix(600, 300, s, seed=2)
    fixed = randomized_svd(W, 32, 32, 4, torch.Generator().manual_seed(0))
    err_fixed = float(((fixed.S.double() - s[:32]).abs() / s[:32]).max())
    adaptive = randomized_svd(W, 32, 32, 4, torch.Generator().manual_seed(0), tol=1e-4, max_niter=40)
    err = float(((adaptive.S.double() - s[:32]).abs() / s[:32]).max())
    assert err_fixed > 1e-3, err_fixed
    assert adaptive.niter > 4 and err < 2e-4, (adaptive.niter, err)
    assert adaptive.est_error is not None and adaptive.est_error <= 1e-4
    assert 0.2 < err / max(adaptive.est_error, 1e-12) < 5, (err, adaptive.est_error)


def test_krylov_matches_exact_on_decaying_spectrum_both_orientations():
    s = torch.arange(1, 201, dtype=torch.float64).pow(-0.8)
    for m, n in [(400, 200), (200, 400)]:
        W = spectrum_matrix(m, n, s, seed=1)
        f = krylov_svd(W, 16, 0, 4, torch.Generator().manual_seed(0))
        assert f.niter == 4 and f.U.shape == (m, 16) and f.Vt.shape == (16, n)
        assert torch.allclose(f.S.double(), s[:16], rtol=1e-4)
        eye = torch.eye(16)
        assert torch.allclose(f.U.T @ f.U, eye, atol=1e-5) and torch.allclose(f.Vt @ f.Vt.T, eye, atol=1e-5)
        assert reconstruction_error(W, residual(W, f), f) < 1e-6
        # the same singular vectors as LAPACK's (signs normalised alike)
        e = exact_svd(W, 16)
        assert torch.allclose(f.U, e.U, atol=1e-3) and torch.allclose(f.Vt, e.Vt, atol=1e-3)


def test_krylov_beats_subspace_iteration_at_equal_products():
    """Flat spectrum: 4 Krylov steps with blocks of r cost the matrix products of PEFT's
    svd_lowrank(q=r, niter=4) but keep every block, and land orders of magnitude closer."""
    s = torch.arange(1, 301, dtype=torch.float64).pow(-0.3)
    W = spectrum_matrix(900, 300, s, seed=3)
    kry = krylov_svd(W, 16, 0, 4, torch.Generator().manual_seed(0))
    sub = randomized_svd(W, 16, 0, 4, torch.Generator().manual_seed(0))
    err_k = float(((kry.S.double() - s[:16]).abs() / s[:16]).max())
    err_s = float(((sub.S.double() - s[:16]).abs() / s[:16]).max())
    assert err_k * 10 < err_s, (err_k, err_s)


def test_krylov_adaptive_steps_reach_tolerance_on_flat_spectrum():
    s = torch.arange(1, 301, dtype=torch.float64).pow(-0.15)
    W = spectrum_matrix(600, 300, s, seed=2)
    fixed = krylov_svd(W, 16, 0, 2, torch.Generator().manual_seed(0))
    err_fixed = float(((fixed.S.double() - s[:16]).abs() / s[:16]).max())
    adaptive = krylov_svd(W, 16, 0, 2, torch.Generator().manual_seed(0), tol=1e-4, max_niter=16)
    err = float(((adaptive.S.double() - s[:16]).abs() / s[:16]).max())
    assert err_fixed > 1e-3, err_fixed
    assert adaptive.niter > 2 and err < 1e-4, (adaptive.niter, err)
    assert adaptive.est_error is not None and err <= adaptive.est_error <= 1e-4


def test_convergence_estimate_extrapolates_at_the_slower_of_the_last_two_rates():
    """Golden values: Ritz values 1 - e_k with errors e = 0.1, 0.01, 0.005, 0.0049, 0.0049 - 1e-5.
    Changes 0.09, 0.005, 1e-4, 1e-5 (relative to the newer value): rates 0.056, 0.02, 0.1. After a
    fast step that follows a slow one, the slow rate is extrapolated: a single-rate estimate said
    1e-5 * 0.1 / 0.9 at the last step too, but after the second it said 1e-4 * 0.02 / 0.98 = 2e-6
    where 4.9e-3 was still to go."""
    conv = _RitzConvergence()
    errs = [0.1, 0.01, 0.005, 0.0049, 0.0049 - 1e-5]
    ests = [conv.update(torch.tensor([1.0 - e], dtype=torch.float64)) for e in errs]
    d = [abs(a - b) / (1 - b) for a, b in zip(errs[:-1], errs[1:], strict=True)]
    assert ests[0] == ests[1] == float("inf")  # no rate yet
    r1, r2, r3 = d[1] / d[0], d[2] / d[1], d[3] / d[2]
    assert r2 < r1 < r3
    assert ests[2] == pytest.approx(d[1] * r1 / (1 - r1))  # the first rate: nothing to compare with
    assert ests[3] == pytest.approx(d[2] * r1 / (1 - r1))  # r1 > r2: the slower one
    assert ests[4] == pytest.approx(d[3] * r3 / (1 - r3))
    assert conv.update(torch.tensor([1.0 - errs[-1]], dtype=torch.float64)) == 0.0  # converged
    rising = _RitzConvergence()  # changes that grow: no rate to extrapolate
    assert [rising.update(torch.tensor([v])) for v in (1.0, 1.1, 1.3)][-1] == float("inf")


def test_krylov_rank_deficient_and_narrow_matrices():
    # rank 5 < the Krylov space: the basis runs out of directions, which must not break it
    s = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    W = spectrum_matrix(200, 100, s, seed=4)
    f = krylov_svd(W, 8, 0, 6, torch.Generator().manual_seed(0), tol=1e-4)
    assert torch.isfinite(f.S).all() and torch.allclose(f.S[:5].double(), s, rtol=1e-5)
    # the zero singular values come from a float32 Gram matrix: ~sqrt(eps) sigma_1, not 0
    assert float(f.S[5:].abs().max()) < 1e-3 * float(s[0])
    assert torch.allclose(f.U.T @ f.U, torch.eye(8), atol=1e-4)
    assert reconstruction_error(W, residual(W, f), f) < 1e-5
    # fewer than two blocks fit in min(out, in): the exact SVD answers
    W = spectrum_matrix(50, 30, torch.linspace(3, 1, 30, dtype=torch.float64))
    f = krylov_svd(W, 16, 0, 4, torch.Generator().manual_seed(0))
    assert f.method == "exact" and f.niter == 0 and torch.allclose(f.S, exact_svd(W, 16).S)
    # two blocks fit but cannot reach tol (a flat spectrum): the exact SVD answers, and says so
    W = spectrum_matrix(30, 20, torch.linspace(3, 2, 20, dtype=torch.float64), seed=5)
    f = krylov_svd(W, 8, 0, 4, torch.Generator().manual_seed(0), tol=5e-4)
    assert f.method == "exact" and f.est_error == 0.0
    assert torch.allclose(f.S, exact_svd(W, 8).S)


def test_non_finite_matrix_is_refused_by_name():
    W = torch.randn(20, 10)
    require_finite(W, "w")
    W[2, 3] = float("nan")
    with pytest.raises(CheckpointError, match="^m.weight holds 1 NaN or inf value"):
        require_finite(W, "m.weight")


def test_energy_captured():
    s = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    W = spectrum_matrix(10, 6, s)
    f = exact_svd(W, 2)
    assert abs(energy_captured(f.S, W) - 13 / 14) < 1e-5
    assert isinstance(f, Factors)
