"""Invariants of every registered attack, parity with torchattacks, registry and input errors."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from compressor.attacks import Attack, attack_options, create_attack, list_attacks
from compressor.errors import ConfigError, UnknownNameError
from compressor.runtime import registering

ATTACKS = list_attacks()
# few iterations: the invariants do not depend on the step count, and the suite must stay fast
FAST = {"pgd": {"steps": 3}, "apgd": {"steps": 5}, "jitter": {"steps": 2}, "mixup": {"steps": 2}}
EPS = 0.1
TOL = 1e-6


def synthetic(n: int, seed: int, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """An easy task: one fixed random template per class plus pixel noise, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(k, 3, 8, 8, generator=torch.Generator().manual_seed(123)) * 0.6 + 0.2
    y = torch.randint(0, k, (n,), generator=g)
    return (templates[y] + 0.15 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 1), y


class TinyNet(nn.Module):
    """Normalization inside, BatchNorm and Dropout so that train/eval mode matters."""

    def __init__(self, k: int = 4) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.25))
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(16, k),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) / self.std)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny tensors: threads only add overhead on a shared machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train_tiny(steps: int = 80) -> nn.Module:
    """SGD with momentum by hand: < 1 s, and avoids torch.optim's slow first-step imports."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = TinyNet()
        x, y = synthetic(1024, seed=1)
        params = list(net.parameters())
        bufs = [torch.zeros_like(p) for p in params]
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,))
            grads = torch.autograd.grad(F.cross_entropy(net(x[idx]), y[idx]), params)
            with torch.no_grad():
                for p, g, b in zip(params, grads, bufs):
                    p.sub_(0.05 * b.mul_(0.9).add_(g))
    return net.eval()


@pytest.fixture(scope="module")
def model(one_thread) -> nn.Module:
    return train_tiny()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return synthetic(16, seed=2)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("name", ATTACKS)
def test_shape_range_and_linf_box(name, model, batch):
    x, y = batch
    adv = create_attack(name, model, eps=EPS, **FAST.get(name, {}))(x, y)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() <= EPS + TOL
    assert not adv.requires_grad


def test_pgd_l2_ball(model, batch):
    x, y = batch
    eps = 0.5
    adv = create_attack("pgd", model, eps=eps, norm="l2", steps=5)(x, y)
    norms = (adv - x).flatten(1).norm(dim=1)
    assert norms.max() <= eps + 1e-5
    assert norms.max() > 0.9 * eps  # the ball is used, not just respected
    assert adv.min() >= 0 and adv.max() <= 1


@pytest.mark.parametrize("name", ATTACKS)
@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_mode_restored_stats_and_grads_untouched(name, mode, model, batch):
    x, y = batch
    model.train(mode != "eval")
    if mode == "mixed":
        model.body[1].eval()  # a frozen BatchNorm inside a training model
    before = {n: m.training for n, m in model.named_modules()}
    stats = model.body[1].running_mean.clone()
    try:
        create_attack(name, model, eps=EPS, **FAST.get(name, {}))(x, y)
        assert {n: m.training for n, m in model.named_modules()} == before
    finally:
        model.eval()
    assert torch.equal(model.body[1].running_mean, stats)  # attacked in eval mode
    assert all(p.grad is None for p in model.parameters())


def test_mode_restored_on_exception(model, batch):
    class Boom(Attack):
        def forward(self, images, labels):
            raise RuntimeError("boom")

    model.train()
    try:
        with pytest.raises(RuntimeError, match="boom"):
            Boom(model, EPS)(*batch)
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()


@pytest.mark.parametrize("name", ATTACKS)
def test_same_seed_same_output(name, model, batch):
    x, y = batch
    a = create_attack(name, model, eps=EPS, seed=3, **FAST.get(name, {}))
    b = create_attack(name, model, eps=EPS, seed=3, **FAST.get(name, {}))
    assert torch.equal(a(x, y), b(x, y))
    assert torch.equal(a(x, y), a(x, y))  # every call reseeds


def test_seed_matters_and_global_rng_untouched(model, batch):
    x, y = batch
    state = torch.random.get_rng_state()
    a = create_attack("pgd", model, eps=EPS, steps=1, seed=0)(x, y)
    b = create_attack("pgd", model, eps=EPS, steps=1, seed=1)(x, y)
    assert not torch.equal(a, b)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("name", ATTACKS)
def test_clean_accuracy_bounds_robust_accuracy(name, model):
    x, y = synthetic(128, seed=4)
    clean = accuracy(model, x, y)
    assert clean > 0.9  # the fixture learned the easy task
    robust = accuracy(model, create_attack(name, model, eps=EPS, **FAST.get(name, {}))(x, y), y)
    assert robust <= clean
    if name in ("fgsm", "pgd", "apgd"):
        assert robust < clean - 0.2  # ε = 0.1 is a large budget on this task


def test_apgd_is_the_strong_check(model):
    x, y = synthetic(128, seed=5)
    eps = 0.03
    pgd = accuracy(model, create_attack("pgd", model, eps=eps)(x, y), y)
    apgd = accuracy(model, create_attack("apgd", model, eps=eps)(x, y), y)
    assert apgd <= pgd + 0.02


# ----------------------------------------------------------------------------- units, rounding

STD = (0.2, 0.5, 1.0)


@pytest.mark.parametrize("name", ATTACKS)
def test_normalized_units_box(name, model, batch):
    x, y = batch
    eps = 0.05
    x = 0.25 + 0.5 * x  # keep away from 0 and 1 so the box, not [0, 1], binds
    adv = create_attack(name, model, eps=eps, eps_unit="normalized", std=STD, **FAST.get(name, {}))(x, y)
    bound = eps * torch.tensor(STD).view(1, 3, 1, 1)
    assert ((adv - x).abs() <= bound + TOL).all()
    if name in ("fgsm", "pgd", "l1_fgsm"):  # sign steps reach the per-channel box edge
        reach = (adv - x).abs().amax(dim=(0, 2, 3))
        assert torch.allclose(reach, bound.flatten(), atol=1e-6)


def test_normalized_units_l2_ball(model, batch):
    x, y = batch
    eps = 0.5
    adv = create_attack("pgd", model, eps=eps, norm="l2", steps=3, eps_unit="normalized", std=STD)(x, y)
    u = (adv - x) / torch.tensor(STD).view(1, 3, 1, 1)
    assert u.flatten(1).norm(dim=1).max() <= eps + 1e-5


def test_normalized_units_need_std(model):
    with pytest.raises(ConfigError, match="std"):
        create_attack("fgsm", model, eps=0.1, eps_unit="normalized")


def on_grid(t: torch.Tensor) -> bool:
    return bool(((t * 255 - torch.round(t * 255)).abs() < 1e-3).all())


@pytest.mark.parametrize("name", ATTACKS)
def test_round_8bit_on_grid_and_in_box(name, model, batch):
    x, y = batch
    x = torch.round(x * 255) / 255  # images decoded from 8-bit files
    eps = 0.03
    adv = create_attack(name, model, eps=eps, round_8bit=True, **FAST.get(name, {}))(x, y)
    assert on_grid(adv)
    assert (adv - x).abs().max() <= eps + TOL
    assert adv.min() >= 0 and adv.max() <= 1


def test_round_8bit_l2_and_off_grid_inputs(model, batch):
    x, y = batch
    x_grid = torch.round(x * 255) / 255
    adv = create_attack("pgd", model, eps=0.3, norm="l2", steps=3, round_8bit=True)(x_grid, y)
    assert on_grid(adv) and (adv - x_grid).flatten(1).norm(dim=1).max() <= 0.3 + 1e-5
    # off-grid clean images with a budget below half a grid step: the ball wins over the grid
    adv = create_attack("fgsm", model, eps=0.001, round_8bit=True)(x, y)
    assert (adv - x).abs().max() <= 0.001 + TOL


class _Fixed(Attack):
    """Returns a given adversarial image: isolates the base class's projection and rounding."""

    def __init__(self, model, eps, adv, norm, **kw):
        super().__init__(model, eps, **kw)
        self.adv, self.norm = adv, norm

    def forward(self, images, labels):
        return self.adv


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    eps=st.floats(0.0, 0.2),
    norm=st.sampled_from(["linf", "l2"]),
    grid=st.booleans(),
    normalized=st.booleans(),
)
def test_round_8bit_property(seed, eps, norm, grid, normalized):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 3, 4, 4, generator=g)
    if grid:
        x = torch.round(x * 255) / 255
    adv = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    kw = {"eps_unit": "normalized", "std": STD} if normalized else {}
    out = _Fixed(nn.Identity(), eps, adv, norm, round_8bit=True, **kw)(x, torch.zeros(3, dtype=torch.long))
    u = (out - x) / (torch.tensor(STD).view(1, 3, 1, 1) if normalized else 1.0)
    if norm == "linf":
        assert u.abs().max() <= eps + 1e-5
    else:
        assert u.flatten(1).norm(dim=1).max() <= eps + 1e-5
    assert out.min() >= 0 and out.max() <= 1
    if grid:
        assert on_grid(out)


