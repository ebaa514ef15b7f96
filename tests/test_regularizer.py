"""The spectral regularizer R of RobustDLRT (paper Definition 1, Proposition 1).

R(S) = ‖SᵀS − α²I‖_F with α² = ‖S‖_F²/r. The library computes R(A) = ‖AAᵀ − α²I‖_F,
α² = ‖A‖_F²/m, for A (m×n) with m ≤ n (a tall A is transposed first), with the closed-form
backward ∇R = 2(AAᵀ − α²I)A/R of Prop. 1(a). For a square core this is the paper's R (SᵀS and
SSᵀ have the same spectrum). For a conv core it acts on the mode-0 unfolding C₍₀₎
(r_out × r_in·kh·kw); what holds there is stated next to each test.

Proposition 1, checked numerically on random and structured matrices:
(a) closed-form gradient == autograd of a plain reimplementation (float64),
(b) (1/r) R² = mean(σ⁴) − mean(σ²)² over the r = min(m, n) singular values,
(c) unitary invariance,
(d) κ ≤ exp(R / (√2 σ_min²)).
Plus: R = 0 gives gradient 0 without NaN; float32 under bf16 autocast; R acts on cores only.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compressor.functional import condition_number, spectral_regularizer, unfold
from compressor.layers import LowRankLinear, TuckerConv2d
from compressor.train.losses.spectral import layer_regularizer

D = torch.float64


# ----------------------------------------------------------------------------- helpers


def reference_r(a: torch.Tensor) -> torch.Tensor:
    """The paper's R by plain autograd-able ops, on the Gram of the smaller side."""
    if a.shape[0] > a.shape[1]:
        a = a.mT
    m = a.shape[0]
    gram = a @ a.mT
    alpha2 = (a * a).sum() / m
    return torch.sqrt(((gram - alpha2 * torch.eye(m, dtype=a.dtype)) ** 2).sum())


def paper_r(s: torch.Tensor) -> torch.Tensor:
    """Definition 1 literally: ‖SᵀS − α²I‖ with α² = ‖S‖²/r (square S)."""
    r = s.shape[0]
    return torch.linalg.matrix_norm(s.mT @ s - (s.norm() ** 2 / r) * torch.eye(r, dtype=s.dtype))


def orthonormal(n: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=D))
    return q


def with_singular_values(sigma: list[float], n: int | None = None, seed: int = 0) -> torch.Tensor:
    """U diag(σ) Vᵀ with random orthonormal U (m×m), V (n×m): an m×n matrix of given spectrum."""
    m = len(sigma)
    n = n or m
    return orthonormal(m, m, seed) @ torch.diag(torch.tensor(sigma, dtype=D)) @ orthonormal(n, m, seed + 1).mT


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=D)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# name → float64 matrix; all have R > 0 and a well-defined gradient
CASES = {
    "random_square": lambda: torch.randn(7, 7, generator=_gen(1), dtype=D),
    "diagonal": lambda: torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5, 0.25], dtype=D)),
    "diagonal_negative": lambda: torch.diag(torch.tensor([-2.0, 1.0, 0.1], dtype=D)),
    "rank_deficient": lambda: (
        torch.randn(6, 2, generator=_gen(2), dtype=D) @ torch.randn(2, 6, generator=_gen(3), dtype=D)
    ),
    "zero_row": lambda: torch.cat([torch.randn(3, 4, generator=_gen(4), dtype=D), torch.zeros(1, 4, dtype=D)]),
    "ill_conditioned": lambda: with_singular_values([1.0, 1e-1, 1e-3, 1e-6], seed=5),
    "near_orthogonal": lambda: orthonormal(6, 6, 6) * 2.0 + 1e-3 * torch.randn(6, 6, generator=_gen(7), dtype=D),
    # conv core mode-0 unfolding C₍₀₎: r_out × r_in·kh·kw (wide)
    "conv_unfolding_3x3": lambda: unfold(torch.randn(4, 3, 3, 3, generator=_gen(8), dtype=D), 0),
    "conv_unfolding_ill": lambda: with_singular_values([5.0, 1.0, 1e-2], n=18, seed=9),
    # 1×1 conv with r_out > r_in: C₍₀₎ is tall (r_out × r_in)
    "conv_unfolding_1x1_tall": lambda: unfold(torch.randn(6, 2, 1, 1, generator=_gen(10), dtype=D), 0),
    "wide": lambda: torch.randn(3, 11, generator=_gen(11), dtype=D),
    "tall": lambda: torch.randn(11, 3, generator=_gen(12), dtype=D),
}


