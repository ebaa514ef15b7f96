"""Pure maths of compressor.functional: rank selection, SVD/HOSVD initialization, mode products,
orthonormal completion of a basis.

Invariants: truncation_rank (one vectorized pass) == the definition as a Python loop; the
randomized SVD returns orthonormal factors and accurate leading singular values; the HOSVD is
exact at full rank; mode_product == its einsum definition; augmentation keeps the old basis as
the leading block and stays orthonormal even for zero or in-span gradient directions.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from compressor import functional as Fn
from compressor.functional import augmentation, orthonormal


def _orth_error(q: torch.Tensor) -> float:
    eye = torch.eye(q.shape[1], dtype=q.dtype)
    return float((q.mT @ q - eye).abs().max()) if q.shape[1] else 0.0


def _with_spectrum(m: int, n: int, sigma: torch.Tensor, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = sigma.numel()
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return ((u * sigma.double()) @ v.mT).to(dtype)


# ----------------------------------------------------------------------------- truncation_rank


def _naive_truncation_rank(sigma: list[float], tol: float, r_min: int, r_max: int | None) -> int:
    """The definition, one candidate at a time: smallest r with ‖σ[r:]‖ < tol‖σ‖."""
    n = len(sigma)
    r_max = n if r_max is None else min(r_max, n)
    r_min = min(r_min, r_max)
    if n == 0:
        return 0
    total = math.fsum(s * s for s in sigma)
    r = n
    for cand in range(n + 1):
        tail = math.fsum(s * s for s in sigma[cand:])
        if (tail == 0.0) if tol == 0.0 else (tail < tol * tol * total):
            r = cand
            break
    return max(r_min, min(r, r_max))


def _far_from_ties(sigma: list[float], tol: float) -> bool:
    """Excludes spectra where a tail sum equals the threshold up to round-off (either answer is right)."""
    total = math.fsum(s * s for s in sigma)
    thr = tol * tol * total
    return all(abs(math.fsum(s * s for s in sigma[k:]) - thr) > 1e-9 * (total + 1e-300) for k in range(len(sigma) + 1))


spectra = st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1e3)), min_size=0, max_size=40).map(
    lambda xs: sorted(xs, reverse=True)
)


@settings(max_examples=300, deadline=None)
@given(
    sigma=spectra,
    tol=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
    r_min=st.integers(1, 5),
    r_max=st.one_of(st.none(), st.integers(1, 45)),
)
def test_truncation_rank_matches_naive_loop(sigma, tol, r_min, r_max):
    assume(tol == 0.0 or _far_from_ties(sigma, tol))
    got = Fn.truncation_rank(torch.tensor(sigma, dtype=torch.float64), tol, r_min, r_max)
    assert got == _naive_truncation_rank(sigma, tol, r_min, r_max)


def test_truncation_rank_edges():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0])
    assert Fn.truncation_rank(s, 0.0) == 3  # tol 0 keeps exactly the nonzero values
    assert Fn.truncation_rank(s, 0.0, r_min=4) == 4
    assert Fn.truncation_rank(s, 0.99) == 1
    assert Fn.truncation_rank(s, 0.99, r_min=2) == 2
    assert Fn.truncation_rank(s, 0.0, r_max=2) == 2
    assert Fn.truncation_rank(torch.zeros(0), 0.1) == 0
    assert Fn.truncation_rank(torch.zeros(4), 0.1) == 4  # no energy at all: nothing is < 0·tol
    # float32 input, bf16 too: computed in float64
    assert Fn.truncation_rank(s.bfloat16(), 0.0) == 3


# ----------------------------------------------------------------------------- SVD paths


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (6, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_singular_exact_path_full_rank(shape, dtype):
    a = torch.randn(*shape, dtype=dtype)
    u, s, v = Fn.top_singular(a, min(shape))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(u @ torch.diag(s) @ v.mT, a, atol=tol * 10)
    assert _orth_error(u) < tol and _orth_error(v) < tol
    assert torch.all(s[:-1] >= s[1:])


def test_randomized_svd_big_matrix_decaying_spectrum():
    m, n, r = 3000, 2000, 50
    assert Fn.uses_randomized_svd(m, n, r)
    sigma = torch.exp(-torch.arange(300, dtype=torch.float64) / 25.0)
    a = _with_spectrum(m, n, sigma, seed=1, dtype=torch.float32)
    rng_before = torch.get_rng_state()
    u, s, v = Fn.top_singular(a, r, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    assert u.shape == (m, r) and v.shape == (n, r) and s.shape == (r,)
    assert _orth_error(u) < 1e-5 and _orth_error(v) < 1e-5
    rel = (s.double() - sigma[:r]).abs() / sigma[:r]
    assert float(rel.max()) < 1e-3
    # the factors are singular vectors: U diag(σ) Vᵀ is the best rank-r approximation
    err = torch.linalg.matrix_norm(a.double() - (u.double() * s.double()) @ v.double().mT)
    assert float(err) < 1.001 * float(sigma[r:].norm())
    # one-sided variant agrees on the subspace and the values
    u1, s1 = Fn.top_left_singular(a, r, seed=3)
    assert _orth_error(u1) < 1e-5
    assert torch.allclose(s1, s)
    assert float(torch.linalg.matrix_norm(u1 @ u1.mT @ u - u)) < 1e-4


@pytest.mark.parametrize("decay", [10.0, 4.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_randomized_svd_stays_orthonormal_on_fast_decaying_spectra(decay, dtype):
    """Where a Krylov block adds directions below round-off of its norm (σᵢ = e^(−i/decay)),
    the basis must stay orthonormal: the Ritz values are then lower bounds of the true σ and
    accurate to 1e-3 (or to what the dtype resolves next to σ₁). Block Gram–Schmidt alone gave
    σ₁ = 1.06 for decay 10 in float32 and failed at 4 and 2 in float64."""
    m, n, r = 2500, 2000, 30
    assert Fn.uses_randomized_svd(m, n, r)
    sigma = torch.exp(-torch.arange(200, dtype=torch.float64) / decay)
    a = _with_spectrum(m, n, sigma, seed=0, dtype=dtype)
    u, s, v = Fn.top_singular(a, r)
    eps = torch.finfo(dtype).eps
    assert _orth_error(u) < 100 * eps and _orth_error(v) < 100 * eps
    assert bool((s.double() <= sigma[:r] * (1 + 100 * eps) + 100 * eps).all())
    assert bool(((s.double() - sigma[:r]).abs() <= 1e-3 * sigma[:r] + 100 * eps).all())


def test_randomized_svd_tall_matrix_and_determinism():
    sigma = torch.exp(-torch.arange(200, dtype=torch.float64) / 15.0)
    a = _with_spectrum(4500, 1000, sigma, seed=2, dtype=torch.float32)  # tall: m > n
    assert Fn.uses_randomized_svd(*a.shape, 40)
    u, s, v = Fn.top_singular(a, 40, seed=0)
    assert u.shape == (4500, 40) and v.shape == (1000, 40)
    assert _orth_error(u) < 1e-5 and _orth_error(v) < 1e-5
    assert float(((s.double() - sigma[:40]).abs() / sigma[:40]).max()) < 1e-3
    u2, s2, v2 = Fn.top_singular(a, 40, seed=0)
    assert torch.equal(u, u2) and torch.equal(s, s2) and torch.equal(v, v2)


@pytest.mark.parametrize("shape", [(6, 40), (40, 6), (9, 9)])
def test_top_left_singular_gram_path(shape):
    a = torch.randn(*shape, dtype=torch.float32)
    k = min(shape)
    u, s = Fn.top_left_singular(a, k)
    ref = torch.linalg.svdvals(a.double())
    assert torch.allclose(s.double(), ref, rtol=1e-5, atol=1e-6)
    assert _orth_error(u) < 1e-5
    # U Uᵀ A = A when U spans the column space (full rank)
    assert torch.allclose(u @ (u.mT @ a), a, atol=1e-5)
    # truncated: spans the leading left singular subspace
    u2, _ = Fn.top_left_singular(a, 2)
    uu, _, _ = torch.linalg.svd(a.double(), full_matrices=False)
    proj_ref = uu[:, :2] @ uu[:, :2].mT
    assert torch.allclose(u2.double() @ u2.double().mT, proj_ref, atol=1e-4)


@pytest.mark.parametrize("shape", [(192, 1692), (60, 540), (300, 40)], ids=["conv_unfolding", "small", "tall"])
@pytest.mark.parametrize("tau", [0.05, 0.1, 0.3])
def test_left_singular_for_a_rank_rule_chooses_the_svds_rank(shape, tau):
    """left_singular(tol=τ) (the Gram eigendecomposition in float32) gives the rank the exact SVD
    gives, an orthonormal P, and a truncation error within round-off of the optimal one."""
    m, n = shape
    k = min(m, n)
    sigma = torch.logspace(0, -3, k, dtype=torch.float64)  # decaying, like trained cores
    a = _with_spectrum(m, n, sigma, seed=k, dtype=torch.float32)
    p, s = Fn.left_singular(a, tol=tau)
    p_svd, s_svd = Fn.left_singular(a)
    assert p.shape == p_svd.shape == (m, k) and s.shape == s_svd.shape == (k,)
    assert _orth_error(p) < 1e-5
    r = Fn.truncation_rank(s, tau, 1, k)
    assert r == Fn.truncation_rank(s_svd, tau, 1, k) == Fn.truncation_rank(sigma, tau, 1, k)
    assert torch.allclose(s[:r].double(), sigma[:r], rtol=1e-4, atol=1e-5)
    a64, keep = a.double(), p[:, :r].double()
    err = torch.linalg.matrix_norm(a64 - keep @ (keep.mT @ a64))
    optimal = torch.linalg.vector_norm(sigma[r:])
    assert float(err) <= float(optimal) * (1 + 1e-4) + 1e-5


def test_left_singular_keeps_the_exact_svd_where_the_tolerance_needs_it():
    """τ = 0 (keep everything) and a τ below the Gram's float32 accuracy take the SVD path."""
    a = torch.randn(50, 450, generator=torch.Generator().manual_seed(0))
    exact = Fn.left_singular(a)
    for tol in (None, 0.0, 1e-4):
        p, s = Fn.left_singular(a, tol=tol)
        assert torch.equal(p, exact[0]) and torch.equal(s, exact[1])
    p, s = Fn.left_singular(a, tol=0.1)  # the Gram path: other round-off, same spectrum
    assert not torch.equal(s, exact[1]) and torch.allclose(s, exact[1], rtol=1e-4)


