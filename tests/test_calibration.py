"""Activation-aware initial bases (compressor.calibration): exact at full rank, orthonormal,
optimal for linear layers in the data's metric, and far better than weight SVD on layers whose
weights are flat-spectrum but whose activations are low-rank."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compressor.calibration import SecondMoment, activation_bases
from compressor.factorize import factorize_
from compressor.functional import fix_signs, principal_subspace
from compressor.layers import LowRankLinear, TuckerConv2d, low_rank_layers


def _orthonormal(u: torch.Tensor, tol: float = 1e-5) -> bool:
    eye = torch.eye(u.shape[1], dtype=u.dtype)
    return float((u.mT @ u - eye).abs().max()) <= tol


def _low_rank_inputs(n: int, d: int, k: int, seed: int = 0) -> torch.Tensor:
    """n samples of dimension d living (up to 1e-3 noise) in a k-dimensional subspace."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]
    return torch.randn(n, k, generator=g, dtype=torch.float64) @ basis.mT + 1e-3 * torch.randn(
        n, d, generator=g, dtype=torch.float64
    )


def test_second_moment_rows_and_gram_agree() -> None:
    x = torch.randn(300, 40, dtype=torch.float64)
    few, many = SecondMoment(), SecondMoment()
    few.add(x[:30])  # 30 rows < 40: kept as rows
    assert few.gram is None and few.n == 30
    for chunk in x.split(50):
        many.add(chunk)  # switches to the Gram once the rows outnumber the dimension
    assert many.gram is not None and many.n == 300
    torch.testing.assert_close(many.gram, x.mT @ x)
    u_rows, lam_rows = few.principal(10, lambda k: torch.randn(40, k, dtype=torch.float64))
    u_gram, lam_gram = principal_subspace(x[:30].mT @ x[:30], 10)
    torch.testing.assert_close(lam_rows[:10], lam_gram[:10])
    torch.testing.assert_close(u_rows, u_gram)  # same canonical signs on both paths
    # more directions asked than the rows carry: completed orthonormally from the fill
    u, lam = few.principal(35, lambda k: torch.randn(40, k, dtype=torch.float64))
    assert u.shape == (40, 35) and _orthonormal(u, 1e-10)


def test_fix_signs_is_canonical() -> None:
    q = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64))[0]
    flipped = q * torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(fix_signs(q), fix_signs(flipped))
    f = fix_signs(q)
    assert all(float(f[f[:, j].abs().argmax(), j]) > 0 for j in range(3))


def test_linear_output_basis_is_the_optimal_data_aware_approximation() -> None:
    """W_r = U Uᵀ W with U the top eigenvectors of E[(Wx)(Wx)ᵀ] minimizes E‖(W − W_r)x‖²
    over rank-r matrices: compare with the closed form [W C^½]_r C^-½."""
    torch.manual_seed(0)
    lin = nn.Linear(24, 32, bias=True).double()
    x = _low_rank_inputs(500, 24, 10) + 0.1 * torch.randn(500, 24, dtype=torch.float64)
    bases = activation_bases(lin, {"": lin}, [x], init_rank=6, init_tol=None, r_min=1, r_max=100)
    layer = LowRankLinear.from_output_basis(lin, bases[""].u, r_min=1, r_max=24)
    assert layer.ranks == (6,) and _orthonormal(layer.U, 1e-10) and _orthonormal(layer.V, 1e-10)
    w = lin.weight.detach()
    c = x.mT @ x
    lam, q = torch.linalg.eigh(c)
    c_half, c_mhalf = q @ torch.diag(lam.sqrt()) @ q.mT, q @ torch.diag(lam.rsqrt()) @ q.mT
    p, s, vh = torch.linalg.svd(w @ c_half)
    best = p[:, :6] @ torch.diag(s[:6]) @ vh[:6] @ c_mhalf
    w_r = (layer.U @ layer.S @ layer.V.mT).detach()
    torch.testing.assert_close(w_r, best, atol=1e-8, rtol=1e-8)
    err = lambda m: float(((w - m) @ x.mT).norm())  # noqa: E731
    svd = LowRankLinear.from_dense(lin, 6)
    assert err(w_r) < err((svd.U @ svd.S @ svd.V.mT).detach())  # the weight SVD is worse on these inputs
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ w_r.mT + lin.bias)


