"""The INT8 remedies of the check stage on small synthetic models made to fail INT8 in known ways:
calibration chosen by validation (an outlier pixel among the calibration images), the most
sensitive layer kept in float (a factorized layer whose internal activation has a huge outlier
channel), and nothing changed when INT8 already holds."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compressor.check import EXPORTED_VARIANT, check_export
from compressor.export import export_model
from compressor.export.quantize import quantizable_units
from compressor.layers.linear import LowRankLinear
from compressor.recipe import ExportSection
from compressor.report import export_table

SIZE = 16
HIDDEN = "4"  # the factorized layer's name in the model below


def _net(outlier: float = 1.0) -> nn.Module:
    """conv → pool → factorized linear (rank 4, exported as two MatMuls) → linear, trained for
    a moment to tell which colour dominates an image (clear margins: a benign INT8 model agrees
    with it). ``outlier`` then scales the first component of the factorized layer's intermediate
    activation by itself and its output basis by the inverse: the same function, one huge
    channel inside the layer."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 3),
    )
    x = _images(512, 0)
    y = x.mean((2, 3)).argmax(1)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for step in range(150):
        i = torch.arange(step * 64, step * 64 + 64) % len(x)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[i]), y[i]).backward()
        opt.step()
    layer = LowRankLinear.from_dense(net[4], rank=4)
    with torch.no_grad():
        layer.S[0] *= outlier
        layer.U[:, 0] /= outlier
    net[4] = layer
    return net.eval()


def _images(n: int, seed: int) -> torch.Tensor:
    """Images of one random colour each, with some noise: they differ as whole images do."""
    g = torch.Generator().manual_seed(seed)
    return 0.7 * torch.rand(n, 3, 1, 1, generator=g) + 0.3 * torch.rand(n, 3, SIZE, SIZE, generator=g)


def _val(model: nn.Module) -> DataLoader:
    """Images labelled by the float model itself: FP32 scores 100 %, INT8 its agreement with it."""
    x = _images(256, 1)
    with torch.no_grad():
        y = model(x).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=64)


def _check(model: nn.Module, folder, calibration: torch.Tensor):
    section = ExportSection(int8=True, latency=False)
    exported = export_model(model, folder, section, input_size=SIZE, calibration=calibration)
    return check_export(model, exported, val_loader=_val(model))


def test_a_factorized_layer_is_one_unit_of_its_factors(tmp_path):
    exported = export_model(_net(), tmp_path, ExportSection(), input_size=SIZE)
    units = quantizable_units(exported.path("onnx"))
    assert len(units[HIDDEN]) == 2  # x·(V Sᵀ) and ·Uᵀ: kept in float, or not, together
    assert sum(len(nodes) for nodes in units.values()) == 4 and len(units) == 3


def test_int8_that_holds_is_kept_as_exported(tmp_path):
    checked = _check(_net(), tmp_path, _images(64, 2))
    q = checked.int8
    assert q["drop"] <= q["max_drop"] == ExportSection().int8_max_drop
    assert [t["variant"] for t in q["tried"]] == [EXPORTED_VARIANT]  # no remedy ran
    assert q["calibrate_method"] == "minmax" and q["float_layers"] == [] and "sensitivity" not in q
    assert q["calibration_methods"] == {"minmax": q["clean_accuracy"]}
    table = export_table(checked.to_dict())
    assert "| INT8 layers kept in float | none |" in table


def test_an_outlier_pixel_among_the_calibration_images_makes_percentile_win(tmp_path):
    calibration = _images(512, 2)
    # one value in 393,216, a hundred times the others: it sets MinMax's whole input range, and
    # lies beyond the 99.999th percentile (the histogram calibrators also need a range their
    # bins resolve: an outlier a million times larger would defeat percentile too)
    calibration[0, 0, 0, 0] = 100.0
    checked = _check(_net(), tmp_path, calibration)
    q = checked.int8
    methods = q["calibration_methods"]
    assert methods["minmax"] < methods["percentile"] - 0.02  # MinMax fails ...
    assert q["calibrate_method"] == "percentile" and q["percentile"] == pytest.approx(99.999)  # ... percentile wins
    assert q["drop"] <= q["max_drop"] and q["float_layers"] == [] and not q["float_ends"]
    assert set(methods) == {"minmax", "percentile", "entropy"}  # every method scored before choosing
    assert q["variant"] == "percentile 99.999 calibration"
    assert "INT8 calibration, chosen by validation accuracy | percentile (minmax" in export_table(checked.to_dict())


def test_the_layer_with_a_huge_activation_outlier_is_kept_in_float(tmp_path):
    model = _net(outlier=1e4)
    checked = _check(model, tmp_path, _images(64, 2))
    q = checked.int8
    assert all(t["drop"] > q["max_drop"] for t in q["tried"][:-1])  # no calibration, nor the ends, helps
    assert q["float_layers"] == [HIDDEN] and q["drop"] <= q["max_drop"]  # the one layer, and only it
    ranking = q["sensitivity"]["layers"]
    assert list(ranking)[0] == HIDDEN and ranking[HIDDEN] > q["sensitivity"]["all_quantized_db"] + 10
    assert q["variant"].endswith("1 most sensitive layer in float")
    assert f"| INT8 layers kept in float | {HIDDEN} |" in export_table(checked.to_dict())
    # the chosen file is the one in the folder, and it holds as scored
    assert checked.sizes["int8"] == (tmp_path / "model.int8.onnx").stat().st_size


def test_unknown_float_layer_is_refused(tmp_path):
    from compressor.errors import ConfigError
    from compressor.export import quantize_int8

    exported = export_model(_net(), tmp_path, ExportSection(), input_size=SIZE)
    with pytest.raises(ConfigError, match="no quantizable layer"):
        quantize_int8(exported.path("onnx"), tmp_path / "q.onnx", _images(8, 2), float_layers=["nope"])