# ----------------------------------------------------------------------------- (a) gradient


@pytest.mark.parametrize("name", sorted(CASES))
def test_closed_form_gradient_matches_autograd(name):
    a = CASES[name]().requires_grad_(True)
    r = spectral_regularizer(a)
    (g_closed,) = torch.autograd.grad(r, a)
    b = a.detach().clone().requires_grad_(True)
    r_ref = reference_r(b)
    (g_ref,) = torch.autograd.grad(r_ref, b)
    assert r.dtype == D
    torch.testing.assert_close(r, r_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_closed, g_ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "name", ["random_square", "diagonal", "rank_deficient", "conv_unfolding_3x3", "conv_unfolding_1x1_tall", "wide"]
)
def test_closed_form_gradient_passes_gradcheck(name):
    a = CASES[name]().requires_grad_(True)
    assert torch.autograd.gradcheck(spectral_regularizer, (a,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_square_matches_the_papers_formula_and_gradient():
    """The library's ‖SSᵀ − α²I‖ and the paper's ‖SᵀS − α²I‖ agree, and so do eq. (4) and the backward."""
    s = torch.randn(6, 6, generator=_gen(20), dtype=D)
    r = spectral_regularizer(s.clone().requires_grad_(True))
    torch.testing.assert_close(r, paper_r(s), rtol=1e-12, atol=0)
    a = s.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(spectral_regularizer(a), a)
    alpha2 = s.norm() ** 2 / 6
    eq4 = 2 * s @ (s.mT @ s - alpha2 * torch.eye(6, dtype=D)) / paper_r(s)
    torch.testing.assert_close(g, eq4, rtol=1e-10, atol=1e-12)


def test_gradient_scales_with_upstream_gradient():
    a = torch.randn(4, 5, generator=_gen(21), dtype=D, requires_grad=True)
    (g1,) = torch.autograd.grad(spectral_regularizer(a), a)
    (g3,) = torch.autograd.grad(-3.0 * spectral_regularizer(a), a)
    torch.testing.assert_close(g3, -3.0 * g1)


def test_euler_identity_r_is_homogeneous_of_degree_two():
    """⟨∇R, S⟩ = 2R and R(cS) = c²R: besides equalizing σ, β·∇R also shrinks the core's scale."""
    s = torch.randn(5, 5, generator=_gen(22), dtype=D, requires_grad=True)
    r = spectral_regularizer(s)
    (g,) = torch.autograd.grad(r, s)
    torch.testing.assert_close((g * s).sum(), 2 * r.detach())
    torch.testing.assert_close(spectral_regularizer(3.0 * s.detach()), 9.0 * r.detach())


# ----------------------------------------------------------------------------- (b) variance


@pytest.mark.parametrize("name", sorted(CASES))
def test_variance_identity(name):
    """(1/r) R² = mean(σ⁴) − mean(σ²)², over the r = min(m, n) singular values of A."""
    a = CASES[name]()
    sigma = torch.linalg.svdvals(a)
    r = sigma.numel()
    assert r == min(a.shape)
    lhs = spectral_regularizer(a) ** 2 / r
    rhs = (sigma**4).mean() - (sigma**2).mean() ** 2
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-12 * float(sigma[0]) ** 4)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 9), n=st.integers(1, 9), seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-3, 3))
def test_variance_identity_property(m, n, seed, log_scale):
    a = torch.randn(m, n, generator=_gen(seed), dtype=D) * 10.0**log_scale
    sigma = torch.linalg.svdvals(a)
    lhs = spectral_regularizer(a) ** 2 / sigma.numel()
    rhs = (sigma**4).mean() - (sigma**2).mean() ** 2
    assert float(lhs) >= 0.0
    assert abs(float(lhs - rhs)) <= 1e-9 * float(sigma[0]) ** 4 + 1e-300


# ----------------------------------------------------------------------------- (c) invariance


