"""Singular values and vectors: reduced, Gram-eigen and randomized (block Krylov) SVD; rank by tolerance."""

from __future__ import annotations

import torch
from torch import Tensor

from .orthonormal import _orthonormalize_keep_span

# From this many entries a rank-r factorization whose Krylov space (2r + 100 columns) is at most
# half the short side uses a randomized (block Krylov) SVD, which reads the matrix 8 times in
# narrow blocks, O(m·n·r) work instead of the O(m·n·min(m, n)) of a reduced SVD: it pays off for
# large matrices at a rank well below full (VGG16's 4096×25088 classifier, a ViT-B MLP at a low
# rank). Full rank always takes the exact path.
_RANDOMIZED_MIN_ENTRIES = 1_000_000
# left_singular(tol=τ) uses the Gram eigendecomposition when τ² ≥ this × m × ε (float32, m = 200:
# τ ≥ 0.05; the recipes' τ = 0.1 qualifies up to m ≈ 690; float64: nearly any τ > 0).
_GRAM_TOL_FACTOR = 100.0
# Krylov depth of the randomized SVD (blocks A Ω, (AAᵀ)AΩ, …): with block size r/2 + 25, depth 4
# reads A 8 times in (r/2 + 25)-column blocks. On decaying spectra it is as accurate as
# torch.svd_lowrank(q=r+20, niter=4), which reads A 10 times in (r+20)-column blocks: the Krylov
# space keeps every power (AAᵀ)^i AΩ that the power iteration discards, so it needs fewer and
# narrower passes (Musco & Musco 2015); bench/bench_factorize.py --accuracy compares the two.
_KRYLOV_DEPTH = 4
# Gram matrices are accumulated in float64 over column chunks of at most this many entries, so a
# 512×200704 unfolding (timm VGG16's 7×7 ConvMlp) needs no float64 copy of itself.
_GRAM_CHUNK_ENTRIES = 4_000_000


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


def uses_randomized_svd(m: int, n: int, rank: int) -> bool:
    """Whether a rank-``rank`` factorization of an m×n matrix takes the randomized path."""
    return m * n >= _RANDOMIZED_MIN_ENTRIES and 2 * _krylov_block(rank) * _KRYLOV_DEPTH <= min(m, n)