def test_top_left_singular_rank_deficient_stays_orthonormal():
    a = torch.zeros(8, 30, dtype=torch.float64)
    a[:3] = torch.randn(3, 30, dtype=torch.float64)  # rank 3, five zero rows
    u, s = Fn.top_left_singular(a, 8)
    assert _orth_error(u) < 1e-12
    assert torch.allclose(u @ (u.mT @ a), a, atol=1e-12)
    assert torch.allclose(s[3:], torch.zeros(5, dtype=s.dtype), atol=1e-7)
    tall = a.mT.contiguous()  # 30×8, rank 3: the QR branch
    u, s = Fn.top_left_singular(tall, 8)
    assert _orth_error(u) < 1e-12
    assert torch.allclose(u @ (u.mT @ tall), tall, atol=1e-10)


def test_rank_spectrum_exact_and_randomized():
    a = torch.randn(20, 50, dtype=torch.float64)
    assert torch.allclose(Fn.rank_spectrum(a, 10), torch.linalg.svdvals(a), atol=1e-10)
    sigma = 1.0 / torch.arange(1, 301, dtype=torch.float64)
    big = _with_spectrum(3000, 2000, sigma, seed=4, dtype=torch.float32)
    sp = Fn.rank_spectrum(big, 40)
    assert sp.numel() == 41  # leading 40 + one value for the remaining energy
    assert math.isclose(float(sp.norm()), float(sigma.norm()), rel_tol=1e-4)
    for tol in (0.3, 0.5, 0.7):
        assert Fn.truncation_rank(sp, tol, 1, 40) == Fn.truncation_rank(sigma, tol, 1, 40)


