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

# From this many entries a rank-r factorization whose Krylov space (2r + 100 columns) is at most
# half the short side uses a randomized (block Krylov) SVD, which reads the matrix 8 times in
# narrow blocks, O(m·n·r) work instead of the O(m·n·min(m, n)) of a reduced SVD: it pays off for
# large matrices at a rank well below full (VGG16's 4096×25088 classifier, a ViT-B MLP at a low
# rank). Full rank always takes the exact path.
_RANDOMIZED_MIN_ENTRIES = 1_000_000
# left_singular(tol=τ) uses the Gram eigendecomposition when τ² ≥ this × m × ε (float32, m = 200:
# τ ≥ 0.05; the recipes' τ = 0.1 qualifies up to m ≈ 690; float64: nearly any τ > 0).
_GRAM_TOL_FACTOR = 100.0
# condition_number(precise=False): the Gram's eigenvalues resolve κ where λ_min ≥ this·k·ε·λ_max
_GRAM_KAPPA_FACTOR = 1000.0
# Krylov depth of the randomized SVD (blocks A Ω, (AAᵀ)AΩ, …): with block size r/2 + 25, depth 4
# reads A 8 times in (r/2 + 25)-column blocks. On decaying spectra it is as accurate as
# torch.svd_lowrank(q=r+20, niter=4), which reads A 10 times in (r+20)-column blocks: the Krylov
# space keeps every power (AAᵀ)^i AΩ that the power iteration discards, so it needs fewer and
# narrower passes (Musco & Musco 2015); bench/bench_factorize.py --accuracy compares the two.
_KRYLOV_DEPTH = 4
# Gram matrices are accumulated in float64 over column chunks of at most this many entries, so a
# 512×200704 unfolding (timm VGG16's 7×7 ConvMlp) needs no float64 copy of itself.
_GRAM_CHUNK_ENTRIES = 4_000_000
# The augmentation's first orthonormalization takes Cholesky QR for blocks of at least this many
# rows and columns. Cholesky QR turns Householder's panel-by-panel factorization into two GEMMs,
# which only pays once the block is tall and wide enough for them to outweigh its fixed cost
# (a float64 copy, the Gram, a triangular inverse); a smaller block keeps Householder QR.
_CHOLESKY_FIRST_PASS_MIN_ROWS = 4096
_CHOLESKY_FIRST_PASS_MIN_COLUMNS = 32
# tall_matmul pads the narrow factor's columns to a multiple of 8 only from this many rows and
# columns: below them the ragged last column block is a small share of the product, and the
# padded product's extra copy out cancels what padding saves (an augmentation's 52-column
# block stays unpadded).
_PADDED_PRODUCT_MIN_ROWS = 8192
_PADDED_PRODUCT_MIN_COLUMNS = 64


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


def uses_randomized_svd(m: int, n: int, rank: int) -> bool:
    """Whether a rank-``rank`` factorization of an m×n matrix takes the randomized path."""
    return m * n >= _RANDOMIZED_MIN_ENTRIES and 2 * _krylov_block(rank) * _KRYLOV_DEPTH <= min(m, n)


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
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
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
    return torch.linalg.svdvals(matrix.detach())


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


# ----------------------------------------------------------------------------- augmentation


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
        p, s, _ = torch.linalg.svd(r.mT)
        return p, s
    p, s, _ = torch.linalg.svd(a, full_matrices=False)
    return p, s


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
    s = torch.linalg.svdvals(a)
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