def svd(a: Tensor, *, full_matrices: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd`` that does not fail where float64 succeeds (see :func:`_retried`)."""
    return _retried(torch.linalg.svd, a, full_matrices=full_matrices)


def svdvals(a: Tensor) -> Tensor:
    """``torch.linalg.svdvals`` that does not fail where float64 succeeds (see :func:`_retried`)."""
    return _retried(torch.linalg.svdvals, a)


def _retried(fn, a: Tensor, **kwargs):
    """``fn(a)``, retried in float64 where LAPACK's divide-and-conquer SVD does not converge on a
    float32 input (it can on an ill-conditioned core with clustered singular values: a truncation
    under a harsh latency budget met one); the results in ``a``'s dtype. A non-finite input is not
    retried: its error stands."""
    try:
        return fn(a, **kwargs)
    except torch.linalg.LinAlgError:
        if a.dtype == torch.float64 or not bool(torch.isfinite(a).all()):
            raise
        out = fn(a.double(), **kwargs)
        return out.to(a.dtype) if isinstance(out, Tensor) else tuple(t.to(a.dtype) for t in out)


def top_singular(matrix: Tensor, rank: int, *, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Leading ``rank`` singular triplets (U, σ, V) of a 2-D matrix, reduced (never n×n).

    Large matrices at a rank well below full use a seeded randomized block Krylov SVD (the
    global RNG is untouched) with orthonormal factors; otherwise the reduced LAPACK SVD, which
    is exact at full rank.
    """
    m, n = matrix.shape
    rank = min(rank, m, n)
    a = matrix.detach()
    if uses_randomized_svd(m, n, rank):
        return _randomized_svd(a, rank, seed=seed, right=True)
    u, s, vh = svd(a)
    return u[:, :rank], s[:rank], vh[:rank].mT


def top_left_singular(matrix: Tensor, rank: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Leading ``rank`` left singular vectors U (m×rank, orthonormal) and values σ (rank).

    For one-sided factors (HOSVD of conv unfoldings) an eigendecomposition of the Gram matrix,
    accumulated in float64, is cheaper than an SVD (one m×m Gram product and a symmetric
    eigendecomposition of it, instead of bidiagonalizing the whole m×n matrix) and more
    accurate than a float32 SVD unless σ₁/σ_r > 10⁸ (its subspace error grows like ε₆₄κ², the
    SVD's like ε₃₂κ). At full rank U is square and orthonormal, so U Uᵀ A = A exactly, whatever
    the accuracy of single vectors.
    Large matrices at a rank well below full use the randomized SVD instead.
    """
    m, n = matrix.shape
    rank = min(rank, m, n)
    a = matrix.detach()
    if uses_randomized_svd(m, n, rank):
        u, s, _ = _randomized_svd(a, rank, seed=seed, right=False)
        return u, s
    if m <= n:
        lam, vecs = torch.linalg.eigh(gram64(a))
        u = vecs.flip(1)[:, :rank]
    else:  # tall: the n×n Gram AᵀA gives V; U spans A V (QR keeps it orthonormal exactly)
        lam, vecs = torch.linalg.eigh(gram64(a.mT))
        v = vecs.flip(1)[:, :rank]
        u = _orthonormalize_keep_span(_matmul64(a, v))
    s = lam.flip(0)[:rank].clamp_min(0).sqrt()
    return u.to(a.dtype), s.to(a.dtype)


def _krylov_block(rank: int) -> int:
    return rank // 2 + 25


def _randomized_svd(a: Tensor, rank: int, *, seed: int, right: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Randomized block Krylov SVD (Musco & Musco 2015) with Rayleigh–Ritz extraction.

    K = [AΩ, (AAᵀ)AΩ, …, (AAᵀ)^{d-1}AΩ], each block orthonormalized against the previous ones;
    then the SVD of Qᵀ A through the eigendecomposition of its small Gram (float64). The
    products Aᵀ Q_i of the iteration are reused for Qᵀ A, so A is read 2d times.
    """
    transposed = a.shape[0] > a.shape[1]
    if transposed:  # work on the short side: the Krylov blocks live in R^{min(m, n)}
        a = a.mT
    m, n = a.shape
    b = _krylov_block(rank)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, b, generator=gen, dtype=a.dtype).to(a.device)
    q, _ = torch.linalg.qr(a @ omega)
    blocks, products = [q], []
    for _ in range(_KRYLOV_DEPTH - 1):
        z = a.mT @ q  # n×b
        products.append(z)
        y = a @ z
        basis = torch.cat(blocks, dim=1)
        y = y - basis @ (basis.mT @ y)  # one block Gram–Schmidt pass, then Householder QR of [Q | y]:
        # on a fast-decaying spectrum what y adds to the earlier blocks can be ~1e-9 of its norm,
        # below float32 round-off, and Gram–Schmidt alone then returns a block that is far from
        # orthogonal to them (‖QᵀQ − I‖ ~ 0.1, Ritz values above the true σ); the trailing
        # columns of a Householder Q are orthonormal to the earlier ones whatever y holds
        q = torch.linalg.qr(torch.cat([basis, y], dim=1))[0][:, basis.shape[1] :]
        blocks.append(q)
    products.append(a.mT @ q)
    basis, at_q = torch.cat(blocks, dim=1), torch.cat(products, dim=1)  # Q (m×db), AᵀQ (n×db)
    # Rayleigh–Ritz: QᵀA = P Σ Wᵀ from the eigendecomposition of (QᵀA)(QᵀA)ᵀ = (AᵀQ)ᵀ(AᵀQ)
    lam, p = torch.linalg.eigh(gram64(at_q.mT))
    p = p.flip(1)[:, :rank]
    s = lam.flip(0)[:rank].clamp_min(0).sqrt().to(a.dtype)
    u = _orthonormalize_keep_span(basis @ p.to(a.dtype))
    v = _orthonormalize_keep_span(at_q @ p.to(a.dtype)) if right or transposed else None
    if transposed:
        u, v = v, u
    return u, s, (v if right else None)


def _matmul64(a: Tensor, b: Tensor) -> Tensor:
    return a.to(torch.float64) @ b.to(torch.float64)


def gram64(a: Tensor) -> Tensor:
    """A Aᵀ in float64, accumulated over column chunks (no float64 copy of a large A)."""
    if a.dtype == torch.float64:
        return a @ a.mT
    m, n = a.shape
    step = max(1, _GRAM_CHUNK_ENTRIES // max(m, 1))
    gram = torch.zeros(m, m, dtype=torch.float64, device=a.device)
    for j in range(0, n, step):
        c = a[:, j : j + step].to(torch.float64)
        gram.addmm_(c, c.mT)
    return gram


def principal_subspace(gram: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Leading ``rank`` eigenvectors (orthonormal columns) and all eigenvalues (descending, ≥ 0)
    of a symmetric positive semi-definite matrix, in float64.

    eigh fixes each eigenvector only up to its sign: the sign is chosen so that the entry of
    largest magnitude is positive, so equal statistics give equal bases on every process.
    """
    lam, vecs = torch.linalg.eigh(gram.to(torch.float64))
    return fix_signs(vecs.flip(1)[:, :rank]), lam.flip(0).clamp_min(0)


def fix_signs(vecs: Tensor) -> Tensor:
    """Flip columns so that each one's entry of largest magnitude is positive (a canonical sign)."""
    if vecs.numel() == 0:
        return vecs
    pivot = vecs.abs().argmax(dim=0)
    signs = torch.sign(vecs[pivot, torch.arange(vecs.shape[1], device=vecs.device)])
    return vecs * torch.where(signs == 0, torch.ones_like(signs), signs)


def singular_values(matrix: Tensor) -> Tensor:
    return svdvals(matrix.detach())


def rank_spectrum(matrix: Tensor, r_cap: int, *, seed: int = 0) -> Tensor:
    """Singular values to choose a rank by energy (``truncation_rank(σ, tol, r_min, r_cap)``).

    Exact path: all min(m, n) of them (eigenvalues of the float64 Gram matrix). Randomized path:
    the leading ``r_cap`` followed by one value carrying the rest of ‖A‖_F², so that every rank
    up to ``r_cap`` is chosen as it would be from the full spectrum.
    """
    m, n = matrix.shape
    a = matrix.detach()
    if uses_randomized_svd(m, n, r_cap):
        _, top, _ = _randomized_svd(a, r_cap, seed=seed, right=False)
        top = top.double()
        total = torch.linalg.vector_norm(a, dtype=torch.float64)
        rest = (total**2 - (top**2).sum()).clamp_min(0).sqrt()
        return torch.cat([top, rest.reshape(1)])
    lam = torch.linalg.eigvalsh(gram64(a if m <= n else a.mT))
    return lam.flip(0).clamp_min(0).sqrt()


def gram_suffices(tol: float | None, k: int, dtype: torch.dtype) -> bool:
    """Whether a rank rule at relative tolerance ``tol`` on k singular values may take them from
    a Gram eigendecomposition in ``dtype`` (see :func:`left_singular`)."""
    return tol is not None and tol > 0 and tol * tol >= _GRAM_TOL_FACTOR * k * torch.finfo(dtype).eps


def left_singular(a: Tensor, *, tol: float | None = None) -> tuple[Tensor, Tensor]:
    """All min(m, n) left singular vectors P (m×k) and values σ (k) of A (m×n), as a reduced SVD.

    A wide A (a conv core's unfolding, r × r·kh·kw) is first reduced by QR, Aᵀ = Q R, so
    A = Rᵀ Qᵀ and P, σ come from the SVD of the m×m Rᵀ: backward stable like the SVD of A,
    without forming its m×n right factor (the R-only QR of the n×m Aᵀ is O(n·m²), and the SVD
    then works on an m×m matrix).

    ``tol``: σ is only needed to choose a rank by relative tolerance ``tol`` (truncation). The
    eigendecomposition of the Gram A Aᵀ in A's precision is then accurate enough whenever
    tol² ≥ :data:`_GRAM_TOL_FACTOR`·m·ε: its eigenvalues σᵢ² are off by ≲ m·ε·σ₁², so the tail
    energy ‖σ[r:]‖² that the rule compares with tol²‖σ‖² moves by a negligible share of it,
    and its eigenvectors are orthonormal to round-off (the subspace kept is that of the SVD up
    to the conditioning of the gap at the cut, which no float32 method resolves better). It is
    cheaper than the QR + SVD path: one Gram product and a symmetric eigendecomposition, which
    a truncation runs on every mode of every core. Single σ below ~√ε·σ₁ lose their accuracy,
    so κ is never taken from these values.
    """
    m, n = a.shape
    if gram_suffices(tol, min(m, n), a.dtype):
        wide = m <= n
        lam, vecs = torch.linalg.eigh(a @ a.mT if wide else a.mT @ a)
        s, vecs = lam.flip(0).clamp_min(0).sqrt(), vecs.flip(1)
        # tall A: the n×n Gram gives the right vectors W; P = A W / σ, orthonormalized (columns
        # for σ = 0 are arbitrary, and QR keeps P orthonormal whatever they are)
        return (vecs if wide else _orthonormalize_keep_span(a @ vecs)), s
    if n > m:
        r = torch.linalg.qr(a.mT, mode="r")[1]
        p, s, _ = svd(r.mT)
        return p, s
    p, s, _ = svd(a)
    return p, s