@pytest.mark.parametrize("name", ["random_square", "diagonal", "ill_conditioned", "rank_deficient"])
def test_unitary_invariance_square(name):
    """R(Q₁ S Q₂ᵀ) = R(S) for square orthogonal Q₁, Q₂ (r×r)."""
    s = CASES[name]()
    r = s.shape[0]
    q1, q2 = orthonormal(r, r, 30), orthonormal(r, r, 31)
    torch.testing.assert_close(spectral_regularizer(q1 @ s @ q2.mT), spectral_regularizer(s), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["random_square", "ill_conditioned"])
def test_unitary_invariance_with_orthonormal_bases(name):
    """U, V (n×r) orthonormal, W = U S Vᵀ (n×n, rank ≤ r). What holds is not R(W) = R(S) with R's
    own normalization (that uses α² = ‖W‖²/n and counts n − r zero singular values) but:
    ‖WᵀW − α_S² VVᵀ‖ = R(S) with α_S² = ‖W‖²/r, and the variance identity over W's leading r
    singular values. So the paper's 1(c) holds with the rank r kept as the normalization."""
    s = CASES[name]()
    r, n = s.shape[0], 3 * s.shape[0]
    u, v = orthonormal(n, r, 32), orthonormal(n, r, 33)
    w = u @ s @ v.mT
    alpha2 = w.norm() ** 2 / r
    lifted = torch.linalg.matrix_norm(w.mT @ w - alpha2 * (v @ v.mT))
    torch.testing.assert_close(lifted, spectral_regularizer(s), rtol=1e-10, atol=1e-12)
    lead = torch.linalg.svdvals(w)[:r]
    torch.testing.assert_close(
        torch.sqrt(r * ((lead**4).mean() - (lead**2).mean() ** 2)), spectral_regularizer(s), rtol=1e-7, atol=1e-10
    )
    # with n as the normalization the value differs (unless R is 0): state it, so no one relies on it
    assert not torch.isclose(spectral_regularizer(w), spectral_regularizer(s), rtol=1e-3)


def test_invariance_of_the_conv_unfolding():
    """Conv core C (r_out×r_in×kh×kw), W = C ×₀ U_out ×₁ U_in. What holds for A = C₍₀₎ (wide):
    R(Q A Z) = R(A) for square orthogonal Q (r_out×r_out) and any Z with orthonormal rows (ZZᵀ = I),
    e.g. Z = (U_in ⊗ I_{kh·kw})ᵀ; hence R(C₍₀₎) = ‖W₍₀₎W₍₀₎ᵀ − α² U_out U_outᵀ‖ with
    α² = ‖W‖²/r_out, and κ(C₍₀₎) = σ₁/σ_{r_out} of W₍₀₎. A right factor with orthonormal
    *columns* only (Z of shape n×q, q < n) does not preserve R."""
    r_out, r_in, k = 3, 4, 3
    c_out, c_in = 8, 10
    core = torch.randn(r_out, r_in, k, k, generator=_gen(40), dtype=D)
    a = unfold(core, 0)  # 3 × 36
    q = orthonormal(r_out, r_out, 41)
    z = orthonormal(r_in * k * k + 5, r_in * k * k, 42).mT  # 36 × 41, orthonormal rows
    torch.testing.assert_close(spectral_regularizer(q @ a @ z), spectral_regularizer(a), rtol=1e-10, atol=1e-12)

    u_out, u_in = orthonormal(c_out, r_out, 43), orthonormal(c_in, r_in, 44)
    w = torch.einsum("abhw,oa,ib->oihw", core, u_out, u_in)
    w0 = unfold(w, 0)
    alpha2 = w.norm() ** 2 / r_out
    lifted = torch.linalg.matrix_norm(w0 @ w0.mT - alpha2 * u_out @ u_out.mT)
    torch.testing.assert_close(lifted, spectral_regularizer(a), rtol=1e-10, atol=1e-12)
    sv = torch.linalg.svdvals(w0)
    assert math.isclose(float(sv[0] / sv[r_out - 1]), condition_number(a), rel_tol=1e-9)

    # counter-example: Z with orthonormal columns only (a 36 × 20 slice) changes R
    z_cols = orthonormal(r_in * k * k, 20, 45)
    assert not torch.isclose(spectral_regularizer(a @ z_cols), spectral_regularizer(a), rtol=1e-3)


