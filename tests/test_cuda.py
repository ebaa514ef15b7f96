"""The CUDA path: a DLRT cycle, the spectral regularizer, the attacks, export from a CUDA model
and bf16 autocast, each on every device this machine has.

Each test runs on the CPU everywhere (so that it cannot rot) and on CUDA where there is a GPU
(``-m gpu`` selects those: ``bench/gpu_check.py`` runs them on the first GPU lent). Invariants:
whatever the device, bases stay orthonormal, ranks stay in [r_min, r_max], parameters stay on
the device and in float32 under bf16 autocast, R (paper Definition 1) is computed in float32,
adversarial images stay in [0, 1] and their ε-box, and an exported CUDA model reloads on the
CPU bit for bit and its ONNX graph computes what PyTorch computes. On CUDA, float64 runs
reproduce the CPU's figures (same seeds; the random draws are made on the CPU).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import train_config
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compressor.attacks import create_attack
from compressor.export import export_model, load_into
from compressor.factorize import factorize_
from compressor.functional import spectral_regularizer
from compressor.layers import LowRankLayer, low_rank_layers
from compressor.train import Trainer, clean_accuracy

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, CUDA])]
ONLY_CUDA = [pytest.mark.gpu, CUDA]


def dense_cnn(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """3×8×8 → 10 classes."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    ).to(dtype)