@pytest.mark.parametrize("shape", [(8, 6, 3, 3), (4, 16, 1, 1), (16, 2, 3, 3), (5, 7, 3, 5)])
def test_hosvd_full_rank_exact_and_truncated_orthonormal(shape):
    w = torch.randn(*shape, dtype=torch.float64)
    c_out, c_in, kh, kw = shape
    r_out, r_in = min(c_out, c_in * kh * kw), min(c_in, c_out * kh * kw)
    u_out, u_in, core = Fn.hosvd_channel_factors(w, r_out, r_in)
    assert core.shape == (r_out, r_in, kh, kw)
    assert torch.allclose(Fn.mode_product(core, u_out.mT, u_in.mT), w, atol=1e-12)
    u_out, u_in, core = Fn.hosvd_channel_factors(w, 2, 1)
    assert _orth_error(u_out) < 1e-12 and _orth_error(u_in) < 1e-12
    assert core.shape == (2, 1, kh, kw)


def test_hosvd_truncated_matches_svd_subspaces():
    w = torch.randn(12, 10, 3, 3, dtype=torch.float32)
    u_out, u_in, _ = Fn.hosvd_channel_factors(w, 4, 3)
    for mode, u in ((0, u_out), (1, u_in)):
        ref, _, _ = torch.linalg.svd(Fn.unfold(w, mode).double(), full_matrices=False)
        ref = ref[:, : u.shape[1]]
        assert torch.allclose(u.double() @ u.double().mT, ref @ ref.mT, atol=1e-4)