# ----------------------------------------------------------------------------- (d) κ bound


@pytest.mark.parametrize("name", sorted(CASES))
def test_condition_number_bound(name):
    """κ(A) ≤ exp(R / (√2 σ_min²)), σ_min over the min(m, n) singular values (inf if σ_min = 0)."""
    a = CASES[name]()
    sigma = torch.linalg.svdvals(a)
    kappa = condition_number(a)
    smin = float(sigma[-1])
    if smin <= 1e-12 * float(sigma[0]):
        # singular: both sides are (numerically) infinite; the bound says nothing
        assert kappa > 1e10
        return
    bound_log = float(spectral_regularizer(a)) / (math.sqrt(2) * smin**2)
    assert math.log(kappa) <= bound_log * (1 + 1e-9) + 1e-12


@settings(max_examples=60, deadline=None)
@given(r=st.integers(2, 8), seed=st.integers(0, 2**31 - 1), spread=st.floats(0.0, 4.0))
def test_condition_number_bound_property(r, seed, spread):
    g = _gen(seed)
    sigma = (10.0 ** (-spread * torch.rand(r, generator=g, dtype=D))).sort(descending=True).values
    s = orthonormal(r, r, seed % 1000) @ torch.diag(sigma) @ orthonormal(r, r, seed % 1000 + 1).mT
    kappa = float(sigma[0] / sigma[-1])
    log_bound = float(spectral_regularizer(s)) / (math.sqrt(2) * float(sigma[-1]) ** 2)
    assert math.log(kappa) <= log_bound * (1 + 1e-9) + 1e-12


def test_condition_number_of_known_spectrum():
    s = with_singular_values([10.0, 3.0, 0.1], seed=50)
    assert math.isclose(condition_number(s), 100.0, rel_tol=1e-10)
    assert condition_number(torch.zeros(3, 3)) == float("inf")


@pytest.mark.parametrize("shape", [(40, 360), (360, 40), (30, 30), (200, 150)])
@pytest.mark.parametrize("kappa", [1.0, 3.0, 1e2, 1e4, 1e7])
def test_fast_condition_number_matches_the_precise_one(shape, kappa):
    """precise=False (the κ trace: the float64 Gram's eigenvalues where they resolve κ, else
    float32 QR + SVD) agrees with float64 singular values of the same float32 core: to 1e-3
    while κ ≤ 1e4, to float32 accuracy beyond; a singular core gives inf either way."""
    k = min(shape)
    sigma = torch.logspace(0, -math.log10(kappa), k, dtype=D)
    u, v = orthonormal(shape[0], k, 7), orthonormal(shape[1], k, 8)
    a = ((u * sigma) @ v.mT).float()
    exact = condition_number(a)
    tol = 1e-3 if kappa <= 1e4 else 0.5
    assert condition_number(a, precise=False) == pytest.approx(exact, rel=tol)
    assert condition_number(torch.zeros(shape), precise=False) == float("inf")


# ----------------------------------------------------------------------------- R = 0


@pytest.mark.parametrize(
    "s",
    [
        2.5 * torch.eye(4, dtype=D),
        hadamard(8),
        -hadamard(4)[[2, 0, 3, 1]],
        torch.zeros(3, 3, dtype=D),
        torch.eye(3, 5, dtype=D) * 0.5,
    ],
    ids=["scaled_identity", "hadamard", "signed_permuted_hadamard", "zero", "wide_row_orthogonal"],
)
def test_exact_minimum_has_zero_gradient_and_no_nan(s):
    """S a multiple of an (row-)orthogonal matrix, exactly representable: R = 0, ∇R = 0, no NaN."""
    for dtype in (torch.float64, torch.float32):
        a = s.to(dtype).clone().requires_grad_(True)
        r = spectral_regularizer(a)
        (g,) = torch.autograd.grad(r, a)
        assert float(r.detach()) == 0.0
        assert torch.isfinite(g).all() and float(g.abs().max()) == 0.0


