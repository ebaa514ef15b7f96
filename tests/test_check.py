"""The check stage: export/ writes artifacts, compressor.check measures them; sections configure both."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compressor.check import Candidate, check_export, list_remedies, register_remedy
from compressor.check import int8 as I
from compressor.check import remedies as R
from compressor.errors import ConfigError
from compressor.export import LATENCY_BATCH_SIZES, export_model
from compressor.factorize import factorize_
from compressor.recipe import AttackSpec, EvaluateSection, ExportSection

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 4),
    ).eval()


def _val() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(40, 3, SIZE, SIZE, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 4, (40,), generator=g)), batch_size=16)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A factorized CNN exported with INT8 and latency on (few repeats): files only, nothing measured."""
    folder = tmp_path_factory.mktemp("check")
    dense = _net()
    model = _net()
    factorize_(model, init_rank=4, r_max=8, keep_first_conv=False)
    calibration = torch.rand(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    section = ExportSection(int8=True, latency_repeats=3)
    result = export_model(model, folder, section, input_size=SIZE, calibration=calibration)
    return model, dense, folder, result


def test_export_writes_the_files_and_measures_nothing(exported):
    model, _, folder, result = exported
    assert result.files == {"safetensors": "model.safetensors", "onnx": "model.onnx", "int8": "model.int8.onnx"}
    assert all((folder / name).stat().st_size == result.sizes[kind] for kind, name in result.files.items())
    assert result.structure["matches"] and result.macs["ratio"] > 1  # what the files are, known while writing
    assert result.parity is None and result.onnx_eval is None and result.latency is None
    assert "clean_accuracy" not in result.int8 and result.int8["calibration"] == "given images"


def test_check_measures_parity_accuracy_int8_and_latency(exported):
    model, dense, folder, result = exported
    evaluation = EvaluateSection(attacks=[AttackSpec(name="fgsm", eps=[0.05])], max_samples=16)
    checked = check_export(model, result, evaluation, val_loader=_val(), dense_model=dense)
    assert checked is result and checked.ok and checked.parity["passed"]
    ev = checked.onnx_eval
    assert ev["n_clean"] == 40 and ev["n_attacked"] == 16 and ev["agreement_clean"] >= 0.95
    # the files are named as they are in the folder, which the pipeline renames into place afterwards
    assert ev["settings"]["onnx_path"] == "model.onnx" and ev["settings"]["max_samples"] == 16
    q = checked.int8
    assert q["tried"][0]["variant"] == I.EXPORTED_VARIANT and q["fp32_clean_accuracy"] == ev["clean_accuracy"]
    assert q["eval"]["settings"]["onnx_path"] == "model.int8.onnx" and q["eval"]["n_attacked"] == 16
    assert q["size_bytes"] == checked.sizes["int8"] == (folder / "model.int8.onnx").stat().st_size
    lat = checked.latency
    assert set(lat) >= {"compressed", "int8", "dense", "speedup"}
    assert set(lat["compressed"]) == set(LATENCY_BATCH_SIZES) == set(lat["dense"])
    defaults = ExportSection()
    assert lat["threads"] == defaults.latency_threads and lat["compressed"][1]["repeats"] == 3  # the section's
    assert set(lat["speedup"]) == {"dense", "int8_vs_compressed"}


def test_a_registered_remedy_is_tried_in_its_order(exported, monkeypatch):
    """A new INT8 remedy is a class registered with an order: the search tries it among the
    others, in order, and keeps the best candidate."""
    model, _, _, result = exported
    monkeypatch.setattr(R, "_REGISTRY", list(R._REGISTRY))  # the registration ends with the test
    monkeypatch.setattr(I.Int8Search, "within", lambda self, accuracy: False)  # nothing holds: every remedy is tried
    seen = []

    @register_remedy(order=0)
    class PerTensor:
        name = "per-tensor weights"

        def candidates(self, search):
            seen.append((search.fp32_accuracy, [t["variant"] for t in search.tried]))
            yield Candidate("per-tensor weights", {"per_channel": False})

    assert list_remedies()[0].name == "per-tensor weights"
    fp32 = check_export(model, result, val_loader=_val()).onnx_eval
    q = result.int8
    variants = [t["variant"] for t in q["tried"]]
    assert variants[:2] == [I.EXPORTED_VARIANT, "per-tensor weights"]
    # then the standard remedies in their order: the other calibrations, the ends, the sensitive layers
    assert variants[2:4] == ["percentile 99.999 calibration", "entropy calibration"]
    assert "first and last layers in float" in variants[4] and "1 most sensitive layer in float" in variants[5]
    assert seen == [(fp32["clean_accuracy"], [I.EXPORTED_VARIANT])]  # the remedy saw what was measured before it
    assert q["clean_accuracy"] == max(t["clean_accuracy"] for t in q["tried"]) and "warning" in q


def test_export_section_and_keyword_shortcuts(tmp_path):
    model = _net()
    with pytest.raises(ConfigError, match="export.opset"):
        export_model(model, tmp_path / "x", input_size=SIZE, opset=9)
    with pytest.raises(ConfigError, match="ExportSection"):
        export_model(model, tmp_path / "x", {"onnx": False}, input_size=SIZE)
    with pytest.raises(ConfigError, match="calibration images"):
        export_model(model, tmp_path / "x", input_size=SIZE, int8=True)
    assert not (tmp_path / "x").exists()  # refused before anything is written
    a = export_model(model, tmp_path / "a", ExportSection(onnx=False), input_size=SIZE)
    b = export_model(model, tmp_path / "b", input_size=SIZE, onnx=False)
    assert a.section == b.section and a.files == b.files == {"safetensors": "model.safetensors"}
    assert b.section.opset == ExportSection().opset  # the recipe's default, not a second copy of it
    assert check_export(model, b).parity is None  # nothing to check without an ONNX file


def _imported_modules(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports, at any depth (inside functions too), as absolute names."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return out


FORBIDDEN = ("compressor.evaluate", "compressor.data", "compressor.factorize", "compressor.models",
             "compressor.check", "compressor.pipeline", "compressor.reexport", "compressor.load")  # fmt: skip
EXPORT_FILES = sorted((ROOT / "compressor" / "export").glob("*.py"))


@pytest.mark.parametrize("path", EXPORT_FILES, ids=[p.name for p in EXPORT_FILES])
def test_export_imports_no_evaluation_data_or_model_building_code(path: Path):
    bad = sorted(m for m in _imported_modules(path, "compressor.export") if m.startswith(FORBIDDEN))
    assert not bad, f"{path.name} imports {bad}"


def test_the_import_scan_sees_relative_and_nested_imports():
    assert len(EXPORT_FILES) >= 5
    found = _imported_modules(ROOT / "compressor" / "check" / "accuracy.py", "compressor.check")
    assert "compressor.evaluate.evaluate_onnx" in found and "compressor.export.parity_check" in found
    nested = _imported_modules(ROOT / "compressor" / "pipeline.py", "compressor")  # imports inside functions
    assert "compressor.check.check_export" in nested
