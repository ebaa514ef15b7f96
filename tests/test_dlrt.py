"""RobustDLRT training (paper Appendix A; docs/dlrt.md §4): the cycle augment → coefficient
steps → truncate, as ``compressor.train.Trainer`` runs it.

Invariants: augmentation and τ = 0 truncation leave W and the loss unchanged; bases stay
orthonormal after every basis change; ranks stay in [r_min, r_max]; the optimizer never holds a
basis and its state follows the cores; an epoch never ends augmented; resume is exact; a
non-finite step is skipped. Headline: on real data (scikit-learn digits) β = 0.1 lowers the mean
κ of the cores ≥ 5× at the same clean accuracy.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import train_config
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compressor.factorize import factorize_
from compressor.layers import LowRankLayer, LowRankLinear, TuckerConv2d, low_rank_layers
from compressor.train import Trainer, clean_accuracy, dlrt
from compressor.train.common import guarded_step, remap_optimizer_state

ORTHO_TOL = 1e-5


# ----------------------------------------------------------------------------- fixtures


def tiny_cnn(seed: int = 0) -> nn.Module:
    """3×8×8 → 10 classes; after factorize_(r_max=4): one TuckerConv2d, one LowRankLinear."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),  # first conv: kept dense
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),  # → TuckerConv2d
        nn.Linear(64, 32),
        nn.ReLU(),  # → LowRankLinear
        nn.Linear(32, 10),  # classifier: kept dense
    )
    factorize_(model, init_rank=2, r_min=2, r_max=4, seed=seed)
    layers = low_rank_layers(model)
    assert sorted(type(l).__name__ for l in layers.values()) == ["LowRankLinear", "TuckerConv2d"]
    return model


def random_loader(n: int = 64, batch: int = 8, seed: int = 0) -> DataLoader:
    """Random but learnable: each class is a fixed random pattern plus noise."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    x = prototypes[y] + 0.5 * torch.randn(n, 3, 8, 8, generator=g)
    return DataLoader(
        TensorDataset(x, y), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )


def reseed(loader: DataLoader, epoch: int) -> None:
    """Batch order of epoch e is a pure function of e (what a resumed run needs)."""
    loader.generator.manual_seed(1000 + epoch)


def fit(model: nn.Module, loader: DataLoader | None = None, **cfg) -> Trainer:
    kw = dict(adaptive_epochs=2, lr=1e-2, tau=0.05, coefficient_steps=3, schedule="constant")
    kw.update(cfg)
    trainer = Trainer(model, loader or random_loader(), train_config(**kw), set_epoch=reseed)
    trainer.fit()
    return trainer


def assert_orthonormal(layer: LowRankLayer, tol: float = ORTHO_TOL) -> None:
    for basis in layer.bases():
        b = basis.detach().double()
        err = (b.mT @ b - torch.eye(b.shape[1], dtype=torch.float64)).abs().max()
        assert float(err) < tol, f"{type(layer).__name__} basis {tuple(b.shape)} off by {float(err):.2e}"


def dense_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: l.to_dense().weight.detach().clone() for n, l in low_rank_layers(model).items()}


def bounds_ok(layer: LowRankLayer) -> bool:
    if isinstance(layer, TuckerConv2d):
        r_out, r_in = layer.ranks
        return layer.r_min <= r_out <= layer.r_max_out and layer.r_min <= r_in <= layer.r_max_in
    return all(layer.r_min <= r <= layer.r_max for r in layer.ranks)


class Recorder:
    """Wraps every layer's augment_/truncate_ (public API) to check invariants after each call."""

    def __init__(self, model: nn.Module):
        self.events: list[tuple[str, str, tuple[int, ...]]] = []
        for name, layer in low_rank_layers(model).items():
            for kind in ("augment_", "truncate_"):
                setattr(layer, kind, self._wrap(name, layer, kind, getattr(layer, kind)))

    def _wrap(self, name, layer, kind, method):
        def wrapped(*args, **kwargs):
            change = method(*args, **kwargs)
            assert_orthonormal(layer)
            assert bounds_ok(layer), (name, kind, layer.ranks)
            self.events.append((name, kind, layer.ranks))
            return change

        return wrapped


def batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


# ----------------------------------------------------------------------------- the basis changes


