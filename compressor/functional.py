"""Pure maths of low-rank factorization and RobustDLRT (no modules, no state).

- initial factors: reduced or randomized SVD, HOSVD of the channel modes of a conv kernel
- basis augmentation: Û = [U | orth(G ⟂ U)] (paper Appendix A, eq. 7)
- truncation rank by relative tolerance τ, one vectorized pass
- the spectral regularizer R (paper Definition 1) with its closed-form gradient (Prop. 1a)
- condition numbers, mode products for Tucker cores
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Above this many entries a rank-r factorization with r well below full rank uses a randomized
# SVD: VGG16's 4096×25088 classifier costs ~10 s as a reduced SVD on 2 cores, ~1 s randomized.
_RANDOMIZED_MIN_ENTRIES = 4_000_000


# ----------------------------------------------------------------------------- SVD / init


def truncation_rank(sigma: Tensor, tol: float, r_min: int = 1, r_max: int | None = None) -> int:
    """Smallest r with ‖σ[r:]‖₂ < tol·‖σ‖₂, clipped to [r_min, r_max] (and to len(σ)).

    One vectorized pass over the tail sums of σ² (no Python loop, one device sync).
    ``tol = 0`` keeps every nonzero singular value.
    """
    n = sigma.numel()
    r_max = n if r_max is None else min(r_max, n)
    r_min = min(r_min, r_max)
    if n == 0:
        return 0
    s2 = sigma.detach().double() ** 2
    # tail[k] = Σ_{i≥k} σ_i², k = 0..n (tail[n] = 0)
    tail = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])
    threshold = (tol**2) * tail[0]
    if tol == 0.0:
        ok = tail <= 0.0  # keep until only exact zeros remain
    else:
        ok = tail < threshold
    r = int(torch.argmax(ok.to(torch.int8)).item()) if bool(ok.any()) else n
    return max(r_min, min(r, r_max))


def top_singular(matrix: Tensor, rank: int, *, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Leading ``rank`` singular triplets (U, σ, V) of a 2-D matrix, reduced (never n×n).

    Large matrices at a rank well below full use torch.svd_lowrank with power iterations,
    seeded locally so the global RNG is untouched; the result is re-orthonormalized.
    """
    m, n = matrix.shape
    k = min(m, n)
    rank = min(rank, k)
    a = matrix.detach()
    if a.numel() >= _RANDOMIZED_MIN_ENTRIES and rank + 20 < k // 2:
        with torch.random.fork_rng(devices=[a.device] if a.device.type == "cuda" else []):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(a, q=min(rank + 20, k), niter=4)
        u, s, v = u[:, :rank], s[:rank], v[:, :rank]
        # svd_lowrank's factors are orthonormal up to round-off; one QR pass makes them exact
        u = _orthonormalize_keep_span(u)
        v = _orthonormalize_keep_span(v)
        return u, s, v
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank].mT


def singular_values(matrix: Tensor) -> Tensor:
    return torch.linalg.svdvals(matrix.detach())


def _orthonormalize_keep_span(q: Tensor) -> Tensor:
    """QR with the sign fixed so that columns keep their direction (diag(R) > 0)."""
    qq, rr = torch.linalg.qr(q)
    d = torch.sign(torch.diagonal(rr))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return qq * d


def reorthonormalize(basis: Tensor) -> tuple[Tensor, Tensor]:
    """basis = Q R with Q orthonormal and R ≈ I (upper triangular, positive diagonal).

    Repeated products Û·P in float32 let orthonormality drift by round-off every cycle;
    re-factoring after each truncation (and folding R into the core) stops the drift
    without changing W.
    """
    q, r = torch.linalg.qr(basis)
    d = torch.sign(torch.diagonal(r))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return q * d, r * d[:, None]


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


def hosvd_channel_factors(
    kernel: Tensor, r_out: int, r_in: int, *, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Tucker-2 HOSVD of a conv kernel on its channel modes.

    Returns (U_out: C_out×r_out, U_in: C_in×r_in, core: r_out×r_in×kh×kw) with
    core = W ×₀ U_outᵀ ×₁ U_inᵀ, so W ≈ core ×₀ U_out ×₁ U_in (exact at full rank).
    """
    u_out, _, _ = top_singular(unfold(kernel, 0), r_out, seed=seed)
    u_in, _, _ = top_singular(unfold(kernel, 1), r_in, seed=seed + 1)
    core = mode_product(kernel, u_out, u_in)
    return u_out, u_in, core


# ----------------------------------------------------------------------------- augmentation


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
    g = directions[:, :k] if directions.shape[1] >= k else directions
    work = torch.float64 if basis.dtype == torch.float64 else torch.float32
    b = basis.to(work)
    g = g.to(work)
    if g.shape[1] < k:
        g = torch.cat([g, g.new_zeros(n, k - g.shape[1])], dim=1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    scale = g.norm() / math.sqrt(g.numel()) if g.numel() else g.new_tensor(0.0)
    # A tiny random component keeps QR well-defined when G is rank deficient; it only changes
    # which directions fill the degenerate part of the new basis, never W.
    noise = torch.randn(n, k, generator=gen, dtype=work).to(b.device)
    g = g + noise * (1e-3 * scale if float(scale) > 0 else 1.0)
    for _ in range(2):  # classical Gram-Schmidt twice = numerically orthogonal to basis
        g = g - b @ (b.mT @ g)
        g, _ = torch.linalg.qr(g)
    return g.to(basis.dtype)


def augment_basis(basis: Tensor, gradient: Tensor, new_rank: int, *, seed: int = 0) -> Tensor:
    """Û = [U | orth(G ⟂ U)] with ``new_rank`` columns (paper eq. 7, span(Û) ⊇ span(U)).

    Keeping U as the leading block makes ÛᵀU = [I; 0] exactly, so the projected core
    Ŝ = (ÛᵀU) S (VᵀV̂) is S padded with zeros: augmentation leaves W unchanged bit for bit.
    """
    extra = orthonormal_complement(basis, gradient, new_rank - basis.shape[1], seed=seed)
    return torch.cat([basis, extra], dim=1)


# ----------------------------------------------------------------------------- regularizer


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
        # R = 0 means A is a multiple of a row-orthonormal matrix: a minimum, gradient 0
        safe = torch.where(r > 0, r, torch.ones_like(r))
        g = 2.0 * (dev @ a) / safe
        g = torch.where(r > 0, g, torch.zeros_like(g))
        return grad_out * g


def spectral_regularizer(a: Tensor) -> Tensor:
    """The paper's R (Definition 1) on a core matrix, computed in float32 (or float64).

    Under autocast the core may arrive in bf16; the regularizer's cancellation
    (AAᵀ − α²I) needs at least float32.
    """
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=a.device.type, enabled=False):
        return _SpectralRegularizer.apply(a.to(dtype))


def condition_number(a: Tensor) -> float:
    """κ = σ_max/σ_min of a core matrix (inf if singular)."""
    s = torch.linalg.svdvals(a.detach().double())
    if s.numel() == 0:
        return float("nan")
    smin = float(s[-1])
    return float("inf") if smin == 0.0 else float(s[0]) / smin
