"""Attention projections: nn.MultiheadAttention replaced by the same function with callable
projections, factorized exactly at full rank (torchvision ViT), exported with ONNX parity; models
that read a projection's .weight (torchvision Swin) still run after factorization."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.check import check_export
from compressor.export import export_model, load_into
from compressor.factorize import factorize_
from compressor.layers import LowRankLinear, ProjectedMultiheadAttention, low_rank_layers


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_projected_attention_is_the_same_function(batch_first, need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).double().eval()
    proj = ProjectedMultiheadAttention.from_mha(mha).eval()
    x = torch.randn(5, 3, 32, dtype=torch.float64)  # (L, N, E), or (N, L, E) with batch_first
    pad = torch.zeros(3 if not batch_first else 5, 3 if batch_first else 5, dtype=torch.bool)
    pad[..., -1] = True
    mask = torch.triu(torch.ones(x.shape[0 if not batch_first else 1], x.shape[0 if not batch_first else 1]), 1).bool()
    for kwargs in ({}, {"key_padding_mask": pad[: x.shape[1 if not batch_first else 0]]}, {"attn_mask": mask}):
        ref, ref_w = mha(x, x, x, need_weights=need_weights, **kwargs)
        got, got_w = proj(x, x, x, need_weights=need_weights, **kwargs)
        assert torch.allclose(got, ref, atol=1e-10), kwargs
        assert (ref_w is None) == (got_w is None) and (ref_w is None or torch.allclose(got_w, ref_w, atol=1e-10))
    y = torch.randn_like(x)  # cross-attention inputs use the packed projection's row blocks
    assert torch.allclose(proj(x, y, y, need_weights=False)[0], mha(x, y, y, need_weights=False)[0], atol=1e-10)


def test_torchvision_vit_b_16_factorizes_its_attention_exactly_at_full_rank():
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    vit = tvm.vit_b_16(weights=None, image_size=32, num_classes=10).double().eval()
    with torch.no_grad():  # the head starts at zero: the output would be 0 and the check below could not fail
        vit.heads.head.weight.normal_(0, 0.05)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref = vit(x)
    # the attention projections only: full-rank SVDs of the MLPs' 3072×768 matrices would triple
    # the cost and are checked by the layer tests and test_factorize_zoo
    report = factorize_(
        vit, init_rank=None, r_max=10_000, require_saving=False, filter_fn=lambda m, name: ".self_attention." in name
    )
    names = {d.name for d in report.factorized}
    assert len(report.attention) == 12
    assert all(f"encoder.layers.encoder_layer_{i}.self_attention.in_proj" in names for i in range(12))
    assert all(f"encoder.layers.encoder_layer_{i}.self_attention.out_proj" in names for i in range(12))
    with torch.no_grad():
        got = vit(x)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_vit_with_factorized_attention_exports_and_reloads(tmp_path):
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    vit = tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                mlp_dim=128, num_classes=5).eval()  # fmt: skip
    factorize_(vit, init_rank=12, r_max=32)
    assert any(n.endswith("self_attention.in_proj") for n in low_rank_layers(vit))
    result = check_export(vit, export_model(vit, tmp_path, input_size=32, latency=False))
    assert result.parity["passed"] and result.parity["rel_diff"] <= 1e-4, result.parity
    skeleton = tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                     mlp_dim=128, num_classes=5)  # fmt: skip
    reloaded, _ = load_into(tmp_path / "model.safetensors", model=skeleton)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), vit(x))


def test_swin_reads_projection_weights_and_still_runs_after_factorization(tmp_path):
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    swin = tvm.swin_t(weights=None, num_classes=4).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = swin(x)
    factorize_(swin, init_rank=None, r_max=10_000, require_saving=False, keep_first_conv=True)
    qkv = swin.features[1][0].attn.qkv
    assert isinstance(qkv, LowRankLinear)  # read through .weight by torchvision's attention function
    with torch.no_grad():
        got = swin(x)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


class ReadsWeight(nn.Module):
    """A parent that reads its projection's .weight instead of calling it (as Swin and EVA do)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8 * 16, 64)
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.linear(self.conv(x).flatten(1), self.proj.weight, self.proj.bias)
        return self.head(torch.relu(h))


def test_a_layer_read_through_weight_exports_dense_with_parity(tmp_path):
    torch.manual_seed(0)
    model = ReadsWeight().eval()
    factorize_(model, init_rank=8, r_max=16, keep_classifier=True)
    assert isinstance(model.proj, LowRankLinear)
    result = check_export(model, export_model(model, tmp_path, input_size=4, latency=False, safetensors=False))
    assert result.onnx["plan"]["proj"] == "dense"  # the parent needs a .weight: written as one matrix
    assert result.parity["passed"], result.parity