@pytest.mark.parametrize("shape", [(16, 12, 3, 3, 1), (12, 16, 1, 1, 1), (20, 8, 3, 5, 2), (6, 3, 3, 3, 1)])
def test_full_rank_stays_exact_whatever_the_data(shape) -> None:
    """At a mode's algebraic cap the kernel's own basis is used: exact even on degenerate data."""
    c_out, c_in, kh, kw, stride = shape
    torch.manual_seed(1)
    conv = nn.Conv2d(c_in, c_out, (kh, kw), stride=stride, padding=1).double()
    lin = nn.Linear(c_out * 4, 7).double()
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), lin)
    dense = copy.deepcopy(model)
    x = torch.zeros(4, c_in, 6, 6, dtype=torch.float64)
    x[:, 0] = torch.rand(4, 6, 6, dtype=torch.float64)  # only one input channel carries signal
    report = factorize_(
        model,
        init_rank=None,
        r_max=10_000,
        require_saving=False,
        keep_first_conv=False,
        keep_classifier=False,
        calibration=[x],
    )
    # the linear at full rank takes the (exact) SVD; the conv's modes at their caps the kernel's bases
    assert {d.name: d.init for d in report.factorized} == {"0": "activations", "4": "svd"}
    probe = torch.randn(3, c_in, 6, 6, dtype=torch.float64)  # other data than the calibration's
    with torch.no_grad():
        torch.testing.assert_close(model(probe), dense(probe), atol=1e-10, rtol=1e-10)


def test_conv_bases_capture_low_rank_activations_that_weight_svd_misses() -> None:
    """A random (flat-spectrum) 32→32 1×1 conv fed inputs of channel rank 4 (so outputs of rank
    4): rank-8 activation-aware bases keep the output exactly, the rank-8 HOSVD of the weights
    loses most of it."""
    torch.manual_seed(2)
    conv = nn.Conv2d(32, 32, 1).double()
    mix = torch.linalg.qr(torch.randn(32, 4, dtype=torch.float64))[0]
    x = torch.einsum("nkhw,ck->nchw", torch.randn(16, 4, 8, 8, dtype=torch.float64), mix)
    bases = activation_bases(conv, {"": conv}, [x], init_rank=8, init_tol=None, r_min=1, r_max=100)[""]
    assert bases.u_out.shape == (32, 8) and bases.u_in.shape == (32, 8)
    assert _orthonormal(bases.u_out, 1e-10) and _orthonormal(bases.u_in, 1e-10)
    aware = TuckerConv2d.from_bases(conv, bases.u_out, bases.u_in)
    plain = TuckerConv2d.from_dense(conv, 8)
    with torch.no_grad():
        y = conv(x) - conv.bias.view(1, -1, 1, 1)
        rel = lambda layer: float((layer(x) - conv.bias.view(1, -1, 1, 1) - y).norm() / y.norm())  # noqa: E731
        assert rel(aware) < 1e-10 and rel(plain) > 0.5


def test_init_tol_reads_the_activation_spectrum() -> None:
    torch.manual_seed(3)
    lin = nn.Linear(40, 40).double()
    x = _low_rank_inputs(400, 40, 5)  # outputs W x span 5 directions (plus noise)
    report = factorize_(
        nn.Sequential(lin, nn.ReLU(), nn.Linear(40, 2).double()),
        init_rank=None,
        init_tol=0.01,
        r_min=2,
        r_max=100,
        calibration=[x],
    )
    assert report.factorized[0].ranks == [5]  # the weight SVD would keep ~all of a random 40×40
    assert report.factorized[0].init == "activations"


