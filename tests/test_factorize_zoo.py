"""Model surgery (factorize_) over the torchvision and timm zoos, and its policy.

For every model (random init, 10 classes, 32×32 inputs, eval mode):
(a) full-rank factorization leaves the output unchanged (float64, rel. error ≤ 1e-9);
(b) a truncated factorization (init_rank 8, r_max 16) has fewer parameters, runs forward and
    backward, and equals the dense model rebuilt from its factors (to_dense) — the surgery put
    every factor where its dense layer was.
Policy: first conv and classifier kept, include/exclude patterns, filter_fn, grouped and
reflect-padded convs, custom subclasses, nn.MultiheadAttention children, the no-saving rule,
and a report that lists every candidate with a reason.

Full rank never saves parameters, so (a) passes ``require_saving=False``. It factorizes the
layers with ≤ 600k weights (256×256×3×3 and smaller): full-rank SVDs of bigger ones (VGG's
4096×25088 classifier, ViT-B's 3072×768 MLPs) cost minutes on 2 cores and add nothing the
layer tests do not check; ViT-B gets the MLP of its last block explicitly.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from compressor.factorize import factorize_, project_attention_
from compressor.layers import LowRankLayer, LowRankLinear, ProjectedMultiheadAttention, TuckerConv2d, low_rank_layers

FULL_RANK_MAX_WEIGHTS = 600_000


@dataclass(frozen=True)
class Zoo:
    build: Callable[[], nn.Module]
    full_rank_include: list[str] = field(default_factory=list)  # layers of (a) beyond the size limit


ZOO: dict[str, Zoo] = {
    "tv:vgg11": Zoo(lambda: tvm.vgg11(num_classes=10)),
    "tv:vgg16": Zoo(lambda: tvm.vgg16(num_classes=10)),
    "tv:vgg16_bn": Zoo(lambda: tvm.vgg16_bn(num_classes=10)),
    "tv:resnet18": Zoo(lambda: tvm.resnet18(num_classes=10)),
    "tv:resnet50": Zoo(lambda: tvm.resnet50(num_classes=10)),
    "tv:mobilenet_v3_small": Zoo(lambda: tvm.mobilenet_v3_small(num_classes=10)),
    "tv:efficientnet_b0": Zoo(lambda: tvm.efficientnet_b0(num_classes=10)),
    "tv:convnext_tiny": Zoo(lambda: tvm.convnext_tiny(num_classes=10)),
    "tv:vit_b_16": Zoo(
        lambda: tvm.vit_b_16(num_classes=10, image_size=32), full_rank_include=["encoder.layers.encoder_layer_11.mlp.*"]
    ),
    "timm:vgg16": Zoo(lambda: timm.create_model("vgg16", num_classes=10)),
    "timm:resnet18": Zoo(lambda: timm.create_model("resnet18", num_classes=10)),
    "timm:efficientnet_b0": Zoo(lambda: timm.create_model("efficientnet_b0", num_classes=10)),
    "timm:mobilenetv3_small_100": Zoo(lambda: timm.create_model("mobilenetv3_small_100", num_classes=10)),
    "timm:convnext_atto": Zoo(lambda: timm.create_model("convnext_atto", num_classes=10)),
    "timm:vit_tiny_patch16_224": Zoo(lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32)),
}


@functools.lru_cache(maxsize=1)  # tests of one model run back to back: build it once
def _pristine(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = ZOO[name].build().eval()
    with torch.no_grad():
        for m in model.modules():
            # torchvision's ViT head starts at zero: the output would be 0 and no check could fail
            w = getattr(m, "weight", None)
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not w.any():
                w.normal_(0, 0.05)
    return model


def _input(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_report(model: nn.Module, report) -> None:
    """Every candidate appears once with a reason, and the model agrees with the report."""
    names = [d.name for d in report.layers]
    assert len(names) == len(set(names))
    assert all(d.reason for d in report.layers)
    table = report.table().splitlines()
    assert len(table) == len(report.layers) + 1
    for d, row in zip(report.layers, table[1:]):
        assert row.startswith(d.name) and d.reason in row
    modules = dict(model.named_modules())
    for d in report.layers:
        assert isinstance(modules[d.name], LowRankLayer) == d.factorized, d.name
        if d.factorized:
            assert list(modules[d.name].ranks) == d.ranks
    json.dumps(report.to_dict())


def _dense_copy(model: nn.Module) -> nn.Module:
    """``model`` with every factorized layer replaced by its to_dense()."""
    out = copy.deepcopy(model)
    for name, layer in low_rank_layers(out).items():
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, layer.to_dense())
    return out


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    _pristine.cache_clear()  # VGGs hold ~0.5 GB each


PARTS = ["full_rank", "truncated"]
VGG_LIKE = {"tv:vgg11", "tv:vgg16", "tv:vgg16_bn", "timm:vgg16"}
ZOO_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in VGG_LIKE else n for n in ZOO]


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("name", ZOO_PARAMS)  # innermost: one model at a time, built once
def test_zoo(name: str, part: str):
    pristine = _pristine(name)
    if part == "full_rank":
        _full_rank_exact(name, pristine)
    else:
        _truncated_runs(name, pristine)


def _full_rank_exact(name: str, pristine: nn.Module) -> None:
    dense = copy.deepcopy(pristine).double()
    model = copy.deepcopy(dense)
    include = ZOO[name].full_rank_include

    def small_or_included(module: nn.Module, layer: str) -> bool:
        return module.weight.numel() <= FULL_RANK_MAX_WEIGHTS or any(fnmatch.fnmatchcase(layer, p) for p in include)

    report = factorize_(model, init_rank=None, r_max=100_000, require_saving=False, filter_fn=small_or_included)
    _check_report(model, report)
    assert report.factorized, report.table()
    for d in report.factorized:  # really full rank: the Tucker/SVD rank bounds
        layer = model.get_submodule(d.name)
        full = (layer.r_max,) if isinstance(layer, LowRankLinear) else (layer.r_max_out, layer.r_max_in)
        assert tuple(d.ranks) == full
    x = _input(torch.float64)
    with torch.no_grad():
        y_ref, y = dense(x), model(x)
    assert y.shape == (2, 10)
    assert _rel(y, y_ref) <= 1e-9, report.table()


def _truncated_runs(name: str, pristine: nn.Module) -> None:
    model = copy.deepcopy(pristine)
    report = factorize_(model, init_rank=8, r_max=16)
    _check_report(model, report)
    assert report.factorized
    layers = low_rank_layers(model)
    assert all(max(m.ranks) <= 8 for m in layers.values())
    assert _n_params(model) < _n_params(pristine)
    assert sum(d.params_factorized for d in report.factorized) < sum(d.params_dense for d in report.factorized)
    x = _input(torch.float32)
    model.train()
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.arange(2)).backward()
    for layer in layers.values():
        assert layer.core.grad is not None and torch.isfinite(layer.core.grad).all()
        assert all(b.grad is None for b in layer.bases())  # bases are not trained
    model.eval()
    with torch.no_grad():
        y = model(x)
        y_dense = _dense_copy(model)(x)
    assert _rel(y, y_dense) <= 1e-4
    _model_specific(name, model, report)


def _model_specific(name: str, model: nn.Module, report) -> None:
    reasons = {d.name: d.reason for d in report.layers}
    if name == "timm:vgg16":
        # pre-logits ConvMlp: fc1 is a 7×7 conv on the 7×7 map it pools its input up to
        fc1 = model.pre_logits.fc1
        assert isinstance(fc1, TuckerConv2d) and fc1.kernel_size == (7, 7)
        assert isinstance(model.pre_logits.fc2, TuckerConv2d)
        assert "classifier" in reasons["head.fc"]
    if name == "timm:vit_tiny_patch16_224":
        qkv = model.blocks[0].attn.qkv  # fused q, k, v: one matrix, one shared input basis
        assert isinstance(qkv, LowRankLinear) and qkv.out_features == 3 * qkv.in_features
        assert "first conv" in reasons["patch_embed.proj"]
    if name == "tv:vit_b_16":
        attention = model.encoder.layers[0].self_attention  # nn.MultiheadAttention, made callable
        assert isinstance(attention, ProjectedMultiheadAttention)
        assert reasons["encoder.layers.encoder_layer_0.self_attention.in_proj"] == "factorized"
        assert reasons["encoder.layers.encoder_layer_0.self_attention.out_proj"] == "factorized"
        assert isinstance(model.encoder.layers[0].mlp[0], LowRankLinear)
    if name in (
        "tv:mobilenet_v3_small",
        "tv:efficientnet_b0",
        "timm:efficientnet_b0",
        "tv:convnext_tiny",
        "timm:convnext_atto",
        "timm:mobilenetv3_small_100",
    ):
        assert any(r == "grouped/depthwise conv" for r in reasons.values())
        for n, m in model.named_modules():
            if isinstance(m, nn.Conv2d) and m.groups > 1:
                assert reasons[n] == "grouped/depthwise conv"


# ----------------------------------------------------------------------------- policy


class _OwnForward(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class _OwnConvForward(nn.Conv2d):
    """Weight-standardized style: forward inherited, the op underneath changed."""

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight - weight.mean(), bias)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.body = nn.Sequential(
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1, groups=4),
            nn.ReLU(),  # grouped
            nn.Conv2d(64, 64, 3, padding=1, padding_mode="reflect"),
            nn.ReLU(),
            _OwnForward(64, 64, 3, padding=1),
            _OwnConvForward(64, 64, 3, padding=1),
            nn.Conv2d(64, 64, 1),  # 1×1 64→64: no saving at r_max ≥ 22
            nn.Conv2d(64, 64, 3, padding="same"),
        )
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.proj = timm.layers.Linear(64, 64)  # timm's Linear: plain forward, safe
        self.mlp = nn.Linear(64, 128)
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        h = self.body(self.stem(x))
        t = h.flatten(2).mT
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.head(self.mlp(self.proj(t)).mean(1))


def _toy() -> nn.Module:
    torch.manual_seed(0)
    return _Toy().double().eval()


def _reasons(report) -> dict[str, str]:
    return {d.name: d.reason for d in report.layers}


def test_policy_default_reasons():
    model, dense = _toy(), _toy()
    report = factorize_(model, init_rank=None, r_max=16)
    _check_report(model, report)
    r = _reasons(report)
    assert set(r) == {
        "stem", *(f"body.{i}" for i in (0, 2, 4, 6, 7, 8, 9)), "attn.in_proj", "attn.out_proj", "proj", "mlp", "head"
    }  # fmt: skip
    assert report.attention == ["attn"]  # nn.MultiheadAttention replaced by the same function, callable
    assert "first conv" in r["stem"]
    assert "final classifier" in r["head"]
    assert r["body.2"] == "grouped/depthwise conv"
    assert "padding_mode" in r["body.4"]
    assert "custom subclass _OwnForward" in r["body.6"]
    assert "custom subclass _OwnConvForward" in r["body.7"]
    for n in ("body.0", "body.9", "proj", "mlp", "attn.in_proj", "attn.out_proj"):
        assert r[n] == "factorized", (n, r[n])
    assert r["body.8"] == "factorized"  # 1×1 64→64 at r_max 16 saves
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    # at full rank capped by r_max=16 this is an approximation; the full-rank check is below
    assert model(x).shape == dense(x).shape
    # r_max 100 > the break-even ranks: each layer is capped where it stops saving, never grown past it
    report = factorize_(_toy(), init_rank=None, r_max=100)
    caps = {d.name: d.r_max for d in report.factorized}
    assert caps["body.8"] == 26 and caps["proj"] == 26  # 1×1 64→64 and 64→64: 128r + r² < 4096
    assert caps["body.0"] == 49  # 3×3 32→64, r_in ≤ 32: 64r + 9·32r + 32·32 < 18432 (and its MACs)
    assert caps["mlp"] == 35  # 64→128: 192r + r² < 8192
    reference = _toy()
    project_attention_(reference)  # the dense projections as modules, as factorize_ sees them
    for d in report.factorized:
        assert d.params_factorized < d.params_dense, d
        module = reference.get_submodule(d.name)
        assert _weights_at(module, d.r_max) < module.weight.numel() <= _weights_at(module, d.r_max + 1), d.name
    tiny = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2), nn.ReLU(), nn.Linear(2, 2))
    r = _reasons(factorize_(tiny, init_rank=None, r_min=8, r_max=100))
    assert r["0"] == "no saving at any rank >= r_min=8 (break-even rank 6)"  # 32r + r² < 256 → r ≤ 6
    assert "break-even rank 1" in r["2"]  # 16→2: 18r + r² < 32 → r ≤ 1


def _weights_at(module: nn.Module, r: int) -> int:
    """Weights of the factorized form at rank r (conv: both channel ranks min(r, channels))."""
    if isinstance(module, nn.Linear):
        out_f, in_f = module.weight.shape
        return (out_f + in_f) * r + r * r
    c_out, c_in, kh, kw = module.weight.shape
    r_out, r_in = min(r, c_out), min(r, c_in)
    return c_out * r_out + r_out * r_in * kh * kw + c_in * r_in


def test_attention_layouts_not_reproduced_stay_dense_with_the_reason():
    model = nn.Sequential(nn.Linear(16, 16))
    model.attn = nn.MultiheadAttention(16, 2, add_bias_kv=True)  # bias_k/bias_v: not the packed layout
    report = factorize_(model, init_rank=2, r_max=4, keep_classifier=False)
    assert report.attention == [] and isinstance(model.attn, nn.MultiheadAttention)
    assert "MultiheadAttention" in _reasons(report)["attn.out_proj"]


def test_policy_full_rank_toy_exact_and_idempotent():
    model, dense = _toy(), _toy()
    report = factorize_(model, init_rank=None, r_max=10_000, require_saving=False)
    assert {d.name for d in report.factorized} == {"body.0", "body.8", "body.9", "proj", "mlp", "attn.in_proj",
                                                   "attn.out_proj"}  # fmt: skip
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert _rel(model(x), dense(x)) <= 1e-12
    again = factorize_(model, init_rank=None, r_max=10_000, require_saving=False)
    assert not again.factorized  # factorized layers are not candidates any more
    assert {d.name for d in again.layers} == {d.name for d in report.skipped}


def test_policy_first_conv_full_rank_is_capped_by_tucker_rank():
    """A 3→32 3×3 stem has mode-0 rank ≤ 27 < 32: full rank means (27, 3), and it is exact."""
    model, dense = _toy(), _toy()
    report = factorize_(model, init_rank=None, r_max=10_000, require_saving=False, keep_first_conv=False)
    assert _reasons(report)["stem"] == "factorized"
    assert model.stem.ranks == (27, 3)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert _rel(model(x), dense(x)) <= 1e-12


def test_policy_keep_flags():
    report = factorize_(_toy(), init_rank=4, r_max=4, keep_first_conv=False, keep_classifier=False)
    r = _reasons(report)
    assert r["head"] == "factorized" and r["stem"] == "factorized"
    report = factorize_(_toy(), init_rank=4, r_max=16, keep_classifier=False)
    head = next(d for d in report.factorized if d.name == "head")
    assert head.r_max == 8 and head.ranks == [4]  # 128→10 saves only up to rank 8: 138r + r² < 1280


def test_policy_include_exclude_filter_fn():
    report = factorize_(_toy(), init_rank=4, r_max=16, include=["body.*"])
    r = _reasons(report)
    assert r["mlp"] == "not matched by include patterns"
    assert r["body.0"] == "factorized"
    report = factorize_(_toy(), init_rank=4, r_max=16, exclude=["body.9", "m*"])
    r = _reasons(report)
    assert r["body.9"] == "matched an exclude pattern" and r["mlp"] == "matched an exclude pattern"
    assert r["body.0"] == "factorized"
    seen = []

    def only_linear(module, name):
        seen.append(name)
        return isinstance(module, nn.Linear)

    report = factorize_(_toy(), init_rank=4, r_max=16, filter_fn=only_linear)
    r = _reasons(report)
    assert r["body.0"] == "rejected by filter_fn" and r["mlp"] == "factorized"
    assert "stem" not in seen and "head" not in seen  # first conv / classifier decided before filter_fn


def test_policy_init_tol_and_fraction():
    model = _toy()
    report = factorize_(model, init_rank=None, init_tol=0.5, r_max=16, r_min=2)
    for d in report.factorized:
        assert all(2 <= r <= 16 for r in d.ranks)
    report = factorize_(_toy(), init_rank=0.25, r_max=16)
    r = {d.name: d.ranks for d in report.factorized}
    assert r["mlp"] == [16]  # round(0.25·64) = 16
    assert r["body.0"] == [16, 8]  # out 64 → 16; in 32 → 8


def test_policy_keeps_train_mode_dtype_device():
    model = _toy().float().train()
    model.body[0].eval()
    factorize_(model, init_rank=4, r_max=16)
    assert model.body[0].training is False and model.mlp.training is True
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_report_table_lists_every_candidate():
    report = factorize_(_toy(), init_rank=4, r_max=16)
    table = report.table()
    header, *rows = table.splitlines()
    assert header.split()[:4] == ["layer", "kind", "shape", "action"]
    assert len(rows) == 13
    for d in report.layers:
        assert any(row.split()[0] == d.name for row in rows)
    assert report.seconds >= 0
    assert {d.name for d in report.factorized} | {d.name for d in report.skipped} == {d.name for d in report.layers}
