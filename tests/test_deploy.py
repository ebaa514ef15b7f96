"""Deployment: any model exported from Python and reloaded exactly, metadata in every artifact,
INT8 checked against FP32, the export command on the run's own data, --dry-run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import run_command
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compressor import check_export, compress, export_model, load_compressed
from compressor.check import int8 as I
from compressor.check import list_remedies
from compressor.errors import WeightsError
from compressor.export import DEPLOYMENT_KEY
from compressor.factorize import factorize_
from compressor.layers import low_rank_layers

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


class SmallNet(nn.Module):
    """A user's own architecture (not from timm or torchvision)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(torch.relu(self.stem(x))))


def _loader(n: int = 64, classes: int = 4, size: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _equal_outputs(a: nn.Module, b: nn.Module, size: int) -> bool:
    x = torch.rand(5, 3, size, size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_custom_module_compressed_exported_and_reloaded_exactly(tmp_path):
    torch.manual_seed(0)
    result = compress(SmallNet(), _loader(), 0.075, overrides={"train.epochs": 1, "factorize.init_rank": 4})
    assert low_rank_layers(result.model), "nothing was factorized"
    exported = export_model(result.model, tmp_path, input_size=16, class_names=["a", "b", "c", "d"], latency=False)
    assert exported.files == {"safetensors": "model.safetensors", "onnx": "model.onnx"}
    assert check_export(result.model, exported).ok and exported.parity["passed"]
    with pytest.raises(WeightsError, match="model=<a new SmallNet>"):
        load_compressed(tmp_path / "model.safetensors")  # no architecture to rebuild by name
    reloaded, manifest = load_compressed(tmp_path / "model.safetensors", model=SmallNet())
    assert manifest["model"]["source"] == "custom"
    assert {n: lay.ranks for n, lay in low_rank_layers(reloaded).items()} == {
        n: lay.ranks for n, lay in low_rank_layers(result.model).items()
    }
    assert _equal_outputs(result.model, reloaded, 16)


def test_timm_resnet18_compressed_exported_and_reloaded_exactly(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("resnet18", num_classes=4, pretrained=False)
    loader = _loader(n=32, size=32)
    result = compress(net, loader, 0.075, overrides={"train.epochs": 1, "factorize.init_rank": 8})
    assert low_rank_layers(result.model)
    export_model(result.model, tmp_path, input_size=32, onnx=False)
    reloaded, _ = load_compressed(tmp_path / "model.safetensors", model=timm.create_model("resnet18", num_classes=4))
    assert _equal_outputs(result.model, reloaded, 32)


def test_int8_is_checked_against_fp32_and_remedies_are_tried(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = SmallNet()
    factorize_(model, init_rank=4, r_max=8, keep_first_conv=False)
    val = _loader(n=48, seed=1)
    calib = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(2))

    def exported_and_checked(max_drop=0.01):
        out = export_model(
            model, tmp_path, input_size=16, int8=True, calibration=calib, latency=False, int8_max_drop=max_drop
        )
        written = out.int8["size_bytes"]
        return check_export(model, out, val_loader=val), written

    with monkeypatch.context() as m:  # nothing can meet it: every remedy is tried, then a warning
        m.setattr(I.Int8Search, "within", lambda self, accuracy: False)
        result, _ = exported_and_checked()
    q = result.int8
    variants = [t["variant"] for t in q["tried"]]
    assert variants[0] == I.EXPORTED_VARIANT and len(variants) >= 1 + len(list_remedies()) >= 2  # each remedy tried
    assert any(v.endswith("first and last layers in float") for v in variants)
    assert "INT8 loses" in q["warning"] and q["fp32_clean_accuracy"] == result.onnx_eval["clean_accuracy"]
    assert q["float_nodes"] or q["variant"] == I.EXPORTED_VARIANT  # the kept variant says what stayed float
    best = max(t["clean_accuracy"] for t in q["tried"])
    assert q["clean_accuracy"] == best  # the best candidate is kept
    assert result.sizes["int8"] == q["size_bytes"] == (tmp_path / "model.int8.onnx").stat().st_size
    assert (tmp_path / "model.int8.onnx").is_file() and not list(tmp_path.glob(".int8-*"))
    result, written = exported_and_checked(max_drop=1.0)  # anything passes: the exported file is kept as written
    assert len(result.int8["tried"]) == 1 and "warning" not in result.int8
    assert result.int8["variant"] == I.EXPORTED_VARIANT and result.int8["size_bytes"] == written


def test_int8_without_validation_data_says_it_is_unchecked(tmp_path):
    torch.manual_seed(0)
    model = SmallNet()
    calib = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    out = export_model(model, tmp_path, input_size=16, int8=True, calibration=calib, latency=False)
    assert "warning" not in out.int8 and out.parity is None  # export/ writes; it measures nothing
    checked = check_export(model, out)
    assert checked.parity["passed"] and "not measured" in checked.int8["warning"]
    assert checked.int8["calibration"] == "given images" and checked.onnx_eval is None


def _image_folder(root: Path, classes: list[str], per_class: int = 8) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = (rng.random((12, 12, 3)) * 80 + 60 * k).clip(0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> Path:
    """The tiny recipe on an imagefolder data set whose folder names are not in creation order."""
    tmp = tmp_path_factory.mktemp("folder")
    _image_folder(tmp / "images", ["zebra", "apple", "mango"])
    args = ["--recipe", str(TINY), "--data", "imagefolder", "--data-root", str(tmp / "images"), "--output-dir",
            str(tmp / "runs"), "--set", "model.name=timm:test_convnext", "--set", "data.train_subset=null",
            "--set", "data.val_subset=null", "--set", "export.int8=true", "--quiet"]  # fmt: skip
    code, _, stderr = run_command(args)
    assert code == 0, stderr[-2000:]
    return tmp / "runs" / "tiny"


def test_imagefolder_class_names_in_every_artifact(folder_run):
    names = ["apple", "mango", "zebra"]  # the label index order: ImageFolder sorts the folders
    meta = ort.InferenceSession(str(folder_run / "model.onnx")).get_modelmeta().custom_metadata_map
    deployment = json.loads(meta[DEPLOYMENT_KEY])
    assert deployment["class_names"] == names
    assert deployment["input"]["shape"] == ["batch", 3, 32, 32] and deployment["input"]["value_range"] == [0.0, 1.0]
    assert deployment["preprocess"]["color"] == "RGB" and deployment["preprocess"]["resize"]["size"] == [32, 32]
    assert deployment["compression"]["ranks"] and 0 < deployment["compression"]["compression_rate"] < 100
    assert deployment["compressor_version"]
    with safe_open(str(folder_run / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["manifest"])["deployment"]["class_names"] == names
    report = json.loads((folder_run / "report.json").read_text())
    assert report["data"]["class_names"] == names and report["export"]["deployment"]["class_names"] == names
    int8_meta = ort.InferenceSession(str(folder_run / "model.int8.onnx")).get_modelmeta().custom_metadata_map
    assert json.loads(int8_meta[DEPLOYMENT_KEY])["class_names"] == names


def test_report_md_is_for_people(folder_run):
    text = (folder_run / "report.md").read_text()
    assert "```" not in text and ".partial" not in text and str(folder_run.parent) not in text
    assert "INT8 clean accuracy" in text and "images" in text  # accuracies say how many images they count
    report = json.loads((folder_run / "report.json").read_text())  # the INT8 file as named in the run folder
    assert report["export"]["int8"]["eval"]["settings"]["onnx_path"] == "model.int8.onnx"


def test_export_command_uses_the_runs_own_data_for_int8(folder_run, tmp_path):
    out = tmp_path / "again"
    args = ["export", str(folder_run / "model.safetensors"), "--int8", "--no-latency", "--out", str(out), "--quiet"]
    code, _, stderr = run_command(args)
    assert code == 0, stderr[-2000:]
    doc = json.loads((out / "export.json").read_text())
    run = json.loads((folder_run / "report.json").read_text())
    assert doc["int8"]["calibration"].endswith("imagefolder training images")
    assert doc["data"]["n_val"] == run["data"]["n_val"]  # the run's own validation split
    assert doc["onnx_eval"]["clean_accuracy"] == pytest.approx(run["export"]["onnx_eval"]["clean_accuracy"])
    assert "clean_accuracy" in doc["int8"] and doc["deployment"]["class_names"] == ["apple", "mango", "zebra"]


def test_dry_run_prints_ranks_and_costs_and_writes_nothing(tmp_path):
    code, stdout, stderr = run_command(["--recipe", str(TINY), "--output-dir", str(tmp_path), "--dry-run"])
    assert code == 0, stderr[-2000:]
    assert "multiply-adds per image" in stdout and "factorized" in stdout and "MACs" in stdout
    assert list(tmp_path.iterdir()) == []
