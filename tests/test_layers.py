"""Factorized layers: LowRankLinear (W = U S Vᵀ) and TuckerConv2d (Tucker-2 on the channel modes).

Invariants, for every layer configuration (Linear square/wide/tall ± bias; Conv2d 1×1, 3×3,
7×7, 3×5, stride 2, padding, padding='same', dilation 2, ± bias, C_out > C_in·k²):
- at full rank the factorized layer is the dense layer (rel. error ≤ 1e-5 float64, 1e-4 float32)
  and to_dense() gives back its weight;
- bases are orthonormal after from_dense, augment_, truncate_ and many DLRT cycles;
- augment_ leaves the output unchanged and grows ranks to min(2r, r_max); truncate_(0) leaves
  it unchanged; larger τ never gives larger ranks; ranks stay in [r_min, r_max];
- the returned BasisChange maps the old core onto the new one (what the optimizer state follows);
- state dicts load across rank changes; rank_state mirrors the shapes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compressor import functional as Fn
from compressor.factorize import factorize_
from compressor.layers import BasisChange, LowRankLayer, LowRankLinear, TuckerConv2d, low_rank_layers
from compressor.layers.conv import tucker_rank_caps

LINEAR_CONFIGS = {
    "square": dict(in_features=12, out_features=12, bias=True),
    "square_nobias": dict(in_features=12, out_features=12, bias=False),
    "wide": dict(in_features=20, out_features=7, bias=True),  # out < in
    "tall": dict(in_features=7, out_features=20, bias=True),  # out > in
    "tall_nobias": dict(in_features=7, out_features=20, bias=False),
}

CONV_CONFIGS = {
    "k1": dict(in_channels=6, out_channels=8, kernel_size=1),
    "k3": dict(in_channels=6, out_channels=8, kernel_size=3, padding=1),
    "k3_nobias": dict(in_channels=6, out_channels=8, kernel_size=3, padding=1, bias=False),
    "k7": dict(in_channels=5, out_channels=9, kernel_size=7, padding=3),
    "k3x5": dict(in_channels=6, out_channels=8, kernel_size=(3, 5), padding=(1, 2)),
    "k3x5_valid": dict(in_channels=6, out_channels=8, kernel_size=(3, 5)),
    "stride2": dict(in_channels=6, out_channels=8, kernel_size=3, stride=2, padding=1),
    "stride2_k1": dict(in_channels=8, out_channels=6, kernel_size=1, stride=2, bias=False),
    "pad2": dict(in_channels=6, out_channels=8, kernel_size=3, padding=2),
    "same": dict(in_channels=6, out_channels=8, kernel_size=3, padding="same"),
    "same_even_rect_dil": dict(in_channels=6, out_channels=8, kernel_size=(2, 4), padding="same", dilation=2),
    "dilation2": dict(in_channels=6, out_channels=8, kernel_size=3, padding=2, dilation=2),
    "first_conv_like": dict(in_channels=3, out_channels=32, kernel_size=3, padding=1),  # C_out > C_in·k²
    "reducing_1x1": dict(in_channels=16, out_channels=3, kernel_size=1),  # C_in > C_out·k²
}

HW = (11, 13)  # odd, non-square input: catches padding / stride mistakes


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _orth_error(q: torch.Tensor) -> float:
    eye = torch.eye(q.shape[1], dtype=q.dtype)
    return float((q.mT @ q - eye).abs().max())


def _assert_orthonormal(layer: LowRankLayer, tol: float = 1e-5) -> None:
    for basis in layer.bases():
        assert _orth_error(basis.detach()) < tol, f"basis {tuple(basis.shape)} not orthonormal"


def _assert_rank_state(layer: LowRankLayer) -> None:
    assert tuple(layer.rank_state.tolist()) == layer.ranks
    if isinstance(layer, LowRankLinear):
        (r,) = layer.ranks
        assert layer.U.shape[1] == layer.V.shape[1] == layer.S.shape[0] == layer.S.shape[1] == r
    else:
        r_out, r_in = layer.ranks
        assert layer.U_out.shape[1] == r_out and layer.U_in.shape[1] == r_in
        assert tuple(layer.C.shape[:2]) == (r_out, r_in)


def _dense(kind: str, cfg: dict, dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    mod = nn.Linear(**cfg) if kind == "linear" else nn.Conv2d(**cfg)
    mod = mod.to(dtype)
    if getattr(mod, "bias", None) is not None:
        with torch.no_grad():
            mod.bias.normal_()  # the default init is tiny: a doubled bias would hide in it
    return mod


def _input(kind: str, dense: nn.Module, dtype=torch.float64, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    if kind == "linear":
        return torch.randn(batch, 3, dense.in_features, generator=g).to(dtype)  # extra token dim
    return torch.randn(batch, dense.in_channels, *HW, generator=g).to(dtype)


def _factorize(kind: str, dense: nn.Module, rank=None, **kw) -> LowRankLayer:
    cls = LowRankLinear if kind == "linear" else TuckerConv2d
    return cls.from_dense(dense, rank, **kw)


def _random_grads(layer: LowRankLayer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for basis in layer.bases():
        basis.grad = torch.randn(basis.shape, generator=g).to(basis.dtype)


def _small_rank(layer: LowRankLayer) -> tuple[int, ...]:
    return tuple(max(1, r // 2) for r in layer.ranks)


ALL = [("linear", n) for n in LINEAR_CONFIGS] + [("conv", n) for n in CONV_CONFIGS]


def _cfg(kind: str, name: str) -> dict:
    return (LINEAR_CONFIGS if kind == "linear" else CONV_CONFIGS)[name]


@pytest.fixture(params=ALL, ids=[f"{k}-{n}" for k, n in ALL])
def config(request):
    return request.param


# ----------------------------------------------------------------------------- full rank == dense


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_full_rank_matches_dense(config, dtype, tol):
    kind, name = config
    dense = _dense(kind, _cfg(kind, name), dtype)
    x = _input(kind, dense, dtype)
    layer = _factorize(kind, dense)  # rank None = full
    assert layer.S.dtype == dtype if kind == "linear" else layer.C.dtype == dtype
    y, y_ref = layer(x), dense(x)
    assert y.shape == y_ref.shape
    assert _rel(y, y_ref) <= tol
    if dtype == torch.float64:
        assert _rel(y, y_ref) <= 1e-12  # in fact exact to round-off
    back = layer.to_dense()
    assert type(back) is type(dense)
    assert _rel(back.weight, dense.weight) <= tol
    assert _rel(back(x), y_ref) <= tol
    if getattr(dense, "bias", None) is not None:
        assert torch.equal(layer.bias, dense.bias)
    else:
        assert layer.bias is None
    _assert_orthonormal(layer)
    _assert_rank_state(layer)
    assert layer.dense_num_parameters() == sum(p.numel() for p in dense.parameters())


def test_full_rank_ranks_are_the_tucker_bounds():
    conv = _dense("conv", CONV_CONFIGS["first_conv_like"])  # 3→32, 3×3: mode-0 rank ≤ 27
    assert TuckerConv2d.from_dense(conv).ranks == (27, 3)
    conv = _dense("conv", CONV_CONFIGS["reducing_1x1"])  # 16→3, 1×1: mode-1 rank ≤ 3
    assert TuckerConv2d.from_dense(conv).ranks == (3, 3)
    assert tucker_rank_caps(64, 64, (3, 3), 16) == (16, 16)
    assert tucker_rank_caps(64, 2, (1, 1)) == (2, 2)


def test_forward_does_not_form_the_dense_weight():
    lin = LowRankLinear.from_dense(_dense("linear", LINEAR_CONFIGS["wide"]), 2)
    # three thin maps: x V (in→r), Sᵀ (r→r), Uᵀ (r→out)
    assert lin.V.shape == (20, 2) and lin.S.shape == (2, 2) and lin.U.shape == (7, 2)
    conv = TuckerConv2d.from_dense(_dense("conv", CONV_CONFIGS["k3"]), 2)
    assert conv.C.shape == (2, 2, 3, 3)


def test_bias_added_once():
    conv = _dense("conv", CONV_CONFIGS["k3"])
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(1.5)
    layer = TuckerConv2d.from_dense(conv, 2)
    out = layer(torch.randn(1, 6, 5, 5, dtype=torch.float64))
    assert torch.allclose(out, torch.full_like(out, 1.5))


# ----------------------------------------------------------------------------- truncated init


def test_truncated_init_is_best_low_rank_and_to_dense_matches(config):
    kind, name = config
    dense = _dense(kind, _cfg(kind, name))
    x = _input(kind, dense)
    layer = _factorize(kind, dense, 2)
    assert all(r <= 2 for r in layer.ranks)
    _assert_orthonormal(layer, 1e-12)
    _assert_rank_state(layer)
    assert _rel(layer.to_dense()(x), layer(x)) <= 1e-12
    if kind == "linear":
        u, s, vh = torch.linalg.svd(dense.weight.detach())
        best = (u[:, :2] * s[:2]) @ vh[:2]
        assert torch.allclose(layer.to_dense().weight, best, atol=1e-10)


def test_fractional_rank():
    lin = _dense("linear", LINEAR_CONFIGS["wide"])  # full rank 7
    assert LowRankLinear.from_dense(lin, 0.5).ranks == (4,)  # round(3.5) = 4
    assert LowRankLinear.from_dense(lin, 1.0).ranks == (7,)
    conv = _dense("conv", CONV_CONFIGS["k3"])  # 8 out, 6 in
    assert TuckerConv2d.from_dense(conv, 0.5).ranks == (4, 3)
    assert TuckerConv2d.from_dense(conv, (3, 2)).ranks == (3, 2)
    with pytest.raises(ValueError, match="fractional rank"):
        LowRankLinear.from_dense(lin, 1.5)


def test_rank_bounds_clip_init():
    lin = _dense("linear", LINEAR_CONFIGS["square"])
    layer = LowRankLinear.from_dense(lin, 1, r_min=3, r_max=5)
    assert layer.ranks == (3,) and (layer.r_min, layer.r_max) == (3, 5)
    assert LowRankLinear.from_dense(lin, 10, r_max=5).ranks == (5,)
    conv = TuckerConv2d.from_dense(_dense("conv", CONV_CONFIGS["k3"]), 10, r_max=4)
    assert conv.ranks == (4, 4)


@pytest.mark.parametrize("tol", [0.0, 0.05, 0.3])
def test_init_tol_picks_rank_by_energy(tol):
    lin = _dense("linear", LINEAR_CONFIGS["tall"])
    w = lin.weight.detach()
    layer = LowRankLinear.from_dense(lin, tol=tol)
    assert layer.ranks == (Fn.truncation_rank(torch.linalg.svdvals(w), tol),)
    # energy kept: ‖W − W_r‖ < tol‖W‖ (or exact for tol 0)
    err = torch.linalg.matrix_norm(layer.to_dense().weight.detach() - w)
    assert float(err) <= max(tol, 1e-12) * float(torch.linalg.matrix_norm(w))

    conv = _dense("conv", CONV_CONFIGS["k3"])
    t = TuckerConv2d.from_dense(conv, tol=tol)
    k = conv.weight.detach()
    expect = tuple(Fn.truncation_rank(torch.linalg.svdvals(Fn.unfold(k, m)), tol) for m in (0, 1))
    assert t.ranks == expect
    _assert_orthonormal(t, 1e-12)


def test_init_tol_respects_r_min_r_max():
    lin = _dense("linear", LINEAR_CONFIGS["square"])
    assert LowRankLinear.from_dense(lin, tol=0.99, r_min=3).ranks == (3,)
    assert LowRankLinear.from_dense(lin, tol=0.0, r_max=4).ranks == (4,)
    # a rank given with tol is the most the energy rule may keep
    assert LowRankLinear.from_dense(lin, 5, tol=0.0).ranks == (5,)
    assert LowRankLinear.from_dense(lin, 5, tol=0.99, r_min=2).ranks == (2,)
    conv = _dense("conv", CONV_CONFIGS["k3"])
    assert TuckerConv2d.from_dense(conv, 3, tol=0.0).ranks == (3, 3)


def test_randomized_init_path_for_big_linear():
    m, n, r = 2500, 2000, 30
    assert Fn.uses_randomized_svd(m, n, r)
    g = torch.Generator().manual_seed(0)
    sigma = torch.exp(-torch.arange(200.0) / 10)
    u, _ = torch.linalg.qr(torch.randn(m, 200, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, 200, generator=g))
    lin = nn.Linear(n, m)
    with torch.no_grad():
        lin.weight.copy_((u * sigma) @ v.mT)
    layer = LowRankLinear.from_dense(lin, r)
    _assert_orthonormal(layer)
    s = torch.diagonal(layer.S.detach())
    assert float(((s - sigma[:r]).abs() / sigma[:r]).max()) < 1e-3


def test_grouped_and_padding_mode_rejected():
    with pytest.raises(ValueError, match="grouped"):
        TuckerConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode"):
        TuckerConv2d.from_dense(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))


# ----------------------------------------------------------------------------- augment / truncate


def test_augment_keeps_output_and_doubles_ranks(config):
    kind, name = config
    dense = _dense(kind, _cfg(kind, name))
    x = _input(kind, dense)
    layer = _factorize(kind, dense, 2, r_max=5)
    before = layer(x).detach()
    ranks = layer.ranks
    old_core = layer.core.detach().clone()
    _random_grads(layer, seed=1)
    change = layer.augment_(seed=7)
    assert isinstance(change, BasisChange)
    if kind == "linear":
        caps = (layer.r_max,)
    else:
        caps = (layer.r_max_out, layer.r_max_in)
    assert layer.ranks == tuple(min(2 * r, c) for r, c in zip(ranks, caps))
    assert _rel(layer(x).detach(), before) <= 1e-13
    assert torch.equal(change.apply(old_core), layer.core.detach())  # zero padding, exactly
    assert change.padding  # ...applied as a copy, which is the product with [I | 0] exactly:
    assert torch.equal(Fn.mode_product(old_core, change.left, change.right), layer.core.detach())
    _assert_orthonormal(layer, 1e-12)
    _assert_rank_state(layer)
    assert all(b.grad is None for b in layer.bases())  # stale gradients dropped with the resize


def test_augment_needs_basis_gradients():
    layer = _factorize("linear", _dense("linear", LINEAR_CONFIGS["square"]), 3)
    with pytest.raises(RuntimeError, match="set_bases_trainable"):
        layer.augment_()
    layer.set_bases_trainable(True)
    layer(torch.randn(2, 12, dtype=torch.float64)).square().sum().backward()
    layer.augment_()  # real gradients from a backward pass
    assert layer.ranks == (6,)
    layer.set_bases_trainable(False)
    assert all(not b.requires_grad and b.grad is None for b in layer.bases())


@pytest.mark.parametrize("refactor", [True, False], ids=["refactored", "rotated"])
def test_truncate_tau_zero_keeps_output(config, refactor):
    kind, name = config
    dense = _dense(kind, _cfg(kind, name))
    x = _input(kind, dense)
    layer = _factorize(kind, dense, 2)
    _random_grads(layer, seed=2)
    layer.augment_(seed=3)
    before = layer(x).detach()
    old_core = layer.core.detach().clone()
    change = layer.truncate_(0.0, reorthonormalize_bases=refactor)
    assert _rel(layer(x).detach(), before) <= 1e-12
    _assert_orthonormal(layer, 1e-12)
    _assert_rank_state(layer)
    # the BasisChange maps the old core onto the new one (up to the ≈I re-orthonormalization)
    assert _rel(change.apply(old_core), layer.core.detach()) <= 1e-10


def test_truncate_tau_monotone_and_bounded(config):
    kind, name = config
    dense = _dense(kind, _cfg(kind, name))
    base = _factorize(kind, dense, None, r_min=2)
    prev = None
    for tau in (0.0, 0.01, 0.1, 0.3, 0.6, 0.99):
        layer = copy.deepcopy(base)
        layer.truncate_(tau)
        ranks = layer.ranks
        assert all(layer.r_min <= r for r in ranks)
        caps = (layer.r_max,) if kind == "linear" else (layer.r_max_out, layer.r_max_in)
        assert all(r <= c for r, c in zip(ranks, caps))
        if prev is not None:
            assert all(r <= p for r, p in zip(ranks, prev)), (tau, ranks, prev)
        prev = ranks
        _assert_orthonormal(layer, 1e-12)
        _assert_rank_state(layer)
    assert all(r == min(2, c) for r, c in zip(prev, caps))  # τ = 0.99 → r_min


def test_a_hard_cap_on_one_mode_bounds_the_other_by_what_it_leaves_reachable():
    # mode 1 capped at 2 directions of a 3×3 conv: the core's mode-0 unfolding has rank ≤ 2·9,
    # so U_out keeps 18 columns, not its 40 (extra ones would make the core's spectrum singular)
    torch.manual_seed(0)
    layer = TuckerConv2d.from_dense(nn.Conv2d(48, 40, 3, padding=1).double(), rank=None)
    layer.truncate_(0.0, rank_cap=(40, 2))
    x = torch.randn(2, 48, 6, 6, dtype=torch.float64)
    capped_once = layer(x).detach()
    assert layer.ranks == (18, 2)
    _assert_orthonormal(layer, 1e-12)
    _assert_rank_state(layer)
    sigma = torch.linalg.svdvals(layer.core_matrix().detach())
    assert sigma.min() > 1e-8 * sigma.max()  # no direction of U_out left without energy
    # lossless: the same as projecting mode 1 alone (U_out at its 40 columns)
    torch.manual_seed(0)
    reference = TuckerConv2d.from_dense(nn.Conv2d(48, 40, 3, padding=1).double(), rank=None)
    with torch.no_grad():
        core, u_out, u_in = reference.core.detach(), reference.U_out.detach(), reference.U_in.detach()
        p1 = torch.linalg.svd(Fn.unfold(core, 1), full_matrices=False)[0][:, :2]
        reference._set(u_out, Fn.mode_product(core, torch.eye(40, dtype=core.dtype), p1), u_in @ p1)
    assert _rel(capped_once, reference(x).detach()) <= 1e-10


def test_truncate_error_within_tau_linear():
    lin = _dense("linear", LINEAR_CONFIGS["square"])
    layer = LowRankLinear.from_dense(lin)
    w = layer.to_dense().weight.detach()
    layer.truncate_(0.3)
    err = torch.linalg.matrix_norm(layer.to_dense().weight.detach() - w)
    assert float(err) < 0.3 * float(torch.linalg.matrix_norm(w))


def test_float32_linear_truncation_from_gram_eigenvectors_is_the_svds():
    """At τ = 0.1 a float32 core's P, Q come from eigendecompositions of ŜŜᵀ and ŜᵀŜ: the rank is
    the SVD rule's and the truncated weight the best one of that rank (error ‖σ[r:]‖)."""
    g = torch.Generator().manual_seed(0)
    layer = LowRankLinear.from_dense(nn.Linear(300, 260), rank=120, r_min=2, r_max=120)
    with torch.no_grad():  # a decaying spectrum with a generic core
        q1, _ = torch.linalg.qr(torch.randn(120, 120, generator=g))
        q2, _ = torch.linalg.qr(torch.randn(120, 120, generator=g))
        layer.S.copy_(q1 @ torch.diag(torch.logspace(0, -2, 120)) @ q2.mT)
    assert Fn.gram_suffices(0.1, 120, torch.float32)
    w = layer.to_dense().weight.detach().double()
    sigma = torch.linalg.svdvals(layer.S.detach().double())
    layer.truncate_(0.1)
    r = layer.ranks[0]
    assert r == Fn.truncation_rank(sigma, 0.1, 2, 120)
    err = torch.linalg.matrix_norm(layer.to_dense().weight.detach().double() - w)
    assert abs(float(err) / float(sigma[r:].norm()) - 1) < 1e-3
    _assert_orthonormal(layer, 1e-5)


