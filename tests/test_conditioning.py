"""Conditioning alternatives beside β·R(S), and adversarial fine-tuning, in the same trainer:
the clamp bounds κ after every step, the nuclear norm's gradient is its subgradient and drives
small singular values down, adversarial steps train on images inside the ε-ball and [0, 1]."""

from __future__ import annotations

import pytest
import torch
from conftest import train_config
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compressor.factorize import factorize_
from compressor.layers import LowRankLinear, low_rank_layers
from compressor.recipe import AdversarialSection
from compressor.train import Trainer
from compressor.train.losses.nuclear import layer_nuclear_norm


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(96, 48), nn.ReLU(), nn.Linear(48, 4),
    )  # fmt: skip


def _loader(n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))


def _reseed(loader, epoch):
    loader.generator.manual_seed(10 + epoch)


def _factorized() -> nn.Module:
    model = _net()
    factorize_(model, init_rank=6, r_min=2, r_max=12, keep_first_conv=False)
    return model


def _kappa(layer, live: int | None = None) -> float:
    """κ of the largest ``live`` singular values of the core (all of them: None)."""
    s = torch.linalg.svdvals(layer.core_matrix().detach().double())
    return float(s[0] / s[(live or len(s)) - 1])


def test_clamp_keeps_every_core_within_the_bound_after_every_step_and_truncation():
    model = _factorized()
    trainer = Trainer(model, _loader(), train_config(2, lr=5e-2, tau=0.01, coefficient_steps=3, kappa_max=4.0),
                      set_epoch=_reseed)  # fmt: skip
    seen, candidates = [], []
    clamp = trainer._clamp_conditioning

    def spy():
        clamp()
        # inside a cycle: the bound on the directions each layer had before augmenting
        seen.append(max(_kappa(layer, trainer._live.get(name)) for name, layer in trainer.layers.items()))
        if trainer._live:
            candidates.append(max(_kappa(layer) for layer in trainer.layers.values()))

    trainer._clamp_conditioning = spy
    truncate = trainer._truncate
    after_truncation = []

    def spy_truncate(*args, **kwargs):
        truncate(*args, **kwargs)
        after_truncation.append(max(layer.condition_number() for layer in trainer.layers.values()))

    trainer._truncate = spy_truncate
    trainer.fit()
    assert len(seen) == trainer.global_step + len(after_truncation)  # after every step and every truncation
    assert max(seen + after_truncation) <= 4.0 * (1 + 1e-5), max(seen + after_truncation)
    assert max(layer.condition_number() for layer in trainer.layers.values()) <= 4.0 * (1 + 1e-5)
    assert max(candidates) > 4.0  # an augmentation's candidates are not raised to σ_max/κ_max
    free = Trainer(_factorized(), _loader(), train_config(2, lr=5e-2, tau=0.01, coefficient_steps=3), set_epoch=_reseed)
    free.fit()
    assert max(layer.condition_number() for layer in free.layers.values()) > 4.0  # the bound did bind


def test_clamp_of_an_augmented_core_floors_only_the_live_directions():
    layer = LowRankLinear.from_dense(nn.Linear(20, 16), 8, r_min=2, r_max=8)
    with torch.no_grad():
        p, _, qh = torch.linalg.svd(torch.randn(8, 8, dtype=torch.float64))
        layer.S.copy_((p * torch.tensor([10.0, 8, 1, 0.5, 0.01, 0.0, 0.0, 0.0], dtype=torch.float64)) @ qh)
    layer.clamp_condition_(4.0, live=4)
    after = torch.linalg.svdvals(layer.S.double())
    assert torch.allclose(after[:4], torch.tensor([10.0, 8, 2.5, 2.5], dtype=torch.float64), atol=1e-5)
    assert torch.allclose(after[4:], torch.tensor([0.01, 0, 0, 0], dtype=torch.float64), atol=1e-5)  # candidates