def _backward_with_bases(model, x, y):
    layers = low_rank_layers(model)
    for layer in layers.values():
        layer.set_bases_trainable(True)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return layers


def test_augmentation_leaves_weights_and_loss_unchanged():
    model = tiny_cnn()
    model.eval()  # BatchNorm on running statistics: the loss is a function of the weights only
    x, y = next(iter(random_loader()))
    before_w, before_loss = dense_weights(model), batch_loss(model, x, y)
    layers = _backward_with_bases(model, x, y)
    for k, layer in enumerate(layers.values()):
        old = layer.ranks
        layer.augment_(seed=k)
        layer.set_bases_trainable(False)
        caps = (layer.r_max_out, layer.r_max_in) if isinstance(layer, TuckerConv2d) else (layer.r_max,)
        assert layer.ranks == tuple(min(2 * r, c) for r, c in zip(old, caps))
        assert_orthonormal(layer)
    for name, w in dense_weights(model).items():
        torch.testing.assert_close(w, before_w[name], rtol=0, atol=1e-6)
    assert math.isclose(batch_loss(model, x, y), before_loss, rel_tol=1e-6, abs_tol=1e-6)


@pytest.mark.parametrize("steps", [0, 5])
def test_truncation_with_tau_zero_leaves_weights_and_loss_unchanged(steps):
    """τ = 0 keeps every nonzero σ: right after augmentation the zero padding is dropped (rank back
    to r), after coefficient steps every direction is kept; W and the loss do not change."""
    model = tiny_cnn()
    model.eval()
    x, y = next(iter(random_loader()))
    layers = _backward_with_bases(model, x, y)
    old_ranks = {n: l.ranks for n, l in layers.items()}
    for k, layer in enumerate(layers.values()):
        layer.augment_(seed=k)
        layer.set_bases_trainable(False)
    opt = torch.optim.SGD([l.core for l in layers.values()], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    before_w, before_loss = dense_weights(model), batch_loss(model, x, y)
    aug_ranks = {n: l.ranks for n, l in layers.items()}
    for layer in layers.values():
        layer.truncate_(0.0)
        assert_orthonormal(layer)
    for name, w in dense_weights(model).items():
        torch.testing.assert_close(w, before_w[name], rtol=0, atol=1e-5)
    assert math.isclose(batch_loss(model, x, y), before_loss, rel_tol=1e-5, abs_tol=1e-5)
    for name, layer in layers.items():
        assert layer.ranks == (old_ranks[name] if steps == 0 else aug_ranks[name])


def test_remap_optimizer_state_follows_the_core():
    """Adam moments through augment (zero-padded, new directions get the mean second moment) and
    truncation (first moment = Pᵀ m Q, exactly the core's own map)."""
    model = tiny_cnn()
    x, y = next(iter(random_loader()))
    lin = next(l for l in low_rank_layers(model).values() if isinstance(l, LowRankLinear))
    opt = torch.optim.Adam([lin.S], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    m_old, v_old = opt.state[lin.S]["exp_avg"].clone(), opt.state[lin.S]["exp_avg_sq"].clone()
    r = lin.ranks[0]
    _backward_with_bases(model, x, y)
    old_shape = lin.S.shape
    change = lin.augment_(seed=0)
    lin.set_bases_trainable(False)
    remap_optimizer_state(opt, lin.S, change, old_shape)
    m, v = opt.state[lin.S]["exp_avg"], opt.state[lin.S]["exp_avg_sq"]
    assert m.shape == v.shape == lin.S.shape == (2 * r, 2 * r)
    assert torch.equal(m[:r, :r], m_old)  # zero padding: the old moments exactly (no √v round trip)
    assert float(m[r:].abs().max()) == 0.0 and float(m[:, r:].abs().max()) == 0.0
    assert torch.equal(v[:r, :r], v_old)
    torch.testing.assert_close(v[r:, r:], torch.full((r, r), float(v_old.mean())))

    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    m_aug = opt.state[lin.S]["exp_avg"].clone()
    old_shape = lin.S.shape
    change = lin.truncate_(0.3)
    remap_optimizer_state(opt, lin.S, change, old_shape)
    torch.testing.assert_close(opt.state[lin.S]["exp_avg"], change.left.mT @ m_aug @ change.right)
    assert opt.state[lin.S]["exp_avg_sq"].shape == lin.S.shape
    assert bool((opt.state[lin.S]["exp_avg_sq"] >= 0).all())


def test_remapped_second_moment_never_allows_a_runaway_adam_step():
    """A basis change whose mapped √v nearly cancels where m does not must not leave m̂/√v̂ ≫ 1
    (the step that blew a core up to non-finite values in a Fashion-MNIST run)."""
    from compressor.layers import BasisChange

    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.Adam([p], lr=1e-3)
    # √v = [1, 1 + 1e-6] and m = [1, -1] in the first row: the rotation below sends √v to
    # [≈√2, ≈0] (tiny, not zero: the mean-fill does not apply) and m to [0, √2]
    opt.state[p] = {
        "step": torch.tensor(100.0),
        "exp_avg": torch.tensor([[1.0, -1.0], [0.0, 0.0]]),
        "exp_avg_sq": torch.tensor([[1.0, (1 + 1e-6) ** 2], [0.0, 0.0]], dtype=torch.float32),
    }
    c = 2**-0.5
    right = torch.tensor([[c, c], [c, -c]])
    remap_optimizer_state(opt, p, BasisChange(torch.eye(2), right), (2, 2))
    m, v = opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]
    assert float(m[0, 1].abs()) > 1.0  # the first moment survives the map...
    b1, b2 = opt.param_groups[0]["betas"]
    ratio = (m / (1 - b1**100)).abs() / (v / (1 - b2**100)).sqrt().clamp_min(1e-30)
    assert float(ratio.max()) <= 10.0 + 1e-4  # ...but its step stays bounded


# ----------------------------------------------------------------------------- the Trainer


def test_many_cycles_keep_bases_orthonormal_and_ranks_in_bounds():
    model = tiny_cnn()
    rec = Recorder(model)  # checks orthonormality and bounds after *every* basis change
    trainer = fit(model, adaptive_epochs=4, coefficient_steps=2, tau=0.02)
    n_batches = len(trainer.train_loader)
    cycles = 4 * math.ceil(n_batches / 2)
    kinds = [k for _, k, _ in rec.events]
    assert kinds.count("augment_") == kinds.count("truncate_") == 2 * cycles  # two layers
    for layer in trainer.layers.values():
        assert_orthonormal(layer)
        assert not any(p.requires_grad for p in layer.bases())
    assert len(trainer.history.kappa_trace) == cycles
    for entry in trainer.history.kappa_trace:
        assert all(k >= 1.0 for k in entry["kappa"].values())
    for record in trainer.history.epochs:
        for name, info in record["layers"].items():
            layer = trainer.layers[name]
            assert all(layer.r_min <= r <= layer.r_max for r in info["ranks"])
            assert info["condition_number"] is None or info["condition_number"] >= 1.0
    assert all(math.isfinite(p.detach().abs().max().item()) for p in model.parameters())


def test_larger_tau_gives_smaller_or_equal_ranks():
    final = {}
    for tau in (0.0, 0.6):
        model = tiny_cnn()
        fit(model, tau=tau, adaptive_epochs=2)
        final[tau] = {n: l.ranks for n, l in low_rank_layers(model).items()}
    for name in final[0.0]:
        assert all(a <= b for a, b in zip(final[0.6][name], final[0.0][name])), final
    assert sum(map(sum, final[0.6].values())) < sum(map(sum, final[0.0].values())), final


@pytest.mark.parametrize(
    "optimizer,keys",
    [("adam", ("exp_avg", "exp_avg_sq")), ("adamw", ("exp_avg", "exp_avg_sq")), ("sgd", ("momentum_buffer",))],
)
def test_optimizer_holds_cores_not_bases_and_its_state_follows_them(optimizer, keys):
    model = tiny_cnn()
    trainer = fit(
        model,
        optimizer=optimizer,
        lr=5e-3 if optimizer != "sgd" else 5e-2,
        weight_decay=1e-2 if optimizer == "adamw" else 0.0,
        adaptive_epochs=3,
        tau=0.02,
    )
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    bases = {id(p) for l in trainer.layers.values() for p in l.bases()}
    assert not held & bases
    assert {id(l.core) for l in trainer.layers.values()} <= held
    assert not any(id(p) in bases for p in trainer.optimizer.state)
    for layer in trainer.layers.values():
        state = trainer.optimizer.state[layer.core]
        for key in keys:
            assert state[key].shape == layer.core.shape, (key, state[key].shape, layer.core.shape)
            # the fused Adam kernels walk parameter, gradient and moments as flat memory: a moment
            # laid out otherwise than its core (e.g. NCHW against channels-last) is updated wrongly
            # without an error (measured), so every remapped state keeps the core's strides
            assert state[key].stride() == layer.core.stride(), key
            assert bool(torch.isfinite(state[key]).all())
        assert_orthonormal(layer)
    losses = [e["train_loss"] for e in trainer.history.epochs]
    assert losses[-1] < losses[0]  # it trains


def test_tall_bases_are_refactored_at_every_few_truncations_of_the_run(monkeypatch):
    """truncate_(reorthonormalize_bases=...) is True at every REORTHONORMALIZE_EVERY-th
    truncation of the run (counted across epochs), False otherwise; bases stay orthonormal."""
    monkeypatch.setattr(dlrt, "REORTHONORMALIZE_EVERY", 3)
    model = tiny_cnn()
    rec = Recorder(model)  # orthonormality after every change, refactored or not
    flags: list[bool] = []
    layer = next(iter(low_rank_layers(model).values()))
    inner = layer.truncate_

    def spy(tau, *, reorthonormalize_bases=True, **kwargs):
        flags.append(reorthonormalize_bases)
        return inner(tau, reorthonormalize_bases=reorthonormalize_bases, **kwargs)

    monkeypatch.setattr(layer, "truncate_", spy)
    loader = random_loader(n=8 * 15)  # 15 batches, s* 2: truncations at batches 1, 3, ..., 13 and 14
    fit(model, loader, adaptive_epochs=2, coefficient_steps=2)
    assert flags == [i % 3 == 2 for i in range(16)]  # the 3rd, 6th, ... of the run's 16 truncations
    assert len([e for e in rec.events if e[1] == "truncate_"]) == 2 * 2 * 8


def test_an_epoch_never_ends_augmented():
    """s* larger than the epoch: one augmentation per epoch, truncated by the epoch's last batch."""
    model = tiny_cnn()
    rec = Recorder(model)
    trainer = fit(model, coefficient_steps=100, adaptive_epochs=2, tau=0.0)
    n_batches = len(trainer.train_loader)
    assert n_batches < 100
    per_layer: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for name, kind, ranks in rec.events:
        per_layer.setdefault(name, []).append((kind, ranks))
    for name, events in per_layer.items():
        assert [k for k, _ in events] == ["augment_", "truncate_"] * 2  # one cycle per epoch
        for epoch, record in enumerate(trainer.history.epochs):
            assert tuple(record["layers"][name]["ranks"]) == events[2 * epoch + 1][1]  # the truncated ranks
    assert [e["step"] for e in trainer.history.kappa_trace] == [n_batches - 1, 2 * n_batches - 1]


def test_a_model_with_nhwc_factorized_convs_is_fed_nhwc_and_trains_the_same():
    seen = []

    def record_layout(module, args):
        seen.append(args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous())

    runs = {}
    for nhwc in (True, False):
        model = tiny_cnn()
        model.register_forward_pre_hook(record_layout)
        trainer = Trainer(
            model,
            random_loader(),
            train_config(adaptive_epochs=1, lr=1e-2, tau=0.05, coefficient_steps=3, schedule="constant"),
            set_epoch=reseed,
        )
        assert trainer.channels_last_input  # TuckerConv2d runs NHWC by default
        trainer.channels_last_input = nhwc
        seen.clear()
        trainer.fit()
        assert set(seen) == {nhwc}
        model.eval()
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
        runs[nhwc] = (trainer.history.epochs[0]["train_loss"], model(x))
    # the layout changes only round-off (not the parameters themselves: Adam turns the round-off
    # of the first conv's bias gradient, which BatchNorm cancels, into full-size steps)
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=1e-4, atol=1e-4)

    nchw = tiny_cnn()
    for layer in low_rank_layers(nchw).values():
        if isinstance(layer, TuckerConv2d):
            layer.channels_last = False
    assert not Trainer(nchw, random_loader(), train_config(), set_epoch=reseed).channels_last_input


