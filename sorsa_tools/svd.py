"""Pure math: top-r SVD of one weight matrix, the residual, and accuracy measures.

W (out x in, HF orientation) = U diag(S) Vt + W_r with U (out, r), S (r,), Vt (r, in).
Everything runs in float32 or float64, whatever the storage dtype (torch has no bf16 SVD).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Factors:
    U: torch.Tensor  # (out, r)
    S: torch.Tensor  # (r,)
    Vt: torch.Tensor  # (r, in)
    niter: int | None = None  # power iterations a randomized SVD ran
    est_error: float | None = None  # its estimated remaining relative error of S

    @property
    def rank(self) -> int:
        return self.S.shape[0]

    def principal(self) -> torch.Tensor:
        """W_p = U diag(S) Vt."""
        return (self.U * self.S) @ self.Vt


def _normalize_signs(U: torch.Tensor, Vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make each column of U have its largest-magnitude entry positive.

    Singular vectors are defined up to a sign; fixing it makes factors reproducible across
    LAPACK builds, devices and methods.
    """
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U.gather(0, idx.unsqueeze(0))).squeeze(0)
    signs[signs == 0] = 1
    return U * signs, Vt * signs.unsqueeze(1)


def _orient(W: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """SVD a tall matrix: LAPACK is ~2x faster on 11008x4096 than on its 4096x11008 transpose."""
    if W.shape[0] < W.shape[1]:
        return W.T, True
    return W, False


def _unorient(U: torch.Tensor, S: torch.Tensor, Vt: torch.Tensor, transposed: bool) -> Factors:
    if transposed:  # W.T = U S Vt  =>  W = Vt.T S U.T
        U, Vt = Vt.T, U.T
    U, Vt = _normalize_signs(U.contiguous(), Vt.contiguous())
    return Factors(U.contiguous(), S.contiguous(), Vt.contiguous())


def exact_svd(W: torch.Tensor, rank: int) -> Factors:
    """Top-r of the full SVD (torch.linalg.svd), in W's dtype."""
    A, t = _orient(W)
    U, S, Vt = torch.linalg.svd(A, full_matrices=False)
    return _unorient(U[:, :rank], S[:rank], Vt[:rank], t)


def _orthonormalize(Y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of Y's columns.

    CholeskyQR (a Gram matrix, a Cholesky factor, a triangular solve) costs half a Householder QR
    on tall blocks and is exact enough for a power-iteration basis whose condition number is that
    of the top singular values (~10-100). A basis too ill-conditioned for it (Cholesky fails, or
    the result is not orthonormal to 1e-3) falls back to Householder QR.
    """
    L, info = torch.linalg.cholesky_ex(Y.T @ Y)
    if int(info) == 0:
        Q = torch.linalg.solve_triangular(L.T, Y, upper=True, left=False)
        G = Q.T @ Q
        G.diagonal().sub_(1.0)
        if bool(torch.isfinite(G).all()) and float(G.abs().max()) < 1e-3:
            return Q
    return torch.linalg.qr(Y)[0]


def randomized_svd(
    W: torch.Tensor,
    rank: int,
    oversample: int,
    niter: int,
    generator: torch.Generator | None = None,
    tol: float | None = None,
    max_niter: int = 16,
) -> Factors:
    """Halko-Martinsson-Tropp range finder with orthonormalised power iterations.

    q = rank + oversample columns are sketched; each power iteration sharpens the spectrum.
    With `tol`, iterations go on past `niter` (up to `max_niter`) until the estimated remaining
    relative error of the top-r singular values is below `tol`. The estimate is free: the
    product A^T Q that each iteration needs anyway has the Ritz values as singular values; they
    rise monotonically to the true ones at a geometric rate rho, so from two successive changes
    d1, d2: rho ~ d2 / d1 and the remaining error ~ d2 rho / (1 - rho). Spectra that decay fast
    stop at `niter`; the flat spectra of real weights get the iterations they need.

    Power iterations in a cheaper dtype (bf16 products, f32 Rayleigh-Ritz) were tried and
    rejected: on the flat spectra of real weights (Gemma 3 270M) they stall near 1e-3 relative
    error of S, whatever the number of iterations (docs/BENCHMARKS.md).
    """
    A, t = _orient(W)
    m, n = A.shape
    q = min(rank + oversample, n)
    omega = torch.randn(n, q, generator=generator, dtype=A.dtype, device="cpu").to(A.device)
    Q = _orthonormalize(A @ omega)
    limit = max(niter, max_niter) if tol else niter
    prev: torch.Tensor | None = None
    prev_delta: float | None = None
    est = float("inf")
    it = 0
    while True:
        Zt = A.T @ Q  # (n, q) = (Q^T A)^T
        if tol:
            s = torch.linalg.svdvals(Zt)[:rank]
            if prev is not None:
                delta = float(((s - prev).abs() / s.clamp_min(torch.finfo(s.dtype).tiny)).max())
                if delta == 0.0:
                    est = 0.0
                elif prev_delta is not None and delta < prev_delta:
                    rho = delta / prev_delta
                    est = delta * rho / (1.0 - rho)
                else:
                    est = float("inf")
                prev_delta = delta
            prev = s
            if it >= niter and est <= tol:
                break
        if it >= limit:
            break
        Q = _orthonormalize(A @ _orthonormalize(Zt))
        it += 1
    Ub, S, Vt = torch.linalg.svd(Zt.T, full_matrices=False)
    U = Q @ Ub[:, :rank]
    f = _unorient(U, S[:rank], Vt[:rank], t)
    f.niter = it
    f.est_error = est if tol else None
    return f


def residual(W: torch.Tensor, f: Factors) -> torch.Tensor:
    """W_r = W - U diag(S) Vt, in the compute dtype (cast once by the caller)."""
    return torch.addmm(W, f.U * f.S, f.Vt, alpha=-1.0)


def energy_captured(S: torch.Tensor, W: torch.Tensor) -> float:
    """||S_r||^2 / ||W||_F^2: the share of W's energy the principal part holds."""
    total = float(torch.linalg.vector_norm(W.float())) ** 2 if W.numel() else 0.0
    return float(S.double().square().sum()) / total if total > 0 else 1.0


def reconstruction_probe(
    W: torch.Tensor, W_r: torch.Tensor, f: Factors, probes: int = 8, seed: int = 0
) -> tuple[float, float]:
    """(||(W_r + U S Vt - W) x|| / ||W x||, ||W_r x|| / ||W x||) for a random probe block x.

    A probe costs a few matrix-vector products instead of a dense reconstruction, and catches
    any error that is not vanishingly rare in direction. Float32 products: their rounding
    (~1e-7 relative) sits far below every tolerance this is checked against. The second number
    scales the rounding tolerance of a low-precision W_r.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(W.shape[1], probes, generator=g, dtype=torch.float32)
    ref = (W.float() @ x).double()
    low = f.U.double() @ (f.S.double().unsqueeze(1) * (f.Vt.double() @ x.double()))
    res = (W_r.float() @ x).double()
    diff = float((res + low - ref).norm())
    den = float(ref.norm())
    if den == 0:
        return diff, float(res.norm())
    return diff / den, float(res.norm()) / den


def reconstruction_error(
    W: torch.Tensor, W_r: torch.Tensor, f: Factors, probes: int = 8, seed: int = 0
) -> float:
    """||(W_r + U S Vt - W) x|| / ||W x|| for a random probe block x (in, probes)."""
    return reconstruction_probe(W, W_r, f, probes, seed)[0]


def exact_singular_values(W: torch.Tensor) -> torch.Tensor:
    A, _ = _orient(W)
    return torch.linalg.svdvals(A)