def test_calibration_restores_modes_and_leaves_the_model_unchanged() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 16, 64),
        nn.Linear(64, 5),
    )
    model.train()
    model[1].eval()
    before = copy.deepcopy(model.state_dict())
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.rand(40, 3, 4, 4), torch.zeros(40).long()), batch_size=8
    )
    report = factorize_(model, init_rank=4, r_max=16, calibration=loader, calibration_batches=2)
    assert {d.name for d in report.factorized} == {"4", "7"}
    assert model.training and not model[1].training and model[3].training
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked", "0.weight"):
        assert torch.equal(model.state_dict()[key], before[key]), key  # BN statistics untouched
    for layer in low_rank_layers(model).values():
        for basis in layer.bases():
            assert _orthonormal(basis.detach().double())


def test_empty_or_bad_calibration_is_a_clear_error() -> None:
    from compressor.errors import DataError

    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 2))
    with pytest.raises(DataError, match="empty"):
        factorize_(model, init_rank=4, r_max=8, calibration=[])
    with pytest.raises(DataError, match="image tensors"):
        factorize_(model, init_rank=4, r_max=8, calibration=[["not", "a", "tensor"]])


def test_a_layer_the_forward_never_calls_gets_the_svd_init() -> None:
    class WithAux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.aux, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.body(x))

    model = WithAux()
    report = factorize_(model, init_rank=3, r_max=8, calibration=[torch.randn(20, 16)])
    inits = {d.name: d.init for d in report.factorized}
    assert inits == {"body": "activations", "aux": "svd"}


class _TwoProcesses:
    """A stand-in for DistContext over two threads: all_reduce_sum sums what both hand in."""

    def __init__(self, rank: int, shared: dict) -> None:
        self.enabled, self.rank, self.world_size, self.shared = True, rank, 2, shared

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        self.shared["slots"][self.rank] = t.clone()
        self.shared["barrier"].wait()
        total = self.shared["slots"][0] + self.shared["slots"][1]
        self.shared["barrier"].wait()
        return total

    def any(self, flag: bool) -> bool:
        return bool(self.all_reduce_sum(torch.tensor([float(flag)])).item() > 0)


@pytest.mark.parametrize("rows_each, d", [(5, 16), (12, 16), (40, 16)])  # rows kept, rows folded, Grams
def test_gather_pools_the_rows_of_both_processes(rows_each: int, d: int) -> None:
    import threading

    x = torch.randn(2 * rows_each, d, dtype=torch.float64)
    one = SecondMoment()
    one.add(x)
    shared = {"slots": [None, None], "barrier": threading.Barrier(2)}
    moments = [SecondMoment(), SecondMoment()]
    for rank, moment in enumerate(moments):
        moment.add(x[rank * rows_each : (rank + 1) * rows_each])
    threads = [threading.Thread(target=m.gather, args=(_TwoProcesses(r, shared),)) for r, m in enumerate(moments)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fill = lambda k: torch.eye(d, k, dtype=torch.float64)  # noqa: E731
    want_u, want_lam = one.principal(4, fill)
    for moment in moments:
        assert moment.n == 2 * rows_each
        u, lam = moment.principal(4, fill)
        torch.testing.assert_close(lam, want_lam)
        torch.testing.assert_close(u @ u.mT, want_u @ want_u.mT)  # the same subspace on both
        torch.testing.assert_close(u, want_u)  # and the same canonical basis


def test_init_tol_rank_respects_r_min_with_few_calibration_rows() -> None:
    lin = nn.Linear(64, 64)
    report = factorize_(
        nn.Sequential(lin, nn.Linear(64, 2)),
        init_rank=None,
        init_tol=0.1,
        r_min=8,
        r_max=32,
        calibration=[torch.randn(3, 64)],
    )  # 3 rows: only 3 directions carry data
    ranks = report.factorized[0].ranks
    assert ranks == [8], ranks
    layer = report.factorized[0]
    assert layer.init == "activations"