# ----------------------------------------------------------------------------- mode products


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 5),
    st.integers(1, 5),
    st.integers(1, 5),
    st.integers(1, 3),
    st.integers(1, 3),
    st.booleans(),
)
def test_mode_product_matches_einsum(a, b, a2, b2, kh, kw, four_d):
    g = torch.Generator().manual_seed(a * 1000 + b * 100 + a2 * 10 + b2)
    left = torch.randn(a, a2, generator=g, dtype=torch.float64)
    right = torch.randn(b, b2, generator=g, dtype=torch.float64)
    if four_d:
        core = torch.randn(a, b, kh, kw, generator=g, dtype=torch.float64)
        ref = torch.einsum("ip,jq,ijhw->pqhw", left, right, core)
    else:
        core = torch.randn(a, b, generator=g, dtype=torch.float64)
        ref = torch.einsum("ip,jq,ij->pq", left, right, core)
    assert torch.allclose(Fn.mode_product(core, left, right), ref, atol=1e-12)


def test_unfold_shapes():
    w = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    assert Fn.unfold(w, 0).shape == (2, 60) and Fn.unfold(w, 1).shape == (3, 40)
    assert torch.equal(Fn.unfold(w, 1)[1], w[:, 1].reshape(-1))


# ----------------------------------------------------------------------------- augmentation


def _basis(n, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=dtype))
    return q


@pytest.fixture(params=["householder", "cholesky"])
def first_pass(request, monkeypatch):
    """The augmentation's first orthonormalization either way (Cholesky QR runs from a row
    count that these small cases do not reach)."""
    monkeypatch.setattr(augmentation, "_CHOLESKY_FIRST_PASS_MIN_ROWS", 10**9 if request.param == "householder" else 0)
    monkeypatch.setattr(augmentation, "_CHOLESKY_FIRST_PASS_MIN_COLUMNS", 0)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["random", "zero", "in_span", "duplicated", "fewer", "too_many"])
