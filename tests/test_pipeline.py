"""End to end: the compress command on the tiny recipe, and compress(model, loader, beta)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_command
from torch import nn

from compressor import compress
from compressor.cli import main
from compressor.layers import low_rank_layers

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    code, stdout, stderr = run_command(["--recipe", str(TINY), "--output-dir", str(out), "--quiet"])
    assert code == 0, stderr
    assert "compression rate" in stdout  # the summary table
    return out / "tiny"


def test_cli_writes_every_output(tiny_run: Path) -> None:
    for name in ("model.safetensors", "model.onnx", "report.json", "report.md", "recipe.yaml", "kappa.png"):
        assert (tiny_run / name).is_file(), name
    leftovers = [p.name for p in tiny_run.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers  # staging folder renamed into place, checkpoints gone


def test_report_has_the_promised_keys(tiny_run: Path) -> None:
    report = json.loads((tiny_run / "report.json").read_text())
    for side in ("dense", "compressed"):
        assert report[side]["params"] > 0
        assert 0.0 <= report[side]["clean_accuracy"] <= 1.0
        adv = report[side]["adversarial_accuracy"]
        assert set(adv) == {"l2_fgsm", "jitter", "pgd"}
        for per_eps in adv.values():
            assert all(0.0 <= v <= 1.0 for v in per_eps.values())
    comp = report["compressed"]
    assert 0.0 < comp["compression_rate"] < 100.0
    assert comp["params"] < report["dense"]["params"]
    assert comp["layers"], "no factorized layer reported"
    for layer in comp["layers"].values():
        assert {"rank", "condition_number"} <= set(layer)
    assert report["export"]["parity"]["passed"] is True
    assert {"data", "baseline", "factorize", "train", "evaluate_dense", "evaluate_compressed", "export"} <= set(
        report["timings"]
    )
    assert report["versions"]["torch"] and report["device"]["device"]
    assert report["history"]["epochs"], "training history missing"


def _strings(doc):
    if isinstance(doc, dict):
        for value in doc.values():
            yield from _strings(value)
    elif isinstance(doc, list):
        for value in doc:
            yield from _strings(value)
    elif isinstance(doc, str):
        yield doc


def test_no_report_path_points_into_the_staging_folder(tiny_run: Path) -> None:
    """The run is written into .tiny.partial and renamed into place at the end: the reports name
    the files they describe relative to the run folder, where they are."""
    report = json.loads((tiny_run / "report.json").read_text())
    staging = str(tiny_run.parent / f".{tiny_run.name}.partial")
    for text in [*_strings(report), (tiny_run / "report.md").read_text()]:
        assert ".partial" not in text and staging not in text, text
    assert report["export"]["onnx_eval"]["settings"]["onnx_path"] == "model.onnx"  # the file it scored
    named = [s for s in _strings(report) if s.endswith((".onnx", ".safetensors", ".png"))]
    assert len(named) >= 4 and all((tiny_run / name).is_file() for name in named), named


def test_resolved_recipe_reloads(tiny_run: Path) -> None:
    from compressor.recipe import load_recipe

    recipe = load_recipe(tiny_run / "recipe.yaml")
    assert recipe.run_name == "tiny" and recipe.train.beta == pytest.approx(0.075)


def test_existing_run_folder_is_not_overwritten(tiny_run: Path, capsys) -> None:
    before = sorted(p.name for p in tiny_run.iterdir())
    code = main(["--recipe", str(TINY), "--output-dir", str(tiny_run.parent), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "already exists" in err and "--force" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tiny_run.iterdir()) == before


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 48, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(48, 48, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(192, 96),
        nn.ReLU(),
        nn.Linear(96, 4),
    )


def test_compress_api_three_positional_arguments() -> None:
    x = torch.rand(64, 3, 8, 8)
    y = (x.mean((1, 2, 3)) > 0.5).long() + 2 * (x[:, 0].mean((1, 2)) > 0.5).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    model = _tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = compress(model, loader, 0.1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model was modified"
    layers = low_rank_layers(result.model)
    assert layers and result.ranks == {n: list(l.ranks) for n, l in layers.items()}
    assert 0.0 < result.compression_rate < 100.0
    assert result.report["compressed"]["compression_rate"] == pytest.approx(result.compression_rate)
    assert result.report["history"]["epochs"]
    assert result.model(x[:2]).shape == (2, 4)


def test_compress_api_refuses_bad_arguments() -> None:
    from compressor.errors import ConfigError

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(4, 3, 8, 8), torch.zeros(4).long()))
    with pytest.raises(ConfigError, match="nn.Module"):
        compress("vgg16", loader, 0.1)
    with pytest.raises(ConfigError, match="beta"):
        compress(_tiny_cnn(), loader, -1.0)
    with pytest.raises(ConfigError, match="train.tau"):
        compress(_tiny_cnn(), loader, 0.1, overrides={"train.tau": 2.0})


def test_the_command_backs_large_tensors_with_huge_pages() -> None:
    """compress's main() switches PyTorch's allocator to transparent huge pages before any
    tensor exists: a 64 MB tensor lands on huge pages with it, not without (THP in madvise mode)."""
    mode, rollup = Path("/sys/kernel/mm/transparent_hugepage/enabled"), Path("/proc/self/smaps_rollup")
    if not rollup.exists() or not mode.exists() or "[madvise]" not in mode.read_text():
        pytest.skip("needs Linux transparent huge pages in madvise mode")
    code = (
        "import sys, compressor.cli as cli\n"
        "if sys.argv[1] == 'on': cli.enable_huge_pages()\n"
        "import torch\n"
        "t = torch.ones(16 << 20)\n"  # 64 MB, touched
        "kb = [l.split()[1] for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')]\n"
        "print(kb[0])"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    kb = {
        arg: int(
            subprocess.run(
                [sys.executable, "-c", code, arg], env=env, capture_output=True, text=True, check=True
            ).stdout.strip()
        )
        for arg in ("on", "off")
    }
    assert kb["on"] - kb["off"] >= 32 * 1024, kb