@pytest.mark.parametrize(
    "kind, name",
    [("linear", "wide"), ("linear", "tall"), ("conv", "k3"), ("conv", "stride2"), ("conv", "first_conv_like")],
)
def test_many_cycles_stay_orthonormal_and_bounded(kind, name):
    """float32 DLRT cycles: augment with random gradients, perturb the core, truncate."""
    dense = _dense(kind, _cfg(kind, name), torch.float32)
    x = _input(kind, dense, torch.float32)
    layer = _factorize(kind, dense, 2, r_min=2, r_max=6)
    g = torch.Generator().manual_seed(0)
    for cycle in range(30):
        _random_grads(layer, seed=cycle)
        before = layer(x).detach()
        layer.augment_(seed=cycle)
        _assert_orthonormal(layer)
        assert _rel(layer(x).detach(), before) <= 1e-5
        with torch.no_grad():  # a coefficient step
            layer.core.add_(0.1 * torch.randn(layer.core.shape, generator=g))
        layer.truncate_(0.1)
        _assert_orthonormal(layer)
        _assert_rank_state(layer)
        caps = (layer.r_max,) if kind == "linear" else (layer.r_max_out, layer.r_max_in)
        assert all(layer.r_min <= r <= c for r, c in zip(layer.ranks, caps))
    assert _rel(layer.to_dense()(x), layer(x)) <= 1e-4


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_truncation_without_refactoring_keeps_tall_bases_orthonormal(kind):
    """float32, 60 cycles of truncate_(reorthonormalize_bases=False): U·P with float64-
    orthonormal P lets a tall basis drift by ~1e-8 a cycle (measured: ~5e-7 → ~1e-6, where
    ~5e-7 is what every augmentation's float32 QR leaves anyway); the trainer re-factors every
    few cycles, and one re-factoring truncation brings it back."""
    torch.manual_seed(0)
    if kind == "linear":
        layer = LowRankLinear.from_dense(nn.Linear(3000, 400), rank=40, r_min=2, r_max=80)
    else:
        layer = TuckerConv2d.from_dense(nn.Conv2d(160, 320, 3, padding=1), rank=(40, 40), r_min=2, r_max=80)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for cycle in range(60):
        _random_grads(layer, seed=cycle)
        layer.augment_(seed=cycle)
        with torch.no_grad():
            layer.core.add_(0.05 * layer.core.abs().mean() * torch.randn(layer.core.shape, generator=g))
        layer.truncate_(0.02, reorthonormalize_bases=False)
        worst = max(worst, *(_orth_error(b.detach().double()) for b in layer.bases()))
        _assert_rank_state(layer)
    assert worst < 2e-6, worst
    x = torch.randn(4, 3000) if kind == "linear" else torch.randn(2, 160, 6, 6)
    before = layer(x).detach()
    layer.truncate_(0.0)  # re-factoring: orthonormal to float32 round-off again, W unchanged
    assert max(_orth_error(b.detach().double()) for b in layer.bases()) < 1e-6
    assert _rel(layer(x).detach(), before) <= 1e-5