def tiny_cnn(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """dense_cnn factorized: one Tucker conv and one low-rank linear layer (first conv and head dense)."""
    model = dense_cnn(seed, dtype)
    factorize_(model, init_rank=2, r_min=2, r_max=4, seed=seed)
    return model


def loader(dtype: torch.dtype = torch.float32, n: int = 48, batch: int = 8) -> DataLoader:
    """Learnable images in [0, 1]: a fixed pattern per class plus noise; fixed batch order."""
    g = torch.Generator().manual_seed(0)
    prototypes = torch.rand(10, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    x = (prototypes[y] + 0.2 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 1)
    return DataLoader(TensorDataset(x.to(dtype), y), batch_size=batch, shuffle=False)


def fit(model: nn.Module, device: str, dtype: torch.dtype = torch.float32, **cfg) -> list[float]:
    """One rank-adaptive epoch (two DLRT cycles of s* = 3 batches); returns the epochs' training losses."""
    # SGD, not Adam: a device's rounding-level gradient differences stay rounding-level
    keys = dict(optimizer="sgd", lr=5e-2, tau=0.05, coefficient_steps=3, schedule="constant", beta=0.075)
    trainer = Trainer(model, loader(dtype), train_config(1, **{**keys, **cfg}), device=device)
    return [e["train_loss"] for e in trainer.fit().to_dict()["epochs"]]


def products(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every low-rank layer as its dense weight (bases and cores are unique only up to signs)."""
    return {n: l.to_dense().weight.detach().double().cpu() for n, l in low_rank_layers(model).items()}


def assert_valid(layer: LowRankLayer, device: str) -> None:
    for basis in layer.bases():
        assert basis.device.type == device
        b = basis.detach().double()
        assert float((b.mT @ b - torch.eye(b.shape[1], dtype=b.dtype, device=b.device)).abs().max()) < 1e-4
    assert all(layer.r_min <= r for r in layer.ranks)


# ----------------------------------------------------------------------------- DLRT cycle


@pytest.mark.parametrize("device", DEVICES)
def test_dlrt_cycle_keeps_its_invariants(device):
    model = tiny_cnn()
    losses = fit(model, device)
    assert all(p.device.type == device and p.dtype == torch.float32 for p in model.parameters())
    for layer in low_rank_layers(model).values():
        assert_valid(layer, device)
    assert losses and all(np.isfinite(losses))


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=ONLY_CUDA)])
def test_dlrt_cycle_on_cuda_reproduces_the_cpu_in_float64(device):
    ref, model = tiny_cnn(dtype=torch.float64), tiny_cnn(dtype=torch.float64)
    fit(ref, "cpu", torch.float64)
    fit(model, device, torch.float64)
    a, b = products(ref), products(model)
    assert {n: l.ranks for n, l in low_rank_layers(ref).items()} == {
        n: l.ranks for n, l in low_rank_layers(model).items()
    }
    for name in a:
        assert torch.allclose(b[name], a[name], rtol=1e-6, atol=1e-9), name


# ----------------------------------------------------------------------------- regularizer


@pytest.mark.parametrize("device", DEVICES)
def test_regularizer_in_float32_under_bf16_autocast(device):
    s = torch.randn(6, 9, generator=torch.Generator().manual_seed(1)).to(device)
    ref = float(spectral_regularizer(s.double()))
    a = s.clone().requires_grad_(True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        r = spectral_regularizer(a)
        assert (a @ a.mT).dtype == torch.bfloat16  # autocast is on here
    assert r.dtype == torch.float32 and r.device.type == device
    r.backward()
    assert a.grad is not None and a.grad.dtype == torch.float32 and torch.isfinite(a.grad).all()
    assert abs(float(r.detach()) - ref) <= 1e-5 * ref


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=ONLY_CUDA)])
def test_regularizer_and_gradient_on_cuda_equal_the_cpu(device):
    s = torch.randn(7, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    values, grads = [], []
    for dev in ("cpu", device):
        a = s.to(dev).requires_grad_(True)
        r = spectral_regularizer(a)
        r.backward()
        values.append(float(r))
        grads.append(a.grad.cpu())
    assert abs(values[1] - values[0]) <= 1e-12 * values[0]
    assert torch.allclose(grads[1], grads[0], rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- attacks


ATTACKS = {"fgsm": {}, "l2_fgsm": {}, "jitter": {}, "pgd": {"steps": 3}}
EPS = 0.05


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    model = tiny_cnn()
    fit(model, "cpu")
    return model.eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_stays_in_its_box_on_the_device(device, name, trained):
    model = copy.deepcopy(trained).to(device)
    x, y = next(iter(loader()))
    x, y = x.to(device), y.to(device)
    adv = create_attack(name, model, eps=EPS, **ATTACKS[name])(x, y)
    assert adv.device.type == device and adv.shape == x.shape and adv.dtype == x.dtype
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() <= EPS + 1e-6


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=ONLY_CUDA)])
@pytest.mark.parametrize("name", ["fgsm", "l2_fgsm"])
def test_gradient_attack_on_cuda_matches_the_cpu(device, name, trained):
    x, y = next(iter(loader(torch.float64)))
    out = []
    for dev in ("cpu", device):
        model = copy.deepcopy(trained).double().to(dev)
        out.append(create_attack(name, model, eps=EPS)(x.to(dev), y.to(dev)).cpu())
    # a gradient component that is zero to rounding may change sign between devices: a few pixels
    assert float(((out[1] - out[0]).abs() > 1e-9).double().mean()) < 0.01


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("device", DEVICES)
def test_export_from_a_device_model_reloads_and_matches_onnx(device, tmp_path, trained):
    import onnxruntime as ort

    model = copy.deepcopy(trained).to(device)
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    export_model(model, tmp_path, input_size=8, onnx=True, int8=False, latency=False)
    loaded, _ = load_into(tmp_path / "model.safetensors", model=dense_cnn())
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k].cpu(), expected[k]) for k in expected)
    x, _ = next(iter(loader()))
    with torch.no_grad():
        want = loaded(x).numpy()
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.allclose(logits, want, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- bf16 autocast


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_trains_float32_parameters(device):
    model = tiny_cnn()
    losses = fit(model, device, amp="bf16")
    assert all(p.dtype == torch.float32 and p.device.type == device for p in model.parameters())
    for layer in low_rank_layers(model).values():
        assert_valid(layer, device)
    assert losses and all(np.isfinite(losses))
    acc = clean_accuracy(model, loader(), torch.device(device), "bf16")
    assert 0.0 <= acc <= 1.0
    with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16):
        assert model(next(iter(loader()))[0].to(device)).dtype == torch.bfloat16