def test_without_factorized_layers_the_loop_is_plain_training():
    def net():
        torch.manual_seed(3)
        return nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.ReLU(), nn.Linear(16, 10))

    loader = random_loader()
    a = net()
    trainer = Trainer(
        a, loader, train_config(adaptive_epochs=2, beta=0.1, lr=1e-2, schedule="cosine"), set_epoch=reseed
    )
    history = trainer.fit()
    assert trainer.layers == {} and history.kappa_trace == [] and history.nonfinite_steps == 0
    assert {e["regularizer"] for e in history.epochs} == {0.0}

    b = net()
    opt = torch.optim.Adam(b.parameters(), lr=1e-2)
    total = 2 * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    for epoch in range(2):
        reseed(loader, epoch)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(b(x), y).backward()
            opt.step()
            sched.step()
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


@pytest.mark.parametrize("val_every, scored", [(1, [1, 2, 3, 4, 5]), (2, [2, 4, 5]), (5, [5]), (0, [])])
def test_val_every_scores_the_chosen_epochs_and_the_last(val_every, scored):
    model = tiny_cnn()
    val = random_loader(n=32, seed=5)
    trainer = Trainer(
        model,
        random_loader(),
        train_config(adaptive_epochs=2, fixed_epochs=3, lr=1e-2, coefficient_steps=3, val_every=val_every),
        val_loader=val,
        set_epoch=reseed,
    )
    history = trainer.fit()
    got = [e["epoch"] for e in history.epochs if e["val_accuracy"] is not None]
    assert got == scored
    if scored:  # the figure is the model's accuracy on the validation set after that epoch
        assert history.epochs[-1]["val_accuracy"] == clean_accuracy(model, val, "cpu")