# ----------------------------------------------------------------------------- state dicts


def test_state_dict_round_trip_across_rank_changes(config):
    kind, name = config
    dense = _dense(kind, _cfg(kind, name))
    x = _input(kind, dense)
    src = _factorize(kind, dense, 2, r_max=5)
    _random_grads(src, seed=4)
    src.augment_(seed=5)
    with torch.no_grad():
        src.core.add_(torch.randn_like(src.core))
    state = src.state_dict()
    assert tuple(state["rank_state"].tolist()) == src.ranks

    fresh = _factorize(kind, _dense(kind, _cfg(kind, name), seed=9), 1, r_max=5)  # other weights, rank 1
    assert fresh.ranks != src.ranks
    fresh.load_state_dict(state)
    assert fresh.ranks == src.ranks
    _assert_rank_state(fresh)
    assert torch.equal(fresh(x), src(x))

    # and back down: a smaller saved rank shrinks a bigger layer
    src.truncate_(0.5)
    small = src.state_dict()
    fresh.load_state_dict(small)
    assert fresh.ranks == src.ranks
    assert torch.equal(fresh(x), src(x))


def test_state_dict_resize_keeps_parameter_objects():
    layer = _factorize("linear", _dense("linear", LINEAR_CONFIGS["square"]), 2)
    params = [id(p) for p in layer.parameters()]
    other = _factorize("linear", _dense("linear", LINEAR_CONFIGS["square"]), 5)
    layer.load_state_dict(other.state_dict())
    assert [id(p) for p in layer.parameters()] == params  # optimizer param groups stay valid
    assert layer.ranks == (5,)


