"""Tucker-2 on a conv kernel's channel modes: unfoldings, mode products and the HOSVD."""

from __future__ import annotations

import torch
from torch import Tensor

from .svd import top_left_singular


def unfold(core: Tensor, mode: int) -> Tensor:
    """Mode-``mode`` unfolding of a 4-D Tucker core (r_out × r_in × kh × kw) into a matrix."""
    return core.movedim(mode, 0).reshape(core.shape[mode], -1)


def mode_product(core: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """core ×₀ leftᵀ ×₁ rightᵀ for a 2-D (r_out×r_in) or 4-D (r_out×r_in×kh×kw) core.

    ``left`` is (r_out_old × r_out_new), ``right`` is (r_in_old × r_in_new): the new core is the
    old one expressed in the new bases, as in Ŝ = (ÛᵀU) S (VᵀV̂) with left = UᵀÛ, right = VᵀV̂.
    """
    if core.dim() == 2:
        return left.mT @ core @ right
    # one mode at a time: a single einsum over both factors may form their r⁴ outer product
    out = torch.tensordot(left, core, dims=([0], [0]))  # (a, j, h, w)
    return torch.tensordot(right, out, dims=([0], [1])).transpose(0, 1)  # (a, b, h, w)


def hosvd_channel_factors(kernel: Tensor, r_out: int, r_in: int, *, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Tucker-2 HOSVD of a conv kernel on its channel modes.

    Returns (U_out: C_out×r_out, U_in: C_in×r_in, core: r_out×r_in×kh×kw) with
    core = W ×₀ U_outᵀ ×₁ U_inᵀ, so W ≈ core ×₀ U_out ×₁ U_in (exact at full rank).
    """
    u_out, _ = top_left_singular(unfold(kernel, 0), r_out, seed=seed)
    u_in, _ = top_left_singular(unfold(kernel, 1), r_in, seed=seed + 1)
    core = mode_product(kernel, u_out, u_in)
    return u_out, u_in, core
