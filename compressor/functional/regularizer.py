"""The spectral regularizer R (paper Definition 1) with its closed-form gradient (Prop. 1a)."""

from __future__ import annotations

import torch
from torch import Tensor


class _SpectralRegularizer(torch.autograd.Function):
    """R(A) = ‖A Aᵀ − α² I‖_F with α² = ‖A‖_F² / m for A (m × n), closed-form backward.

    For a square core S this equals the paper's ‖SᵀS − α²I‖ (same nonzero spectrum), and for a
    conv core we apply it to the mode-0 unfolding C₍₀₎ (m = r_out). Gradient (Prop. 1a):
    ∇R = 2 (AAᵀ − α²I) A / R; the α² term drops out because tr(AAᵀ − α²I) = 0.
    """

    @staticmethod
    def forward(ctx, a: Tensor) -> Tensor:  # type: ignore[override]
        m = a.shape[0]
        gram = a @ a.mT
        alpha2 = gram.diagonal().sum() / m
        dev = gram - alpha2 * torch.eye(m, dtype=a.dtype, device=a.device)
        r = torch.linalg.matrix_norm(dev)
        ctx.save_for_backward(a, dev, r)
        return r

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tensor:  # type: ignore[override]
        a, dev, r = ctx.saved_tensors
        # R = 0 means A is a multiple of a row-orthonormal matrix: a minimum, gradient 0. The
        # scalar factor goes onto the small m×m dev, not the m×n result (one GEMM and no extra
        # elementwise pass over the m×n unfolding).
        scale = torch.where(r > 0, 2.0 * grad_out / torch.where(r > 0, r, torch.ones_like(r)), torch.zeros_like(r))
        return (dev * scale) @ a


def spectral_regularizer(a: Tensor) -> Tensor:
    """The paper's R (Definition 1) on a core matrix, computed in float32 (or float64).

    Under autocast the core may arrive in bf16; the regularizer's cancellation
    (AAᵀ − α²I) needs at least float32.

    A wide matrix (m ≤ n, e.g. a conv core's C₍₀₎ = r_out × r_in·kh·kw) uses the m×m Gram AAᵀ;
    a tall one (m > n: a 1×1 conv with r_out > r_in) uses AᵀA. Either way R acts on the
    min(m, n) singular values that κ = σ_max/σ_min is taken over; the larger Gram would count
    m − n zero eigenvalues, so R = 0 (κ = 1) would be unreachable and β would only shrink A.
    """
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    if a.shape[0] > a.shape[1]:
        a = a.mT
    with torch.autocast(device_type=a.device.type, enabled=False):
        return _SpectralRegularizer.apply(a.to(dtype))