def test_clamp_changes_only_the_small_singular_values():
    layer = LowRankLinear.from_dense(nn.Linear(20, 16), 8, r_min=2, r_max=8)
    with torch.no_grad():
        p, _, qh = torch.linalg.svd(torch.randn(8, 8, dtype=torch.float64))
        layer.S.copy_((p * torch.tensor([10.0, 8, 6, 5, 1, 0.5, 0.1, 0.0], dtype=torch.float64)) @ qh)
    before = torch.linalg.svdvals(layer.S.double())
    layer.clamp_condition_(4.0)
    after = torch.linalg.svdvals(layer.S.double())
    assert torch.allclose(after[:4], before[:4], atol=1e-5)  # σ ≥ σ_max/4 stay
    assert torch.allclose(after[4:], torch.full((4,), 2.5, dtype=torch.float64), atol=1e-5)
    assert layer.condition_number() == pytest.approx(4.0, rel=1e-5)


def test_nuclear_norm_gradient_is_its_subgradient_and_shrinks_small_values_first():
    layer = LowRankLinear.from_dense(nn.Linear(12, 10), 6, r_min=2, r_max=6)
    with torch.no_grad():
        p, _, qh = torch.linalg.svd(torch.randn(6, 6))
        layer.S.copy_((p * torch.tensor([3.0, 2.0, 1.0, 0.3, 0.2, 0.1])) @ qh)
    layer.S.grad = None
    layer_nuclear_norm(layer).backward()
    p, s, qh = torch.linalg.svd(layer.S.detach().double())
    assert torch.allclose(layer.S.grad.double(), p @ qh, atol=1e-5)  # ∂‖S‖_* = P Qᵀ (all σ > 0)
    opt = torch.optim.SGD([layer.S], lr=0.05)
    for _ in range(4):  # each step lowers every σ by lr: the three small ones reach ~0 first
        opt.zero_grad()
        layer_nuclear_norm(layer).backward()
        opt.step()
    after = torch.linalg.svdvals(layer.S.detach().double())
    assert torch.allclose(after[:3], s[:3] - 0.2, atol=1e-4)
    assert float(after[3:].max()) < 0.11 and float(after[-1]) < 0.02


def test_nuclear_regularizer_lowers_the_cores_nuclear_norm_in_training():
    plain = Trainer(
        _factorized(), _loader(), train_config(2, lr=2e-2, tau=0.01, coefficient_steps=3), set_epoch=_reseed
    )
    nuc = Trainer(_factorized(), _loader(), train_config(2, lr=2e-2, tau=0.01, coefficient_steps=3, beta=0.5,
                                                         regularizer="nuclear"), set_epoch=_reseed)  # fmt: skip
    plain.fit()
    nuc.fit()
    total = lambda t: sum(float(layer_nuclear_norm(layer).detach()) for layer in t.layers.values())  # noqa: E731
    assert total(nuc) < 0.8 * total(plain), (total(nuc), total(plain))


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_adversarial_steps_train_on_images_in_the_eps_ball(attack):
    eps = 0.05
    model = _factorized()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.rand(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g))
    loader = DataLoader(data, batch_size=8)  # unshuffled: the i-th training forward sees batch i
    seen = []
    first = next(iter(low_rank_layers(model).values()))
    hook = first.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()) if m.training else None)
    cfg = train_config(1, lr=1e-2, coefficient_steps=2, adversarial=AdversarialSection(attack=attack, eps=eps, steps=3))
    Trainer(model, loader, cfg, set_epoch=lambda loader, epoch: None).fit()
    hook.remove()
    clean = [x for x, _ in loader]
    assert len(seen) == len(clean)  # one training forward per batch, on the adversarial images
    for x_adv, x in zip(seen, clean):
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
        assert 0 < float((x_adv - x).abs().max()) <= eps + 1e-6  # perturbed, inside the ℓ∞ ball