def test_state_dict_inside_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).double()
    model[0] = TuckerConv2d.from_dense(model[0], 2)
    model[3] = LowRankLinear.from_dense(model[3], 3)
    assert set(low_rank_layers(model)) == {"0", "3"}
    for m in low_rank_layers(model).values():
        _random_grads(m, 0)
        m.augment_()
    other = copy.deepcopy(model)
    for m in low_rank_layers(other).values():
        m.set_ranks_((1,) * len(m.ranks))
    other.load_state_dict(model.state_dict())
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    assert torch.equal(other(x), model(x))


# ----------------------------------------------------------------------------- spectra


def test_condition_number_and_regularizer_act_on_core():
    lin = _dense("linear", LINEAR_CONFIGS["wide"])
    layer = LowRankLinear.from_dense(lin)
    s = torch.linalg.svdvals(lin.weight.detach())
    assert abs(layer.condition_number() - float(s[0] / s[-1])) < 1e-8 * float(s[0] / s[-1])
    conv = _dense("conv", CONV_CONFIGS["k3"])
    t = TuckerConv2d.from_dense(conv)
    s0 = torch.linalg.svdvals(Fn.unfold(conv.weight.detach(), 0))
    assert t.core_matrix().shape == (8, 6 * 9)
    assert abs(t.condition_number() - float(s0[0] / s0[-1])) < 1e-8 * float(s0[0] / s0[-1])
    r = Fn.spectral_regularizer(t.core_matrix())
    assert r.dtype == torch.float64 and float(r.detach()) > 0
    r.backward()
    assert t.C.grad is not None and all(b.grad is None for b in t.bases())