def test_orthonormal_complement_degenerate_directions(dtype, case, first_pass):
    n, r, k = 12, 4, 4
    basis = _basis(n, r, dtype)
    g = torch.Generator().manual_seed(1)
    if case == "random":
        d = torch.randn(n, k, generator=g, dtype=dtype)
    elif case == "zero":
        d = torch.zeros(n, k, dtype=dtype)
    elif case == "in_span":
        d = basis @ torch.randn(r, k, generator=g, dtype=dtype)
    elif case == "duplicated":
        col = torch.randn(n, 1, generator=g, dtype=dtype)
        d = torch.cat([col, col, 2 * col, basis[:, :1]], dim=1)
    elif case == "fewer":
        d = torch.randn(n, 1, generator=g, dtype=dtype)
    else:  # more columns requested than the complement has
        k = n
        d = torch.randn(n, k, generator=g, dtype=dtype)
    q = Fn.orthonormal_complement(basis, d, k)
    assert q.dtype == dtype
    assert q.shape == (n, min(k, n - r))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert _orth_error(q) < tol
    assert float((basis.mT @ q).abs().max()) < tol
    full = torch.cat([basis, q], dim=1)
    assert _orth_error(full) < tol


def test_orthonormal_complement_spans_new_gradient_directions(first_pass):
    basis = _basis(10, 3, torch.float64)
    d = torch.randn(10, 2, dtype=torch.float64)
    q = Fn.orthonormal_complement(basis, d, 2)
    perp = d - basis @ (basis.mT @ d)
    # the projected directions lie in span(q) (up to the tiny regularizing noise)
    assert float(torch.linalg.matrix_norm(perp - q @ (q.mT @ perp))) < 1e-2 * float(torch.linalg.matrix_norm(perp))


def test_orthonormal_complement_of_a_tall_basis_and_a_rank_one_gradient():
    # a classifier-like basis (Cholesky first pass at the default threshold) and the worst
    # conditioning the regularizing noise allows: a gradient of rank one, 40 columns asked
    n, r, k = augmentation._CHOLESKY_FIRST_PASS_MIN_ROWS, 60, 40
    basis = _basis(n, r, torch.float32)
    g = torch.Generator().manual_seed(3)
    d = 1e3 * torch.randn(n, 1, generator=g) @ torch.randn(1, r, generator=g)
    q = Fn.orthonormal_complement(basis, d, k, seed=5)
    assert q.shape == (n, k)
    assert _orth_error(q) < 1e-5
    assert float((basis.mT @ q).abs().max()) < 1e-5
    perp = (d - basis @ (basis.mT @ d)).double()
    qd = q.double()
    assert float(torch.linalg.matrix_norm(perp - qd @ (qd.mT @ perp))) < 1e-2 * float(torch.linalg.matrix_norm(perp))


def test_first_pass_of_an_ill_conditioned_block_is_householder_qr(monkeypatch):
    monkeypatch.setattr(augmentation, "_CHOLESKY_FIRST_PASS_MIN_ROWS", 0)
    monkeypatch.setattr(augmentation, "_CHOLESKY_FIRST_PASS_MIN_COLUMNS", 0)
    g = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)) * torch.logspace(0, -9, 6)  # κ ≈ 1e9
    assert torch.equal(augmentation._orthonormalize_first_pass(g), torch.linalg.qr(g)[0])
    good = torch.randn(50, 6, generator=torch.Generator().manual_seed(1))
    q = augmentation._orthonormalize_first_pass(good)  # Cholesky QR: orthonormal, the span of G
    assert _orth_error(q) < 1e-5
    assert float((good - q @ (q.mT @ good)).abs().max()) < 1e-5


@pytest.mark.parametrize("k", [13, 67, 72])
def test_tall_matmul_is_the_plain_product(k):
    a = torch.randn(orthonormal._PADDED_PRODUCT_MIN_ROWS, 20, generator=torch.Generator().manual_seed(0))
    b = torch.randn(20, k, generator=torch.Generator().manual_seed(1))
    out = Fn.tall_matmul(a, b)  # k = 67: padded to 72 columns and sliced; 13 and 72 as they are
    assert out.shape == (a.shape[0], k) and out.is_contiguous()
    torch.testing.assert_close(out, a @ b, rtol=1e-5, atol=1e-5)


