"""evaluate(), evaluate_onnx() and report.plot_accuracy_vs_eps() on a tiny CNN and a synthetic task."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from compressor.attacks import list_attacks
from compressor.errors import ConfigError, DataError, UnknownNameError, WeightsError
from compressor.evaluate import EvalResult, evaluate, evaluate_onnx
from compressor.recipe import AttackSpec, EvaluateSection
from compressor.report import plot_accuracy_vs_eps

FAST = {"pgd": {"steps": 3}, "apgd": {"steps": 4}, "jitter": {"steps": 2}, "mixup": {"steps": 1}}


def synthetic(n: int, seed: int, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(k, 3, 8, 8, generator=torch.Generator().manual_seed(123)) * 0.6 + 0.2
    y = torch.randint(0, k, (n,), generator=g)
    return (templates[y] + 0.15 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 1), y


def tiny_cnn(k: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, k),
    )


@pytest.fixture(scope="module")
def model() -> nn.Module:
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = tiny_cnn()
        x, y = synthetic(1024, seed=1)
        params = list(net.parameters())
        bufs = [torch.zeros_like(p) for p in params]
        for _ in range(60):  # SGD with momentum by hand: fast, no torch.optim start-up cost
            idx = torch.randint(0, len(x), (64,))
            grads = torch.autograd.grad(F.cross_entropy(net(x[idx]), y[idx]), params)
            with torch.no_grad():
                for p, g, b in zip(params, grads, bufs):
                    p.sub_(0.05 * b.mul_(0.9).add_(g))
    yield net.eval()
    torch.set_num_threads(n_threads)


@pytest.fixture(scope="module")
def loader() -> DataLoader:
    return DataLoader(TensorDataset(*synthetic(150, seed=2)), batch_size=32, shuffle=False)


def specs(eps: list[float]) -> list[dict]:
    return [{"name": n, "eps": eps, "options": FAST.get(n, {})} for n in list_attacks()]


def test_eps_zero_gives_clean_accuracy(model, loader):
    r = evaluate(model, loader, attacks=specs([0.0, 0.1]), max_samples=70)
    assert r.n_clean == 150 and r.n_attacked == 70
    x, y = loader.dataset.tensors
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert r.clean_accuracy == pytest.approx((pred == y).float().mean().item())
    assert r.clean_accuracy_attacked == pytest.approx((pred[:70] == y[:70]).float().mean().item())
    for name in list_attacks():
        assert r.adversarial_accuracy[name]["0.0"] == pytest.approx(r.clean_accuracy_attacked)
        assert r.adversarial_accuracy[name]["0.1"] <= r.clean_accuracy_attacked
        assert r.sensitivity[name]["0.0"] is None  # δ = 0 everywhere: skipped
        s = r.sensitivity[name]["0.1"]
        assert s is not None and s > 0
    assert r.worst_case_accuracy["0.0"] == pytest.approx(r.clean_accuracy_attacked)


def test_worst_case_is_below_every_attack_and_monotone(model, loader):
    r = evaluate(model, loader, attacks=specs([0.02, 0.05]), max_samples=64)
    for e in ("0.02", "0.05"):
        below = [a[k] for a in r.adversarial_accuracy.values() for k in a if float(k) <= float(e)]
        assert r.worst_case_accuracy[e] <= min(below)
    assert r.worst_case_accuracy["0.05"] <= r.worst_case_accuracy["0.02"] <= r.clean_accuracy_attacked


def test_result_is_json_deterministic_and_reports_progress(model, loader):
    seen: list[int] = []
    attacks = [
        AttackSpec(name="pgd", eps=[0.05], options={"steps": 2}),
        {"name": "pgd", "eps": [0.5], "options": {"norm": "l2", "steps": 2}},
    ]
    a = evaluate(model, loader, attacks=attacks, max_samples=40, seed=3, progress=seen.append)
    b = evaluate(model, loader, attacks=attacks, max_samples=40, seed=3)
    assert sum(seen) == 150
    assert set(a.adversarial_accuracy) == {"pgd", "pgd#2"}  # duplicate names get a suffix
    assert a.adversarial_accuracy == b.adversarial_accuracy and a.sensitivity == b.sensitivity
    d = json.loads(json.dumps(a.to_dict()))
    assert d["settings"]["attacks"][1]["options"]["norm"] == "l2" and "attack_seconds" in d["timing"]


def test_the_section_and_its_keyword_shortcuts_agree(model, loader):
    """evaluate() takes the recipe's evaluate section; keywords change its keys, validated as
    recipe keys, and what is not given is the recipe's default."""
    section = EvaluateSection(attacks=[AttackSpec(name="fgsm", eps=[0.05])], max_samples=32, seed=2)
    a = evaluate(model, loader, section)
    b = evaluate(model, loader, attacks=[{"name": "fgsm", "eps": [0.05]}], max_samples=32, seed=2)
    assert a.adversarial_accuracy == b.adversarial_accuracy and a.settings == b.settings and a.n_attacked == 32
    assert evaluate(model, loader, section, max_samples=64).n_attacked == 64  # one key changed, the rest kept
    assert evaluate(model, loader, attacks=[]).settings["max_samples"] == EvaluateSection().max_samples
    with pytest.raises(ConfigError, match="evaluate.eps_unit"):
        evaluate(model, _Exploding(), attacks=[], eps_unit="pixels")
    with pytest.raises(ConfigError, match="EvaluateSection"):  # attacks go by keyword, not in the section's place
        evaluate(model, _Exploding(), [{"name": "fgsm", "eps": [0.1]}])


