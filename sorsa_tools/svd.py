"""Pure math: top-r SVD of one weight matrix, the residual, and accuracy measures.

W (out x in, HF orientation) = U diag(S) Vt + W_r with U (out, r), S (r,), Vt (r, in).
Everything runs in float32 or float64, whatever the storage dtype (torch has no bf16 SVD).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sorsa_tools.errors import CheckpointError

COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Factors:
    U: torch.Tensor  # (out, r)
    S: torch.Tensor  # (r,)
    Vt: torch.Tensor  # (r, in)
    niter: int | None = None  # power iterations a randomized SVD ran
    est_error: float | None = None  # its estimated remaining relative error of S
    method: str | None = None  # set where an iterative SVD handed over to the exact one

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


def require_finite(
    W: torch.Tensor,
    name: str,
    fix: str = "the checkpoint is corrupt or was saved from a diverged run; re-download or re-save it",
) -> None:
    """Refuse a tensor holding NaN or inf where it is read: an SVD (LAPACK) or a training step
    would fail on it later with a message that names neither the tensor nor the cause."""
    if not bool(torch.isfinite(W).all()):
        bad = int((~torch.isfinite(W)).sum())
        raise CheckpointError(f"{name} holds {bad} NaN or inf value(s): {fix}")


def exact_svd(W: torch.Tensor, rank: int) -> Factors:
    """Top-r of the full SVD (torch.linalg.svd), in W's dtype."""
    A, t = _orient(W)
    U, S, Vt = torch.linalg.svd(A, full_matrices=False)
    return _unorient(U[:, :rank], S[:rank], Vt[:rank], t)


def _exact_handover(W: torch.Tensor, rank: int, steps: int) -> Factors:
    """The exact SVD where an iterative one hands over, labelled so (after `steps` steps)."""
    f = exact_svd(W, rank)
    f.niter, f.est_error, f.method = steps, 0.0, "exact"
    return f


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


class _RitzConvergence:
    """The remaining relative error of the top-r Ritz values, estimated from how they converge.

    Each update takes the Ritz values of one more step. From the largest relative change of two
    successive steps, delta, and the rate rho = delta / previous delta, the error still to go is
    delta rho / (1 - rho) if they keep converging at that rate. The rate taken is the slower of
    the last two: Krylov convergence on flat spectra is irregular, and one fast step followed by
    a slow one made the single-rate estimate undershoot (on Gemma 3 270M, 2 of 252 modules at
    ranks 16 and 64 stopped at a true error of up to 2.2e-3 against a tol of 5e-4; with the
    slower rate none exceeded 3e-4, for 3 % more steps).
    """

    def __init__(self) -> None:
        self.prev: torch.Tensor | None = None
        self.delta: float | None = None
        self.rho: float | None = None

    def update(self, s: torch.Tensor) -> float:
        prev, self.prev = self.prev, s
        if prev is None:
            return float("inf")
        delta = float(((s - prev).abs() / s.clamp_min(torch.finfo(s.dtype).tiny)).max())
        last, self.delta = self.delta, delta
        if delta == 0.0:
            return 0.0
        if last is None or delta >= last:  # not (yet) converging: no rate to extrapolate
            self.rho = None
            return float("inf")
        rho, last_rho = delta / last, self.rho
        self.rho = rho
        rho = max(rho, last_rho or 0.0)
        return delta * rho / (1.0 - rho)


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
    d1, d2: rho ~ d2 / d1 and the remaining error ~ d2 rho / (1 - rho) (`_RitzConvergence`: the
    slower of the last two rates). Spectra that decay fast stop at `niter`; the flat spectra of
    real weights get the iterations they need.

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
    conv = _RitzConvergence()
    est = float("inf")
    it = 0
    while True:
        Zt = A.T @ Q  # (n, q) = (Q^T A)^T
        if tol:
            est = conv.update(torch.linalg.svdvals(Zt)[:rank])
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