def test_validation_leaves_training_unchanged():
    """Scoring the validation set draws nothing from the global RNG (a DataLoader takes its
    base seed there): the dropout masks, hence the trained weights, are the same with or
    without validation."""

    def run(val_every: int) -> dict[str, torch.Tensor]:
        model = tiny_cnn()
        model.insert(len(model) - 1, nn.Dropout(0.3))  # random masks from the global RNG
        torch.manual_seed(1)
        Trainer(
            model,
            random_loader(),
            train_config(adaptive_epochs=2, fixed_epochs=1, lr=1e-2, coefficient_steps=3, val_every=val_every),
            val_loader=DataLoader(random_loader(n=32, seed=5).dataset, batch_size=8),  # no generator of its own
            set_epoch=reseed,
        ).fit()
        return model.state_dict()

    a, b = run(1), run(0)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_cosine_schedule_ends_near_zero():
    model = tiny_cnn()
    trainer = fit(model, schedule="cosine", lr=1e-2, adaptive_epochs=2, fixed_epochs=1)
    lrs = [e["lr"] for e in trainer.history.epochs]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 1e-2
    assert trainer.optimizer.param_groups[0]["lr"] < 1e-8
    assert [e["phase"] for e in trainer.history.epochs] == ["rank-adaptive", "rank-adaptive", "fixed-rank"]