# ----------------------------------------------------------------------------- parity


def test_fgsm_matches_torchattacks(model, batch):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = synthetic(64, seed=6)
    for eps in (0.01, 0.1):
        ref = torchattacks.FGSM(model, eps=eps)(x, y)
        ours = create_attack("fgsm", model, eps=eps)(x, y)
        assert (ref - ours).abs().max() <= 1e-5


def test_pgd_matches_torchattacks(model):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = synthetic(64, seed=7)
    eps, steps, alpha = 0.03, 5, 0.01
    ref = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    ours = create_attack("pgd", model, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    assert (ref - ours).abs().max() <= 1e-5


@pytest.mark.parametrize("eps", [0.03, 0.1])
def test_jitter_matches_torchattacks_accuracy(model, eps):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = synthetic(200, seed=8)
    ref = torchattacks.Jitter(model, eps=eps, alpha=eps / 4, steps=5, scale=10, std=0.1, random_start=False)
    ours = create_attack("jitter", model, eps=eps, alpha=eps / 4, steps=5, scale=10, sigma=0.1, step="sign", seed=11)
    with torch.random.fork_rng():
        torch.manual_seed(11)  # torchattacks draws its noise from the global RNG
        acc_ref = accuracy(model, ref(x, y), y)
    acc_ours = accuracy(model, ours(x, y), y)
    assert abs(acc_ref - acc_ours) <= 0.02


# ----------------------------------------------------------------------------- specific attacks


def test_l1_fgsm_divides_by_data_std(model, batch):
    x, y = batch
    x = 0.25 + 0.5 * x
    sigma = (0.5, 1.0, 2.0)
    adv = create_attack("l1_fgsm", model, eps=0.1, alpha=0.02, data_std=sigma)(x, y)
    reach = (adv - x).abs().amax(dim=(0, 2, 3))
    assert torch.allclose(reach, 0.02 / torch.tensor(sigma), atol=1e-6)


def test_l2_fgsm_step_is_inf_normalized(model, batch):
    x, y = batch
    x = 0.25 + 0.5 * x
    adv = create_attack("l2_fgsm", model, eps=0.1, alpha=0.01)(x, y)
    assert torch.allclose((adv - x).flatten(1).abs().amax(dim=1), torch.full((len(x),), 0.01), atol=1e-6)


def test_mixup_options(model, batch):
    x, y = batch
    atk = create_attack("mixup", model, eps=EPS, steps=2, lam_beta=1e-3, scale_exponents=[1, 2, 3, 4, 5])
    adv = atk(x, y)
    assert (adv - x).abs().max() <= EPS + TOL
    atk._gen = torch.Generator().manual_seed(0)
    partner = atk._mixing_partner(y)
    assert (y[partner] != y).all() and (partner != torch.arange(len(y))).all()
    assert torch.isfinite(create_attack("mixup", model, eps=EPS, steps=1)(x[:1], y[:1])).all()  # batch of one


# ----------------------------------------------------------------------------- registry, errors


def test_registry_lists_every_attack():
    assert {"fgsm", "pgd", "apgd", "l2_fgsm", "l1_fgsm", "jitter", "mixup"} <= set(ATTACKS)
    assert attack_options("pgd")["steps"] == 10 and attack_options("apgd")["steps"] == 20
    assert create_attack("pgd", nn.Identity(), eps=0.1).alpha == pytest.approx(0.025)


def test_registering_files_a_class_and_warns_when_another_takes_its_name(caplog):
    table: dict[str, type] = {}
    log = logging.getLogger("test.registry")
    first = registering(table, "a", "thing", log)(type("First", (), {}))
    assert table == {"a": first} and first.name == "a"
    with caplog.at_level(logging.WARNING, logger="test.registry"):
        registering(table, "a", "thing", log)(first)  # the same class again: nothing to say
        second = registering(table, "a", "thing", log)(type("Second", (), {}))
    assert table == {"a": second}
    assert [r.getMessage() for r in caplog.records] == [f"thing 'a' re-registered: {second} replaces {first}"]


def test_unknown_attack_lists_valid_names(model):
    with pytest.raises(UnknownNameError) as err:
        create_attack("pdg", model, eps=0.1)
    msg = str(err.value)
    assert "'pgd'" in msg and all(n in msg for n in ATTACKS)


@pytest.mark.parametrize(
    "options, word",
    [
        ({"stepz": 3}, "stepz"),
        ({"norm": "l3"}, "norm"),
        ({"steps": 0}, "steps"),
        ({"eps_unit": "mm"}, "eps_unit"),
    ],
)
def test_bad_options_raise_config_error(model, options, word):
    with pytest.raises(ConfigError, match=word):
        create_attack("pgd", model, eps=0.1, **options)


def test_negative_eps_raises(model):
    with pytest.raises(ConfigError, match="eps"):
        create_attack("fgsm", model, eps=-0.1)


@pytest.mark.parametrize("bad", ["int_images", "range", "3d", "float_labels", "batch"])
def test_input_checks(model, batch, bad):
    x, y = batch
    args = {
        "int_images": ((x * 255).to(torch.uint8), y),
        "range": (x * 2 - 0.5, y),
        "3d": (x[0], y),
        "float_labels": (x, y.float()),
        "batch": (x, y[:-1]),
    }[bad]
    with pytest.raises(ValueError):
        create_attack("fgsm", model, eps=0.1)(*args)