def test_augment_basis_keeps_old_basis_as_leading_block():
    basis = _basis(9, 3, torch.float32)
    out = Fn.augment_basis(basis, torch.randn(9, 3), 6)
    assert out.shape == (9, 6)
    assert torch.equal(out[:, :3], basis)
    assert _orth_error(out) < 1e-5
    assert Fn.augment_basis(basis, torch.randn(9, 3), 20).shape == (9, 9)  # capped at n


def test_orthonormal_columns_fixes_float32_eigenvectors_and_keeps_their_span():
    torch.manual_seed(0)
    a = torch.randn(200, 600)
    _, vecs = torch.linalg.eigh(a @ a.mT)
    p = vecs[:, -150:]  # float32 eigenvectors: orthonormal only to ~1e-6
    eye = torch.eye(150, dtype=torch.float64)
    q = Fn.orthonormal_columns(p)
    assert q.dtype == torch.float32 and q.shape == p.shape
    before = float((p.double().mT @ p.double() - eye).abs().max())
    after = float((q.double().mT @ q.double() - eye).abs().max())
    assert after < 3e-7 and after < before / 3, (before, after)
    proj = lambda m: m.double() @ m.double().mT  # noqa: E731
    assert float((proj(q) - proj(p)).abs().max()) < 1e-5  # the same subspace
    p64 = p.double()
    q64 = Fn.orthonormal_columns(p64)
    assert torch.allclose(q64.mT @ q64, eye, atol=1e-13)


@pytest.mark.parametrize("n,k", [(25088, 54), (4096, 54), (300, 50), (40, 8)])
def test_regularizing_noise_is_well_conditioned_and_seeded(n, k):
    def draw(seed):
        return Fn.regularizing_noise(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)

    noise = draw(1)
    assert noise.shape == (n, k) and noise.dtype == torch.float32
    assert torch.equal(noise, draw(1)) and not torch.equal(noise, draw(2))
    # as well-conditioned as an m×k Gaussian block (κ ≈ (√m + √k)/(√m − √k), m = min(n, 4k + 64))
    m = min(n, 4 * k + 64)
    gaussian_kappa = (math.sqrt(m) + math.sqrt(k)) / (math.sqrt(m) - math.sqrt(k))
    s = torch.linalg.svdvals(noise.double())
    assert float(s[0] / s[-1]) < 1.5 * gaussian_kappa
    # ... also once a basis is projected off them (what the augmentation needs)
    basis = _basis(n, min(20, (n - k) // 4), torch.float64)
    perp = noise.double() - basis @ (basis.mT @ noise.double())
    s = torch.linalg.svdvals(perp)
    assert float(s[0] / s[-1]) < 2.0 * gaussian_kappa


def test_svd_retries_in_float64_where_lapack_does_not_converge_in_float32(monkeypatch) -> None:
    """LAPACK's divide-and-conquer SVD can fail on an ill-conditioned float32 core (a truncation
    under a harsh budget met one): the float64 retry's factors come back in float32, exact."""
    a = torch.randn(12, 30, generator=torch.Generator().manual_seed(0))
    real_svd, real_svdvals = torch.linalg.svd, torch.linalg.svdvals

    def failing(fn):
        def call(x, **kwargs):
            if x.dtype == torch.float32:
                raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (error code: 1).")
            return fn(x, **kwargs)

        return call

    monkeypatch.setattr(torch.linalg, "svd", failing(real_svd))
    monkeypatch.setattr(torch.linalg, "svdvals", failing(real_svdvals))
    u, s, vh = Fn.svd(a)
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    torch.testing.assert_close(u @ torch.diag(s) @ vh, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(Fn.svdvals(a), real_svdvals(a.double()).float())
    p, sigma = Fn.left_singular(a)  # the truncation's path (QR, then the SVD of the small factor)
    torch.testing.assert_close(sigma, s)
    torch.testing.assert_close(p.mT @ p, torch.eye(12), atol=1e-5, rtol=0)
    with pytest.raises(torch.linalg.LinAlgError):  # a non-finite input is not retried
        Fn.svd(torch.full((3, 3), float("nan")))