def test_num_parameters_counts_current_ranks():
    layer = _factorize("linear", _dense("linear", LINEAR_CONFIGS["wide"]), 3)
    assert layer.num_parameters() == 7 * 3 + 3 * 3 + 20 * 3 + 7
    conv = _factorize("conv", _dense("conv", CONV_CONFIGS["k3"]), 2)
    assert conv.num_parameters() == 8 * 2 + 2 * 2 * 9 + 6 * 2 + 8


def test_tucker_memory_format_choice():
    """Default: NHWC inside and out (as torch's convs do for a channels-last input), same values;
    channels_last=False keeps NCHW for models that call x.view(n, -1) on conv outputs."""
    conv = nn.Conv2d(16, 32, 3, padding=1)
    layer = TuckerConv2d.from_dense(conv, 8)
    x = torch.rand(2, 16, 8, 8)
    with torch.no_grad():
        y_nhwc = layer(x)
        assert y_nhwc.is_contiguous(memory_format=torch.channels_last)
        layer.channels_last = False
        y = layer(x)
        assert y.is_contiguous() and y.view(2, -1).shape == (2, 32 * 64)
        torch.testing.assert_close(y_nhwc, y, atol=1e-6, rtol=1e-5)

    class ViewsFeatures(nn.Module):  # the pattern that needs NCHW outputs
        def __init__(self):
            super().__init__()
            self.stem, self.conv, self.head = (
                nn.Conv2d(3, 16, 3, padding=1),
                nn.Conv2d(16, 16, 3, padding=1),
                nn.Linear(16 * 64, 4),
            )

        def forward(self, x):
            h = self.conv(torch.relu(self.stem(x)))
            return self.head(h.view(h.shape[0], -1))

    torch.manual_seed(0)
    model = ViewsFeatures()
    factorize_(model, init_rank=4, r_max=8, keep_classifier=True, channels_last=False)
    assert isinstance(model.conv, TuckerConv2d) and not model.conv.channels_last
    assert model(torch.rand(2, 3, 8, 8)).shape == (2, 4)