def test_gradient_clipping_bounds_the_update():
    """SGD (no momentum), lr 1, clip 0.01: one step moves the trainable parameters by ≤ 0.01."""
    model = tiny_cnn()
    loader = random_loader(n=8, batch=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(
        model,
        loader,
        train_config(
            adaptive_epochs=0,
            fixed_epochs=1,
            optimizer="sgd",
            lr=1.0,
            momentum=0.0,
            grad_clip=0.01,
            schedule="constant",
        ),
        set_epoch=reseed,
    )
    trainer.fit()
    moved = torch.sqrt(sum(((p.detach() - before[n]) ** 2).sum() for n, p in model.named_parameters()))
    assert 0.0 < float(moved) <= 0.01 * (1 + 1e-4)
    # and the rank-adaptive loop with clipping runs
    fit(tiny_cnn(), grad_clip=0.5, adaptive_epochs=1)


@pytest.mark.parametrize("clip", [None, 0.5, 1e3])
def test_guarded_step_clips_like_clip_grad_norm(clip):
    """The guard rescales exactly as torch's clip_grad_norm_ when the norm exceeds the clip, and
    leaves the gradients untouched (bit for bit) when it does not or when there is no clip."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7))]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    norm = float(torch.sqrt(sum((p.grad**2).sum() for p in params)))
    assert norm > 0.5 and norm < 1e3
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(copies, clip)
    reference = [c.grad for c in copies]
    seen = []
    opt = torch.optim.SGD(params, lr=0.0)
    opt.step = lambda: seen.append([p.grad.clone() for p in params])  # record what the optimizer gets
    assert guarded_step(params, opt, clip, torch.tensor(1.0))
    for got, want in zip(seen[0], reference):
        assert torch.equal(got, want) if clip is None or norm <= clip else torch.allclose(got, want, rtol=1e-6)
    if clip is not None and norm > clip:
        assert float(torch.sqrt(sum((g**2).sum() for g in seen[0]))) == pytest.approx(clip, rel=1e-5)
    # a non-finite gradient: no step, gradients dropped
    params[1].grad = torch.full_like(params[1], float("nan"))
    params[0].grad = torch.ones_like(params[0])
    assert not guarded_step(params, opt, clip, torch.tensor(1.0)) and len(seen) == 1
    assert all(p.grad is None for p in params)


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    cfg = dict(adaptive_epochs=2, lr=1e-2, tau=0.05, coefficient_steps=3, schedule="cosine", beta=0.05)
    # 3 truncations an epoch; re-factoring at every 2nd of the run puts one on each side of the resume
    monkeypatch.setattr(dlrt, "REORTHONORMALIZE_EVERY", 2)
    exact_flags: list[bool] = []
    truncate = Trainer._truncate

    def spy(self, exact=True, **kwargs):
        exact_flags.append(exact)
        truncate(self, exact=exact, **kwargs)

    monkeypatch.setattr(Trainer, "_truncate", spy)

    full = tiny_cnn()
    Trainer(full, random_loader(), train_config(**cfg), set_epoch=reseed, checkpoint_path=tmp_path / "a.pt").fit()
    assert exact_flags == [False, True, False, True, False, True]

    class Crash(Exception):
        pass

    def crash_at_epoch_1(loader, epoch):
        if epoch == 1:
            raise Crash
        reseed(loader, epoch)

    torch.manual_seed(123)  # the crashed process's RNG is not the resumed one's
    first = tiny_cnn()
    with pytest.raises(Crash):
        Trainer(
            first, random_loader(), train_config(**cfg), set_epoch=crash_at_epoch_1, checkpoint_path=tmp_path / "b.pt"
        ).fit()
    assert (tmp_path / "b.pt").is_file()

    torch.manual_seed(999)
    resumed = tiny_cnn(seed=7)  # other initial weights: everything must come from the checkpoint
    trainer = Trainer(
        resumed, random_loader(), train_config(**cfg), set_epoch=reseed, checkpoint_path=tmp_path / "b.pt"
    )
    exact_flags.clear()
    history = trainer.fit(resume=True)
    assert [e["epoch"] for e in history.epochs] == [1, 2]
    assert exact_flags == [True, False, True]  # the uninterrupted run's second epoch
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("bad_step", [3, 4], ids=["augmentation_step", "coefficient_step"])
def test_nonfinite_loss_step_is_skipped(bad_step, monkeypatch):
    """s* = 3: step 3 is the augmentation batch of the second cycle, step 4 a coefficient step."""
    calls = {"n": 0}

    def loss_fn(logits, y):
        loss = F.cross_entropy(logits, y)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == bad_step + 1 else loss

    model = tiny_cnn()
    rec = Recorder(model)
    trainer = Trainer(
        model,
        random_loader(),
        train_config(adaptive_epochs=2, lr=1e-2, tau=0.05, coefficient_steps=3, schedule="constant"),
        loss_fn=loss_fn,
        set_epoch=reseed,
    )
    taken: list[bool] = []

    def recording_step(*a, **k):
        taken.append(guarded_step(*a, **k))
        return taken[-1]

    monkeypatch.setattr(dlrt, "guarded_step", recording_step)
    history = trainer.fit()
    total = 2 * len(trainer.train_loader)
    assert history.nonfinite_steps == 1
    assert history.epochs[-1]["nonfinite_steps_total"] == 1
    assert len(taken) == total and not taken[bad_step] and sum(taken) == total - 1
    n_aug = sum(1 for _, k, _ in rec.events if k == "augment_")
    cycles = 2 * math.ceil(len(trainer.train_loader) / 3)
    assert n_aug == 2 * (cycles - (1 if bad_step == 3 else 0))  # no augmentation from NaN directions
    for p in model.parameters():
        assert bool(torch.isfinite(p).all())
    for state in trainer.optimizer.state.values():
        assert all(bool(torch.isfinite(v).all()) for v in state.values() if torch.is_tensor(v))
    for layer in trainer.layers.values():
        assert_orthonormal(layer)
    assert all(math.isfinite(e["train_loss"]) for e in history.epochs)


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e30], ids=["inf", "nan", "overflowing_norm"])
def test_nonfinite_basis_gradient_skips_only_the_augmentation(bad, monkeypatch, caplog):
    """A finite loss whose basis gradient is not usable: the step is taken, that augmentation is
    skipped (a warning says so), bases stay orthonormal. 1e30 is finite but its norm overflows
    float32: such a direction is treated as unusable too."""
    model = tiny_cnn()
    rec = Recorder(model)
    trainer = Trainer(
        model,
        random_loader(),
        train_config(adaptive_epochs=1, lr=1e-2, tau=0.05, coefficient_steps=3, schedule="constant"),
        set_epoch=reseed,
    )
    first = next(iter(trainer.layers.values()))
    original = dlrt.Trainer._forward_backward

    def poisoned(self, x, y):
        out = original(self, x, y)
        if self.global_step == 3:  # the second cycle's augmentation batch
            first.bases()[0].grad[0, 0] = bad
        return out

    monkeypatch.setattr(dlrt.Trainer, "_forward_backward", poisoned)
    with caplog.at_level("WARNING", logger="compressor.train.dlrt"):
        history = trainer.fit()
    cycles = math.ceil(len(trainer.train_loader) / 3)
    n_aug = sum(1 for _, k, _ in rec.events if k == "augment_")
    assert n_aug == len(trainer.layers) * (cycles - 1)
    assert history.nonfinite_steps == 0  # the coefficient step of that batch was taken
    assert any("non-finite basis gradient at step 3" in r.getMessage() for r in caplog.records)
    for layer in trainer.layers.values():
        assert_orthonormal(layer)
        assert all(bool(torch.isfinite(b).all()) for b in layer.bases())


# ----------------------------------------------------------------------------- headline: κ on real data


def digits_loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div(16.0).unsqueeze(1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:1400], perm[1400:]
    train = DataLoader(
        TensorDataset(x[tr], y[tr]),
        batch_size=32,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    return train, DataLoader(TensorDataset(x[te], y[te]), batch_size=512)


def digits_cnn() -> nn.Sequential:
    w = 32
    return nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(w, w, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 4×4
        nn.Conv2d(w, w, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 2×2
        nn.Flatten(),
        nn.Linear(4 * w, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def digits_pretrained() -> dict[int, nn.Module]:
    """Briefly trained dense nets (2 epochs Adam), one per seed (init and split): the paper
    fine-tunes from trained weights."""
    nets = {}
    for seed in SEEDS:
        torch.manual_seed(seed)
        model = digits_cnn()
        train, _ = digits_loaders(seed)
        Trainer(
            model,
            train,
            train_config(adaptive_epochs=0, fixed_epochs=2, lr=1e-3, schedule="constant"),
            set_epoch=reseed,
        ).fit()
        nets[seed] = model
    return nets


def run_dlrt_on_digits(pretrained: nn.Module, beta: float, optimizer: str, lr: float, seed: int = 0) -> dict:
    model = copy.deepcopy(pretrained)
    factorize_(model, init_rank=8, r_min=2, r_max=16)  # 2 TuckerConv2d + 1 LowRankLinear
    train, test = digits_loaders(seed)
    torch.manual_seed(seed)
    # 5 rank-adaptive epochs + 1 fixed-rank epoch (cores only) = 258 steps, constant lr. A
    # direction that an augmentation admits starts near 0 (∇R ∝ its σ, so R grows it only
    # geometrically) and needs steps at a useful lr to reach α: with a cosine schedule, one
    # admitted late stays small.
    cfg = train_config(
        adaptive_epochs=5,
        fixed_epochs=1,
        optimizer=optimizer,
        lr=lr,
        momentum=0.9,
        beta=beta,
        tau=0.01,
        coefficient_steps=10,
        schedule="constant",
    )
    trainer = Trainer(model, train, cfg, set_epoch=reseed)
    history = trainer.fit()
    kappas = {n: l.condition_number() for n, l in trainer.layers.items()}
    return {
        "acc": clean_accuracy(model, test, torch.device("cpu")),
        "kappas": kappas,
        "mean_kappa": sum(kappas.values()) / len(kappas),
        "history": history,
        "trainer": trainer,
    }


def _plain_and_robust(pretrained: dict[int, nn.Module], optimizer: str, lr: float) -> list[tuple[dict, dict]]:
    return [
        (run_dlrt_on_digits(net, 0.0, optimizer, lr, seed), run_dlrt_on_digits(net, 0.1, optimizer, lr, seed))
        for seed, net in pretrained.items()
    ]


def test_regularizer_lowers_condition_numbers_on_digits(digits_pretrained):
    """Regime: fine-tuning from briefly trained weights (the paper's setting), rank-adaptive from
    rank 8 (r_max 16), a small τ = 0.01 so that small singular values survive truncation, SGD +
    momentum 0.9 at a constant lr, 258 steps, the last epoch at fixed rank; 3 seeds (init and
    split). Plain DLRT ends ill-conditioned (κ̄ ≈ 9-70, the LowRankLinear up to ~90); β = 0.1
    drives the cores to κ ≈ 1.0-1.3 (a late-admitted direction can leave one core at 2-8 on
    some seeds and CPUs) at no cost in clean accuracy.

    Every figure is a mean over the seeds, with margins that hold on other processors: a single
    run is chaotic (float rounding that differs between CPUs, thread counts and instruction
    sets changes which directions augmentation admits), so one seed's accuracy moves by several
    points between machines; the spread across thread counts and instruction sets, and the
    margins it leaves, are in docs/reliability.md. (With Adam the regularizer's push on a small
    singular value, β·2α²σ/R, is divided by √v, which the loss gradient's noise dominates: in this short regime κ̄ falls
    by a few times on most seeds, not reliably 5×; see docs/dlrt.md.)"""
    runs = _plain_and_robust(digits_pretrained, "sgd", 0.05)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    plain_k, robust_k = mean([p["mean_kappa"] for p, _ in runs]), mean([r["mean_kappa"] for _, r in runs])
    detail = [(p["kappas"], r["kappas"]) for p, r in runs]
    assert plain_k > 5.0, detail  # plain DLRT is ill-conditioned here
    assert robust_k * 5 <= plain_k, detail  # the headline: ≥ 5× lower on average
    assert robust_k < 2.0, detail
    plain_acc, robust_acc = mean([p["acc"] for p, _ in runs]), mean([r["acc"] for _, r in runs])
    accs = [(p["acc"], r["acc"]) for p, r in runs]
    assert robust_acc >= plain_acc - 0.02, accs  # β costs no accuracy, on average over seeds
    dense_acc = mean(
        [clean_accuracy(net, digits_loaders(seed)[1], torch.device("cpu")) for seed, net in digits_pretrained.items()]
    )
    assert min(plain_acc, robust_acc) >= dense_acc - 0.02, (dense_acc, accs)  # fine-tuning did not lose accuracy
    for plain, robust in runs:
        assert len(plain["kappas"]) == 3 and plain["history"].kappa_trace
        assert min(plain["acc"], robust["acc"]) > 0.8, accs  # no run broke (chance is 0.1)
        for layer in robust["trainer"].layers.values():
            assert_orthonormal(layer)
    # the trace goes down: κ̄ after the last truncation well below κ̄ after the first
    first = mean([mean(list(r["history"].kappa_trace[0]["kappa"].values())) for _, r in runs])
    last = mean([mean(list(r["history"].kappa_trace[-1]["kappa"].values())) for _, r in runs])
    assert last < 0.1 * first, (first, last)