def test_mode_restored_and_no_grads(model, loader):
    model.train()
    try:
        evaluate(model, loader, attacks=[{"name": "fgsm", "eps": [0.1]}], max_samples=32)
        assert all(m.training for m in model.modules())
    finally:
        model.eval()
    assert all(p.grad is None for p in model.parameters())


class _Exploding:
    def __iter__(self):
        raise AssertionError("the loader must not be read before the attacks are validated")


def test_bad_specs_fail_before_any_work(model):
    with pytest.raises(UnknownNameError, match="pgd"):
        evaluate(model, _Exploding(), attacks=[{"name": "pdg", "eps": [0.1]}])
    with pytest.raises(ConfigError, match="stepz"):
        evaluate(model, _Exploding(), attacks=[{"name": "pgd", "eps": [0.1], "options": {"stepz": 1}}])
    with pytest.raises(ConfigError, match="max_samples"):
        evaluate(model, _Exploding(), attacks=[], max_samples=0)


def test_empty_loader_raises(model):
    with pytest.raises(DataError):
        evaluate(model, [], attacks=[{"name": "fgsm", "eps": [0.1]}])


def test_plot_accuracy_vs_eps(model, loader, tmp_path):
    r = evaluate(model, loader, attacks=[{"name": "fgsm", "eps": [0.02, 0.1]}], max_samples=32)
    out = plot_accuracy_vs_eps(
        {"dense": r, "compressed": EvalResult(**r.__dict__).to_dict()}, tmp_path / "p" / "acc.png"
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _export(model: nn.Module, path, batch: int | None) -> None:
    x = torch.rand(batch or 2, 3, 8, 8)
    kw = {} if batch else {"dynamic_axes": {"x": {0: "batch"}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["logits"], dynamo=False, **kw)


@pytest.mark.parametrize("fixed_batch", [None, 8])
def test_evaluate_onnx(model, loader, tmp_path, fixed_batch):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "tiny.onnx"
    _export(model, path, fixed_batch)  # a fixed batch of 8 exercises the chunking path
    plain = evaluate_onnx(path, loader)
    ref = evaluate(model, loader, attacks=[])
    assert plain.n_clean == 150 and plain.clean_accuracy == pytest.approx(ref.clean_accuracy)
    attacks = [{"name": "pgd", "eps": [0.03], "options": {"steps": 3}}]
    r = evaluate_onnx(path, loader, torch_model=model, attacks=attacks, max_samples=50, seed=1)
    assert r.agreement_clean == 1.0 and r.max_abs_logit_diff < 1e-3 and r.n_attacked == 50
    assert r.agreement_adversarial["pgd"]["0.03"] >= 0.98  # same function, ties aside
    assert r.transfer_accuracy["pgd"]["0.03"] == pytest.approx(r.torch_adversarial_accuracy["pgd"]["0.03"], abs=0.02)
    json.dumps(r.to_dict())


def test_evaluate_onnx_missing_file(loader, tmp_path):
    with pytest.raises(WeightsError):
        evaluate_onnx(tmp_path / "nope.onnx", loader)


class _CountingForward(nn.Module):
    """The model, counting its forward calls that build a graph (gradient passes)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.grad_passes = net, 0

    def forward(self, x):
        self.grad_passes += int(torch.is_grad_enabled() and x.requires_grad)
        return self.net(x)


@pytest.mark.parametrize("name, options", [("fgsm", {}), ("l1_fgsm", {}), ("l2_fgsm", {}), ("l2_fgsm", {"steps": 2})])
def test_fgsm_family_shares_one_clean_gradient_across_eps(model, loader, name, options):
    """All ε of one FGSM-type setting reuse the batch's gradient at the clean images: the same
    figures and adversarial images as one evaluation per ε, with one gradient pass per batch."""
    eps = [0.02, 0.05, 0.1]
    counted = _CountingForward(model)
    together = evaluate(
        counted, loader, attacks=[{"name": name, "eps": eps, "options": options}], max_samples=64, keep_adversarial=True
    )
    steps = options.get("steps", 1)
    n_batches = 2  # 64 attacked samples in batches of 32
    assert counted.grad_passes == n_batches * (1 + (steps - 1) * len(eps))
    for e in eps:
        alone = evaluate(
            model,
            loader,
            attacks=[{"name": name, "eps": [e], "options": options}],
            max_samples=64,
            keep_adversarial=True,
        )
        assert torch.equal(together.adversarial[(name, e)], alone.adversarial[(name, e)])
        assert together.adversarial_accuracy[name][str(e)] == alone.adversarial_accuracy[name][str(e)]


def test_clean_gradient_is_not_shared_across_settings_or_outside_evaluate(model, loader):
    """Two settings of one attack (other options) keep their own gradients; a direct call never
    reads a memo (another batch must not see this one's gradient)."""
    counted = _CountingForward(model)
    evaluate(
        counted,
        loader,
        attacks=[
            {"name": "l2_fgsm", "eps": [0.05, 0.1]},
            {"name": "l2_fgsm", "eps": [0.05], "options": {"alpha": 0.02}},
        ],
        max_samples=32,
    )
    assert counted.grad_passes == 2  # one per setting on the single attacked batch
    from compressor.attacks import create_attack

    attack = create_attack("l2_fgsm", counted, eps=0.1)
    x1, y1 = next(iter(loader))
    counted.grad_passes = 0
    attack(x1, y1), attack(x1.flip(0), y1.flip(0))
    assert counted.grad_passes == 2 and attack._clean_grad_memo is None
