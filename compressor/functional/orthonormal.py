"""Orthonormal bases: sign-fixed QR, Cholesky re-orthonormalization, and tall basis products."""

from __future__ import annotations

import torch
from torch import Tensor

# tall_matmul pads the narrow factor's columns to a multiple of 8 only from this many rows and
# columns: below them the ragged last column block is a small share of the product, and the
# padded product's extra copy out cancels what padding saves (an augmentation's 52-column
# block stays unpadded).
_PADDED_PRODUCT_MIN_ROWS = 8192
_PADDED_PRODUCT_MIN_COLUMNS = 64


def _orthonormalize_keep_span(q: Tensor) -> Tensor:
    """QR with the sign fixed so that columns keep their direction (diag(R) > 0)."""
    qq, rr = torch.linalg.qr(q)
    d = torch.sign(torch.diagonal(rr))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return qq * d


def qr_positive(a: Tensor) -> tuple[Tensor, Tensor]:
    """Householder QR, a = Q R, with the signs fixed so that diag(R) ≥ 0 (a unique factorization)."""
    q, r = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(r))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return q * d, r * d[:, None]


def tall_matmul(basis: Tensor, small: Tensor) -> Tensor:
    """basis @ small for a tall basis (n×r) and a small r×k factor, contiguous.

    CPU GEMM kernels compute the output in blocks of a multiple of 8 float32 columns (the lanes
    of a vector register); a k that is not a multiple of 8 leaves a ragged last block computed
    with partly empty registers, and for a tall basis (VGG16's classifier basis times a
    truncation's P) that block runs over every one of its n rows. So from
    ``_PADDED_PRODUCT_MIN_ROWS`` rows and ``_PADDED_PRODUCT_MIN_COLUMNS`` columns k is padded
    with zero columns and the product sliced.
    """
    k = small.shape[1]
    pad = -k % 8
    if (
        pad == 0
        or basis.device.type != "cpu"
        or basis.shape[0] < _PADDED_PRODUCT_MIN_ROWS
        or k < _PADDED_PRODUCT_MIN_COLUMNS
    ):
        return basis @ small
    return (basis @ torch.nn.functional.pad(small, (0, pad)))[:, :k].contiguous()


def reorthonormalize(basis: Tensor) -> tuple[Tensor, Tensor]:
    """basis = Q R with Q orthonormal and R ≈ I (upper triangular, positive diagonal), for a
    basis that is orthonormal up to round-off (Û·P after a truncation).

    Repeated products Û·P in float32 let orthonormality drift by round-off every cycle;
    re-factoring after each truncation (and folding R into the core) stops the drift without
    changing W. Cholesky QR (R = chol(BᵀB), Q = B R⁻¹) does it with one Gram matrix and one
    triangular solve: half the flops of Householder QR and all of it BLAS-3 (matrix-matrix
    products, where Householder QR works panel by panel). Its error grows like ε·κ(B)²,
    harmless at κ(B) ≈ 1; a basis that is not (Cholesky fails) takes Householder QR.
    """
    gram = basis.mT @ basis
    lower, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0 or not bool(torch.isfinite(lower).all()):
        return qr_positive(basis)
    r = lower.mT
    # Q = B R⁻¹ as one GEMM with the small explicit inverse (well-conditioned: R ≈ I): a
    # triangular solve from the right would copy and transpose the tall B twice
    r_inv = torch.linalg.solve_triangular(r, torch.eye(r.shape[0], dtype=r.dtype, device=r.device), upper=True)
    return tall_matmul(basis, r_inv), r


def orthonormal_columns(p: Tensor) -> Tensor:
    """The kept singular vectors P (r×k) of a truncation, orthonormal to ~float64 round-off
    before the final rounding to P's dtype (so ‖QᵀQ − I‖ ≈ 1e-8 in float32). Same span as P.

    float32 eigen/singular vectors are orthonormal only to ~1e-6, and U·P inherits that error
    at every truncation. With P corrected first, the float32 product U·P adds only its own
    rounding, ~1e-8 a cycle, to ‖UᵀU − I‖ (tests/test_layers.py checks the drift), so the tall
    basis need not be re-orthonormalized after every truncation (see TuckerConv2d.truncate_).
    The correction is one step of the polar iteration, Q = P (I − E/2) with E = PᵀP − I taken
    in float64: QᵀQ = I + O(‖E‖²). It needs only the small Gram E and one product in P's
    precision, where a Cholesky QR adds a factorization and a triangular inverse in float64;
    a P further from orthonormal (‖E‖ > 1e-3), where O(‖E‖²) would not be round-off, takes the
    Cholesky QR.
    """
    if p.shape[1] == 0:
        return p
    if p.dtype == torch.float64:  # a float64 model: orthonormal to round-off, O(‖E‖²) is not
        return reorthonormalize(p)[0]
    p64 = p.double()
    e = p64.mT @ p64
    e.diagonal().sub_(1.0)
    if float(e.abs().max()) > 1e-3:
        q, _ = reorthonormalize(p64)
        return q.to(p.dtype)
    # the correction P·E is ~‖E‖ small: its own rounding in p's precision is ~‖E‖·ε
    return p - 0.5 * (p @ e.to(p.dtype))