def test_rounded_minimum_stays_finite_and_bounded():
    """Orthogonal × scalar with round-off: R ≈ 0 but not exactly; the gradient of a norm at its
    minimum is a subgradient, not 0 — it must stay finite and within ‖∇R‖ ≤ 2σ_max."""
    s = 3.0 * orthonormal(6, 6, 60)
    for dtype in (torch.float64, torch.float32):
        a = s.to(dtype).clone().requires_grad_(True)
        r = spectral_regularizer(a)
        (g,) = torch.autograd.grad(r, a)
        assert float(r.detach()) <= 1e-5 * 9.0
        assert torch.isfinite(g).all()
        assert float(torch.linalg.matrix_norm(g, ord=2)) <= 2 * 3.0 * (1 + 1e-4)


def test_gradient_descent_on_r_drives_kappa_to_one():
    """Following −∇R from an ill-conditioned S reduces R and κ (the direction Prop. 1 promises)."""
    s = with_singular_values([4.0, 2.0, 1.0, 0.5, 0.3], seed=70).requires_grad_(True)
    k0, r0 = condition_number(s), float(spectral_regularizer(s.detach()))
    for _ in range(300):
        (g,) = torch.autograd.grad(spectral_regularizer(s), s)
        with torch.no_grad():
            s -= 0.02 * g
    assert float(spectral_regularizer(s.detach())) < 0.05 * r0
    assert condition_number(s) < 1.2 < k0 / 10


# ----------------------------------------------------------------------------- dtypes


def test_float32_under_bf16_autocast():
    """Under bf16 autocast R is computed (and returned) in float32, from a bf16 or float32 core,
    and the gradient reaches the core in its own dtype."""
    s64 = with_singular_values([3.0, 1.0, 0.5, 0.2], seed=80)
    ref = spectral_regularizer(s64)
    for dtype in (torch.float32, torch.bfloat16):
        a = s64.to(dtype).clone().requires_grad_(True)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            r = spectral_regularizer(a)
            prod = a @ a  # sanity: autocast is active here
        assert prod.dtype == torch.bfloat16
        assert r.dtype == torch.float32
        r.backward()
        assert a.grad is not None and a.grad.dtype == dtype and torch.isfinite(a.grad).all()
        tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16 input carries ~3 significant digits
        assert math.isclose(float(r.detach()), float(ref), rel_tol=tol)


def test_layer_regularizer_float32_under_autocast():
    layer = LowRankLinear.from_dense(torch.nn.Linear(12, 10), rank=4)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        r = layer_regularizer(layer)
    assert r.dtype == torch.float32


# ----------------------------------------------------------------------------- on the layers


def test_layer_regularizers_act_on_cores_only():
    """R of a LowRankLinear is R(S); of a TuckerConv2d R(C₍₀₎); its gradient reaches the core and
    never the bases, even when the bases are trainable (the augmentation batch)."""
    torch.manual_seed(0)
    lin = LowRankLinear.from_dense(torch.nn.Linear(20, 16, dtype=D), rank=5)
    conv = TuckerConv2d.from_dense(torch.nn.Conv2d(12, 10, 3, padding=1, dtype=D), rank=(4, 3))
    torch.testing.assert_close(layer_regularizer(lin), reference_r(lin.S.detach()))
    torch.testing.assert_close(layer_regularizer(conv), reference_r(unfold(conv.C.detach(), 0)))
    for layer in (lin, conv):
        layer.set_bases_trainable(True)
        layer_regularizer(layer).backward()
        assert layer.core.grad is not None and float(layer.core.grad.abs().sum()) > 0
        assert all(p.grad is None for p in layer.bases())
        layer.set_bases_trainable(False)


def test_conv_regularizer_relates_to_the_dense_kernel():
    """R(C₍₀₎) = ‖W₍₀₎W₍₀₎ᵀ − α² U_out U_outᵀ‖ with W the layer's dense kernel, α² = ‖W‖²/r_out."""
    conv = TuckerConv2d.from_dense(torch.nn.Conv2d(12, 10, 3, padding=1, dtype=D), rank=(4, 6))
    w0 = unfold(conv.to_dense().weight.detach(), 0)
    u = conv.U_out.detach()
    alpha2 = w0.norm() ** 2 / conv.ranks[0]
    lifted = torch.linalg.matrix_norm(w0 @ w0.mT - alpha2 * u @ u.mT)
    torch.testing.assert_close(lifted, layer_regularizer(conv).detach(), rtol=1e-9, atol=1e-12)
