"""Condition numbers κ = σ_max/σ_min of core matrices: exact, or from the float64 Gram when it resolves κ."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .svd import gram64, svdvals

# condition_number(precise=False): the Gram's eigenvalues resolve κ where λ_min ≥ this·k·ε·λ_max
_GRAM_KAPPA_FACTOR = 1000.0


def condition_number(a: Tensor, *, precise: bool = True) -> float:
    """κ = σ_max/σ_min of a core matrix (inf if singular), from float64 singular values
    (``precise=False``: to ~0.1 %, for the κ trace the trainer records at every truncation).

    A non-square A is reduced by QR first (its singular values are those of the small square
    R): backward stable, and svdvals then works on a min(m, n)-square matrix instead of the
    whole unfolding (a conv core's C₍₀₎ is r_out × r_in·kh·kw).
    ``precise=False`` takes κ from the eigenvalues of A's float64 Gram matrix whenever they
    resolve it (:func:`_gram_condition_number`), else computes as above in the core's precision
    (at least float32; σ_min accurate to ~1e-7·σ_max).
    """
    a = a.detach()
    if not precise and min(a.shape) > 0:
        kappa = _gram_condition_number(a)
        if kappa is not None:
            return kappa
    a = a.double() if precise or a.dtype == torch.float64 else a.float()
    if a.shape[0] != a.shape[1] and min(a.shape) > 0:
        a = torch.linalg.qr(a if a.shape[0] > a.shape[1] else a.mT, mode="r")[1]
    s = svdvals(a)
    if s.numel() == 0:
        return float("nan")
    smin = float(s[-1])
    return float("inf") if smin == 0.0 else float(s[0]) / smin


def _gram_condition_number(a: Tensor) -> float | None:
    """κ of A (m×n) from the eigenvalues λ of its float64 Gram (the smaller of AAᵀ, AᵀA), or
    None where they do not resolve it to 0.1 %.

    The Gram's eigenvalues are off by ≲ k·ε₆₄·λ_max (k the inner dimension), so σ_min² = λ_min
    is accurate to 0.1 % while λ_min ≥ :data:`_GRAM_KAPPA_FACTOR`·k·ε₆₄·λ_max: κ up to ~5e4 for
    a 200×1800 conv-core unfolding, far beyond the cores' usual κ. A float64 Gram
    eigendecomposition replaces QR + svdvals here because it is cheaper for the unfoldings'
    tall, narrow shape (one GEMM and the eigenvalues of the small Gram, where Householder QR of
    the tall side works panel by panel), and the trainer records κ at every truncation.
    """
    wide = a.shape[0] <= a.shape[1]
    lam = torch.linalg.eigvalsh(gram64(a if wide else a.mT))
    lmin, lmax = float(lam[0]), float(lam[-1])
    inner = max(a.shape)
    if (
        not math.isfinite(lmax)
        or lmax <= 0
        or lmin < _GRAM_KAPPA_FACTOR * inner * torch.finfo(torch.float64).eps * lmax
    ):
        return None
    return math.sqrt(lmax / lmin)
