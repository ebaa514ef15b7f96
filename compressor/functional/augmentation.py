"""Basis augmentation Û = [U | orth(G ⟂ U)] (paper Appendix A, eq. 7)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .orthonormal import reorthonormalize

# The augmentation's first orthonormalization takes Cholesky QR for blocks of at least this many
# rows and columns. Cholesky QR turns Householder's panel-by-panel factorization into two GEMMs,
# which only pays once the block is tall and wide enough for them to outweigh its fixed cost
# (a float64 copy, the Gram, a triangular inverse); a smaller block keeps Householder QR.
_CHOLESKY_FIRST_PASS_MIN_ROWS = 4096
_CHOLESKY_FIRST_PASS_MIN_COLUMNS = 32


def regularizing_noise(n: int, k: int, *, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """n×k generic directions, cheaply: a Gaussian block of m = min(n, 4k + 64) rows repeated
    down the n rows, every row with a random sign.

    The augmentation's noise only has to make its columns linearly independent of each other
    and of the basis, and well-conditioned once the basis is projected off. These are: the row
    signs cancel in their Gram, which is about (n/m)·ZᵀZ for the Gaussian m×k block Z, so for
    m < n their κ is about that of Z, (1 + √(k/m))/(1 − √(k/m)) < 3 as k/m < 1/4. For a wide
    basis (VGG16's 25088-wide classifier) n·k normals would be the noise's main cost; m·k
    normals and n signs keep it small next to the augmentation's products.
    """
    m = min(n, 4 * k + 64)
    block = torch.randn(m, k, generator=generator, dtype=dtype)
    if m == n:
        return block
    signs = torch.randint(0, 2, (n, 1), generator=generator, dtype=dtype).mul_(2).sub_(1)
    return block.repeat(-(-n // m), 1)[:n].mul_(signs)


def orthonormal_complement(basis: Tensor, directions: Tensor, k: int, *, seed: int = 0) -> Tensor:
    """k orthonormal columns spanning (as far as possible) ``directions`` projected off ``basis``.

    The result Q satisfies QᵀQ = I and basisᵀQ = 0 (to round-off), so [basis | Q] is orthonormal
    and contains basis exactly. Where the gradient directions are degenerate (zero or inside
    span(basis)), random directions fill in: the new columns carry zero coefficients, so the
    weight is unchanged whatever they are.
    """
    n = basis.shape[0]
    k = min(k, n - basis.shape[1])
    if k <= 0:
        return basis.new_zeros(n, 0)
    work = torch.float64 if basis.dtype == torch.float64 else torch.float32
    b, d = basis.to(work), directions.to(work)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # A tiny random component keeps the block full rank when G is rank deficient; it only
    # changes which directions fill the degenerate part of the new basis, never W. Its scale:
    # 1e-3 of the gradient's RMS entry (all of its columns: one contiguous read).
    scale = d.norm() / math.sqrt(d.numel()) if d.numel() else d.new_tensor(0.0)
    g = regularizing_noise(n, k, generator=gen, dtype=work).to(b.device)
    g.mul_(1e-3 * scale if float(scale) > 0 else 1.0)
    take = min(k, d.shape[1])
    g[:, :take] += d[:, :take]  # [G | 0] + noise in one pass, without copying the strided slice
    # Classical Gram–Schmidt twice = numerically orthogonal to basis; each projection
    # g − B(Bᵀg) is one GEMM that accumulates into g. After the first pass the block is
    # orthonormal and the second removes only round-off, so Cholesky QR suffices there (its
    # ε·κ² error is harmless at κ ≈ 1, and it is two GEMMs instead of a panel-by-panel
    # Householder QR); a tall block's first pass takes it too, see _orthonormalize_first_pass.
    g.addmm_(b, b.mT @ g, alpha=-1.0)
    g = _orthonormalize_first_pass(g)
    g.addmm_(b, b.mT @ g, alpha=-1.0)
    g, _ = reorthonormalize(g)
    return g.to(basis.dtype)


def _orthonormalize_first_pass(g: Tensor) -> Tensor:
    """An orthonormal basis of span(G) for the augmentation's first pass.

    A tall block takes Cholesky QR with the Gram and its factor in float64 and the product
    Q = G R⁻¹ in G's precision: Q is orthonormal up to ~κ(G)·ε, and the second pass, which
    expects only round-off, repairs anything below ~0.5. The regularizing noise keeps κ(G) below
    ~1.5e4: it bounds σ_min(G) from below at ~1e-3/√r of ‖G‖ even for a rank-one gradient, the
    worst case as ‖G‖ is largest next to G's RMS entry there, so in float32 Q is orthonormal to
    ~2e-3 before the second pass. For a tall block (VGG16's 25088×52 classifier block) a Gram
    and one GEMM cost less than Householder's panel-by-panel QR; a small or narrow block, or one
    whose float64 Cholesky fails or whose R has a diagonal spanning more than 1e5 (κ(G) > 1e5),
    takes Householder QR.
    """
    if g.shape[0] < _CHOLESKY_FIRST_PASS_MIN_ROWS or g.shape[1] < _CHOLESKY_FIRST_PASS_MIN_COLUMNS:
        return torch.linalg.qr(g)[0]
    g64 = g.double()
    lower, info = torch.linalg.cholesky_ex(g64.mT @ g64)
    diag = lower.diagonal()
    if int(info) != 0 or not bool(torch.isfinite(lower).all()) or float(diag.min()) <= 1e-5 * float(diag.max()):
        return torch.linalg.qr(g)[0]
    eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    r_inv = torch.linalg.solve_triangular(lower.mT, eye, upper=True)
    return g @ r_inv.to(g.dtype)


def augment_basis(basis: Tensor, gradient: Tensor, new_rank: int, *, seed: int = 0) -> Tensor:
    """Û = [U | orth(G ⟂ U)] with ``new_rank`` columns (paper eq. 7, span(Û) ⊇ span(U)).

    Keeping U as the leading block makes ÛᵀU = [I; 0] exactly, so the projected core
    Ŝ = (ÛᵀU) S (VᵀV̂) is S padded with zeros: augmentation leaves W unchanged bit for bit.
    """
    extra = orthonormal_complement(basis, gradient, new_rank - basis.shape[1], seed=seed)
    return torch.cat([basis, extra], dim=1)