def krylov_svd(
    W: torch.Tensor,
    rank: int,
    oversample: int,
    niter: int,
    generator: torch.Generator | None = None,
    tol: float | None = None,
    max_niter: int = 16,
) -> Factors:
    """Randomized block Krylov SVD: the range finder keeps every power-iteration block.

    Subspace iteration (`randomized_svd`, PEFT's `svd_lowrank`) throws away all but its last
    block; a Krylov space of the same matrix products holds every block [V, A^T A V, ...,
    (A^T A)^k V], and its Ritz values converge at a rate set by the square root of the spectral
    gap instead of the gap itself (Musco & Musco 2015). On the flat spectra of LLM weights that
    buys the same accuracy for about half the products.

    Each of the `niter` (at least) to `max_niter` steps costs one product with A and one with
    A^T on a block of b = rank + oversample columns; the new block is orthogonalised against the
    whole basis twice (block Gram-Schmidt, then CholeskyQR), which keeps the basis V orthonormal
    to float32 precision. The Ritz values come from the Gram matrix of M = A V, updated one block
    at a time; with `tol` the steps stop when their estimated remaining relative error is below
    it. The factors are the top-r SVD of M V^T (Rayleigh-Ritz on the right), read off the Gram
    matrix's eigenvectors E: U = orth(M E / S), Vt = (V E)^T. With niter = 4 that is exactly
    PEFT's product count (5 with A, 4 with A^T) for S within 8e-5 of exact on Llama-2-7B shapes
    where PEFT's misses by 10 %; a further left Rayleigh-Ritz step (one more product) bought 1e-5
    and was dropped. A float32 Gram matrix squares the condition number: the relative error of
    the r-th Ritz value it gives is about 3e-10 (sigma_1 / sigma_r)^2, measured 1e-5 at
    sigma_1 / sigma_r = 180 and 3e-4 at 860, where real weights sit below 20.
    """
    A, t = _orient(W)
    m, n = A.shape
    b = min(rank + oversample, n)
    steps = max(niter, max_niter) if tol else niter
    blocks = min(steps + 1, n // b)
    if blocks < 2:  # not two blocks of the narrow side: the exact SVD costs no more, and says so
        return _exact_handover(W, rank, 0)
    V = torch.empty(n, blocks * b, dtype=A.dtype, device=A.device)
    M = torch.empty(m, blocks * b, dtype=A.dtype, device=A.device)
    G = torch.empty(blocks * b, blocks * b, dtype=A.dtype, device=A.device)
    omega = torch.randn(n, b, generator=generator, dtype=A.dtype, device="cpu").to(A.device)
    V[:, :b] = _orthonormalize(omega)
    conv = _RitzConvergence()
    est = float("inf")
    eig = None  # (hi, eigenvalues, eigenvectors) of the last Gram matrix decomposed in full
    j = 0
    while True:
        lo, hi = j * b, (j + 1) * b
        M[:, lo:hi] = A @ V[:, lo:hi]  # (no out= into strided views: the same on every device)
        Y = M[:, lo:hi]
        G[:hi, lo:hi] = M[:, :hi].T @ Y
        G[lo:hi, :lo] = G[:lo, lo:hi].T
        if tol and j + 2 >= niter:  # Ritz values of the basis, from the steps the estimate needs
            if j >= niter:  # a step it may stop at: keep the vectors the factors are read from
                eig = (hi, *torch.linalg.eigh(G[:hi, :hi]))
                lam = eig[1]
            else:
                lam = torch.linalg.eigvalsh(G[:hi, :hi])
            est = conv.update(lam.flip(0)[:rank].clamp_min(0).sqrt())
        if j + 1 >= blocks or (j >= niter and (not tol or est <= tol)):
            break
        Z = A.T @ Y
        # a whisper of noise (1e-6 of Z, far above float32 rounding, far below what moves the
        # Ritz values) keeps the block full rank where the Krylov space runs out (rank(W) < the
        # basis): those columns become fresh random directions instead of rounding noise
        noise = torch.randn(n, b, generator=generator, dtype=A.dtype, device="cpu").to(A.device)
        Z += noise * (1e-6 * float(torch.linalg.vector_norm(Z)) / (n * b) ** 0.5)
        basis = V[:, :hi]
        Z -= basis @ (basis.T @ Z)
        Z = _orthonormalize(Z)
        Z -= basis @ (basis.T @ Z)
        V[:, hi : hi + b] = _orthonormalize(Z)
        j += 1
    if tol and not est <= tol and blocks < steps + 1:
        # the basis filled the whole narrow side before reaching tol: the full SVD is no more
        # work than the steps still owed (n <= (steps + 1) b), and exact
        return _exact_handover(W, rank, j)
    hi = (j + 1) * b
    lam, E = eig[1:] if eig is not None and eig[0] == hi else torch.linalg.eigh(G[:hi, :hi])
    S = lam[-rank:].flip(0).clamp_min(0).sqrt()
    E = E[:, -rank:].flip(1)
    # A ~ (A V) V^T = M V^T, whose top-r SVD is (M E / S) diag(S) (V E)^T
    U = _orthonormalize((M[:, :hi] @ E) / S.clamp_min(torch.finfo(S.dtype).tiny))
    f = _unorient(U, S, (V[:, :hi] @ E).T, t)
    f.niter = j
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
    W: torch.Tensor,
    W_r: torch.Tensor,
    f: Factors,
    probes: int = 8,
    seed: int = 0,
    rows: int | None = None,
) -> tuple[float, float]:
    """(||(W_r + U S Vt - W) x|| / ||W x||, ||W_r x|| / ||W x||) for a random probe block x.

    A probe costs a few matrix-vector products instead of a dense reconstruction, and catches
    any error that is not vanishingly rare in direction. With `rows`, only that many evenly
    spaced rows take part: a wrong orientation, a missing S, a factor rounded differently or a
    non-finite value shows in any row, and the check then costs a few small products instead of
    passes over W (decompose and merge check every matrix this way, and compare the bytes they
    wrote with the bytes they checked). Float32 products of W and W_r: their rounding (~1e-7
    relative) sits far below every tolerance this is checked against. The second number scales
    the rounding tolerance of a low-precision W_r.
    """
    U = f.U
    if rows is not None and rows < W.shape[0]:
        idx = torch.linspace(0, W.shape[0] - 1, rows, device=W.device).round().long()
        W, W_r, U = W[idx], W_r[idx], U[idx]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(W.shape[1], probes, generator=g, dtype=torch.float32).to(W.device)
    ref = (W.float() @ x).double()
    low = U.double() @ (f.S.double().unsqueeze(1) * (f.Vt.double() @ x.double()))
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
