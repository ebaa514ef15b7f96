"""Compress to a budget: the allocation meets it, prefers cheap singular values, reduces to
τ-truncation when loose; the trainer reaches it gradually and ends within 2 % of it."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import train_config
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compressor.factorize import factorize_
from compressor.layers import low_rank_layers
from compressor.recipe import TargetSection
from compressor.runtime import compression_stats, count_macs
from compressor.train import Trainer
from compressor.train.budget import LayerOffer, allocate_ranks


def _decaying(n: int, rate: float) -> torch.Tensor:
    return torch.tensor([rate**i for i in range(n)], dtype=torch.float64)


def _linear_cost(per_rank: int):
    return lambda r: per_rank * r[0]


def test_allocation_meets_the_budget_tightly():
    offers = {
        "a": LayerOffer([_decaying(40, 0.9)], (40,), (1,), _linear_cost(10)),
        "b": LayerOffer([_decaying(30, 0.8)], (30,), (1,), _linear_cost(7)),
        "c": LayerOffer([_decaying(20, 0.95)], (20,), (1,), _linear_cost(13)),
    }
    for budget in (900.0, 500.0, 123.0):
        ranks = allocate_ranks(offers, budget, fixed_cost=50.0)
        total = 50.0 + sum(o.cost(ranks[n]) for n, o in offers.items())
        assert total <= budget
        cheapest_step = min(10, 7, 13)
        assert total + cheapest_step > budget - 13  # no room left for even one more direction (up to one step)
        assert all(1 <= ranks[n][0] <= offers[n].max_ranks[0] for n in offers)


def test_allocation_prefers_cheap_singular_values():
    same = _decaying(50, 0.93)
    offers = {"cheap": LayerOffer([same], (50,), (1,), _linear_cost(1)),
              "dear": LayerOffer([same], (50,), (1,), _linear_cost(10))}  # fmt: skip
    ranks = allocate_ranks(offers, budget=200.0)
    assert ranks["cheap"][0] > ranks["dear"][0]
    # at the optimum of energy per cost, a cheap direction kept is worth at most 10 dear ones' ratio
    assert 1 * ranks["cheap"][0] + 10 * ranks["dear"][0] <= 200


def test_allocation_is_tau_truncation_when_the_budget_is_loose():
    spectra = [_decaying(12, 0.6), _decaying(9, 0.7)]
    offers = {"a": LayerOffer([_decaying(10, 0.5)], (7,), (2,), _linear_cost(3)),
              "b": LayerOffer(spectra, (9, 6), (2, 2), lambda r: r[0] * r[1])}  # fmt: skip
    assert allocate_ranks(offers, budget=math.inf) == {"a": (7,), "b": (9, 6)}
    assert allocate_ranks(offers, budget=21 + 54) == {"a": (7,), "b": (9, 6)}  # exactly the τ ranks' cost


def test_allocation_with_tucker_modes_respects_minimum_ranks_and_budget():
    k = 9

    def tucker(r):  # c_in·r_in + r_out·r_in·k + c_out·r_out, the interplay of the two modes
        return 64 * r[1] + r[0] * r[1] * k + 64 * r[0]

    offers = {"conv": LayerOffer([_decaying(60, 0.9), _decaying(60, 0.7)], (60, 60), (4, 4), tucker),
              "fc": LayerOffer([_decaying(100, 0.97)], (100,), (4,), _linear_cost(300))}  # fmt: skip
    ranks = allocate_ranks(offers, budget=30_000)
    assert tucker(ranks["conv"]) + 300 * ranks["fc"][0] <= 30_000
    assert ranks["conv"][1] < ranks["conv"][0]  # the faster-decaying mode gives up more
    tiny = allocate_ranks(offers, budget=1.0)  # cannot be met: everything at its minimum
    assert tiny == {"conv": (4, 4), "fc": (4,)}


@pytest.mark.parametrize("multiple", [4, 8])
def test_allocation_rounds_ranks_to_a_multiple(multiple):
    def tucker(r):
        return 64 * r[1] + r[0] * r[1] * 9 + 64 * r[0]

    offers = {"conv": LayerOffer([_decaying(60, 0.9), _decaying(60, 0.8)], (60, 57), (2, 2), tucker),
              "fc": LayerOffer([_decaying(100, 0.97)], (99,), (2,), _linear_cost(300)),
              "tiny": LayerOffer([_decaying(5, 0.5)], (3,), (2,), _linear_cost(50))}  # fmt: skip
    loose = allocate_ranks(offers, math.inf, multiple=multiple)
    assert loose["conv"] == (60 // multiple * multiple, 57 // multiple * multiple)  # τ ranks rounded down
    assert loose["fc"] == (99 // multiple * multiple,) and loose["tiny"] == (3,)  # smaller than a step: kept
    for budget in (40_000.0, 25_000.0, 12_000.0):
        ranks = allocate_ranks(offers, budget, multiple=multiple)
        assert tucker(ranks["conv"]) + 300 * ranks["fc"][0] + 50 * ranks["tiny"][0] <= budget
        for name in ("conv", "fc"):
            assert all(r % multiple == 0 or r == 2 for r in ranks[name]), (name, ranks[name])
            assert all(2 <= r <= m for r, m in zip(ranks[name], offers[name].max_ranks, strict=True))
    with pytest.raises(ValueError, match="multiple"):
        allocate_ranks(offers, 1.0, multiple=0)


def test_trainer_with_a_rank_multiple_ends_on_multiples():
    model = _model()
    dense_macs = count_macs(model, 12)
    factorize_(model, init_rank=24, r_min=2, r_max=64, keep_classifier=True)
    target = TargetSection(macs=0.4, ramp=0.5, multiple=8)
    Trainer(model, _loader(), train_config(2, lr=1e-2, coefficient_steps=3, target=target), set_epoch=_reseed).fit()
    assert count_macs(model, 12) <= 0.4 * dense_macs
    for name, layer in low_rank_layers(model).items():
        assert all(r % 8 == 0 or r == layer.r_min for r in layer.ranks), (name, layer.ranks)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 48, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(48, 48, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(192, 96), nn.ReLU(), nn.Linear(96, 5),
    )  # fmt: skip


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(96, 3, 12, 12, generator=g), torch.randint(0, 5, (96,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))


def _reseed(loader, epoch):
    loader.generator.manual_seed(100 + epoch)


@pytest.mark.parametrize("kind, fraction", [("params", 0.3), ("macs", 0.35)])
def test_trainer_reaches_the_budget_gradually_and_within_two_percent(kind, fraction):
    model = _model()
    dense_params = sum(p.numel() for p in model.parameters())
    dense_macs = count_macs(model, 12)
    factorize_(model, init_rank=24, r_min=2, r_max=64, keep_classifier=True)
    cfg = train_config(3, lr=1e-2, tau=0.01, coefficient_steps=3, target=TargetSection(**{kind: fraction}, ramp=0.5))
    trainer = Trainer(model, _loader(), cfg, set_epoch=_reseed)
    costs = []
    original = trainer._truncate

    def spy(*args, **kwargs):
        original(*args, **kwargs)
        costs.append(compression_stats(model).params if kind == "params" else count_macs(model, 12))

    trainer._truncate = spy
    trainer.fit()
    dense = dense_params if kind == "params" else dense_macs
    final = costs[-1] / dense
    assert fraction * 0.98 <= final <= fraction * 1.0 + 1e-9, (final, fraction)
    first = costs[0] / dense
    assert first > fraction * 1.2, "the budget was reached in one cut, not gradually"
    ramp_end = len(costs) // 2
    assert all(c / dense <= fraction + 1e-9 for c in costs[ramp_end:])  # after the ramp it holds
    assert trainer.history.epochs[-1]["budget"]["reached_fraction"] == pytest.approx(final)
    for layer in low_rank_layers(model).values():
        assert all(r >= layer.r_min for r in layer.ranks)


def test_target_section_takes_one_budget():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        TargetSection(params=0.1, macs=0.2)
    assert TargetSection(macs=0.2).kind == "macs" and TargetSection().kind is None


@pytest.mark.parametrize("kind", ["params", "macs"])
def test_an_unreachable_target_is_refused_with_the_floor(kind):
    """Below the cost of every layer at its smallest rank the allocation can only wreck the model
    and still miss: the budget refuses it up front and names what is reachable."""
    from compressor.errors import ConfigError
    from compressor.train.budget import Budget

    model = _model()
    factorize_(model, init_rank=24, r_min=2, r_max=64, keep_classifier=True)
    lowest = {n: tuple(2 for _ in layer.rank_caps) for n, layer in low_rank_layers(model).items()}
    floor = Budget(model, kind, 0.99, input_size=12)
    reachable = floor.cost(lowest) / floor.dense
    assert 0 < reachable < 0.99
    Budget(model, kind, reachable * 1.01, input_size=12)  # just above the floor: accepted
    with pytest.raises(ConfigError, match=rf"out of reach.* {reachable:.2g} of the dense model") as err:
        Budget(model, kind, reachable * 0.95, input_size=12)
    assert err.value.floor == pytest.approx(reachable)
