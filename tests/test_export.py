"""Export: exact safetensors round trip, ONNX == PyTorch with the factorized structure, INT8, latency, MACs.

One ONNX export of a tiny CNN (via export_saved, as `compress export` runs it) is shared by the ONNX tests: the dynamo
exporter costs seconds per model on a small CPU.
"""

from __future__ import annotations

import json
import logging
import math
import struct

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from compressor import models as M
from compressor.errors import ConfigError, WeightsError
from compressor.export import (
    build_low_rank_like,
    export_onnx,
    load_into,
    onnx_latencies,
    onnx_latency,
    parity_check,
    plain_model,
    plan_export,
    read_header,
    save_compressed,
    structure_check,
)
from compressor.export import onnx_export as OE
from compressor.factorize import factorize_
from compressor.layers import LowRankLinear, TuckerConv2d, low_rank_layers
from compressor.load import load_compressed
from compressor.models import ModelInfo, NormalizedClassifier, create_model
from compressor.reexport import export_saved
from compressor.runtime import count_macs


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- models


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),  # BN: the exporter may fold it
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(512, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def _tiny_create_model(
    name, num_classes, *, in_chans=3, weights=None, pretrained=False, mean=None, std=None, input_size=32
):
    """Stand-in for create_model that knows one architecture, "tiny" (timm/torchvision are too big here)."""
    assert name == "tiny" and num_classes == 10 and in_chans == 3
    mean, std = list(mean or [0.5] * 3), list(std or [0.5] * 3)
    info = ModelInfo("test", "tiny", "tiny", num_classes, in_chans, input_size, mean, std, "random-init", "13")
    return NormalizedClassifier(_tiny_net(), mean, std), info


def _truncate_unevenly(model: nn.Module) -> None:
    """Different ranks per layer, as after RobustDLRT's truncation steps."""
    for i, layer in enumerate(low_rank_layers(model).values()):
        layer.truncate_(0.15 + 0.1 * (i % 3))


def _tiny_compressed() -> tuple[NormalizedClassifier, ModelInfo]:
    model, info = _tiny_create_model("tiny", 10)
    factorize_(model, init_rank=8, r_min=2, r_max=16)
    _truncate_unevenly(model)
    return model.eval(), info


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny compressed CNN saved, then exported by export_saved (ONNX + INT8 + latency)."""
    folder = tmp_path_factory.mktemp("export")
    model, info = _tiny_compressed()
    save_compressed(model, folder / "model.safetensors", model_info=info.to_dict(), recipe={"train": {"beta": 0.0}})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(M, "create_model", _tiny_create_model)
        result = export_saved(
            folder / "model.safetensors", folder, int8=True, calibration=torch.rand(32, 3, 32, 32)
        ).to_dict()
    return folder, model, result


# ----------------------------------------------------------------------------- safetensors


def test_safetensors_round_trip_is_exact(tmp_path):
    model, info = create_model("timm:test_convnext", 10, input_size=32)
    factorize_(model, init_rank=8, r_min=2, r_max=16)
    _truncate_unevenly(model)
    model.eval()
    ranks = {n: l.ranks for n, l in low_rank_layers(model).items()}
    assert len({r for r in ranks.values()}) > 1, "test wants different ranks per layer"
    path = tmp_path / "model.safetensors"
    save_compressed(model, path, model_info=info.to_dict(), recipe={"seed": 0}, extra={"note": "test"})

    header, _ = read_header(path)
    state = model.state_dict()
    assert set(header) == set(state)
    assert all(header[k]["shape"] == list(v.shape) for k, v in state.items())  # exact size, no r_max padding

    loaded, manifest = load_compressed(path)
    assert not loaded.training
    assert {n: l.ranks for n, l in low_rank_layers(loaded).items()} == ranks
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in state.items())
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    kinds = {e["kind"] for e in manifest["layers"].values()}
    assert kinds == {"linear", "conv"}
    entry = next(iter(manifest["layers"].values()))
    assert {"kind", "ranks", "r_min", "r_max"} <= entry.keys()
    assert manifest["model"]["name"] == "test_convnext" and manifest["model"]["num_classes"] == 10
    assert manifest["recipe"] == {"seed": 0} and manifest["extra"] == {"note": "test"}
    assert {"torch", "compressor"} <= manifest["versions"].keys()
    assert 0 < manifest["params"]["compression_rate"] < 100


def test_build_low_rank_like_keeps_hyper_parameters():
    conv = nn.Conv2d(8, 12, (3, 5), stride=2, padding=(1, 2), dilation=1, bias=False)
    layer = build_low_rank_like(conv, "conv", [5, 3], 2, 200)
    assert isinstance(layer, TuckerConv2d) and layer.ranks == (5, 3) and layer.bias is None
    assert (layer.stride, layer.padding, layer.kernel_size) == (conv.stride, conv.padding, conv.kernel_size)
    assert (layer.r_max_out, layer.r_max_in) == (12, 8)
    lin = build_low_rank_like(nn.Linear(20, 6), "linear", [4], 2, 5)
    assert isinstance(lin, LowRankLinear) and lin.ranks == (4,) and lin.r_max == 5
    with pytest.raises(WeightsError, match="expected an nn.Linear"):
        build_low_rank_like(conv, "linear", [4], 2, 5)


@pytest.fixture(scope="module")
def saved_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    model, info = _tiny_compressed()
    save_compressed(model, path, model_info=info.to_dict())
    return path


def _corrupt_random(path, data):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())


def _corrupt_truncate(path, data):
    path.write_bytes(data[: len(data) // 2])


def _corrupt_header_length(path, data):
    path.write_bytes(struct.pack("<Q", len(data) * 4) + data[8:])


def _corrupt_header_json(path, data):
    n = struct.unpack("<Q", data[:8])[0]
    path.write_bytes(data[:8] + b"[" + data[9 : 8 + n] + data[8 + n :])


def _no_manifest(path, data):
    save_file({"w": torch.zeros(3)}, str(path))


def _bad_manifest(path, data):
    header, meta = read_header(path)
    tensors = {k: torch.zeros(v["shape"]) for k, v in header.items()}
    save_file(tensors, str(path), metadata={**meta, "manifest": "{not json"})


def _manifest_ranks_lie(path, data):
    from safetensors.torch import load_file

    _, meta = read_header(path)
    tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    manifest = json.loads(meta["manifest"])
    name = next(n for n, e in manifest["layers"].items() if e["kind"] == "linear")
    manifest["layers"][name]["ranks"] = [manifest["layers"][name]["ranks"][0] + 1]
    save_file(tensors, str(path), metadata={**meta, "manifest": json.dumps(manifest)})


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_corrupt_random, "header length field"),
        (_corrupt_truncate, "truncated"),
        (_corrupt_header_length, "header length field says"),
        (_corrupt_header_json, "header is not JSON"),
        (_no_manifest, "no compressor manifest"),
        (_bad_manifest, "manifest .* not valid JSON"),
        (_manifest_ranks_lie, "not rank .* as the manifest says"),
    ],
)
def test_bad_files_raise_weights_error(saved_file, tmp_path, corrupt, message):
    path = tmp_path / "bad.safetensors"
    data = saved_file.read_bytes()
    path.write_bytes(data)
    corrupt(path, data)
    with pytest.raises(WeightsError, match=message) as err:
        load_compressed(path)
    assert "\n" not in str(err.value)


def test_missing_file_raises_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_compressed(tmp_path / "nope.safetensors")


def test_export_fills_a_skeleton_and_builds_no_model(saved_file):
    with pytest.raises(ConfigError, match=r"compressor\.load_compressed\(path\)"):
        load_into(saved_file, None)  # rebuilding by name is compressor.load's part
    skeleton, _ = _tiny_create_model("tiny", 10)
    filled, _ = load_into(saved_file, skeleton)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(M, "create_model", _tiny_create_model)
        rebuilt, _ = load_compressed(saved_file)
    assert filled is skeleton and filled.state_dict().keys() == rebuilt.state_dict().keys()
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in filled.state_dict().items())


# ----------------------------------------------------------------------------- ONNX


def test_export_saved_writes_checked_artifacts(exported):
    folder, _, result = exported
    assert (folder / "model.onnx").is_file() and (folder / "model.int8.onnx").is_file()
    written = json.loads((folder / "export.json").read_text())
    assert written["ok"] is True and result["ok"] is True
    assert written["onnx"]["exporter"] == "dynamo"
    assert written["parity"]["passed"] and written["structure"]["matches"]
    assert result["macs"]["ratio"] > 1


def test_onnx_matches_pytorch_at_batch_1_and_8(exported):
    folder, model, _ = exported
    parity = parity_check(folder / "model.onnx", model, input_size=32, batches=(1, 8))
    assert set(parity["batches"]) == {1, 8}
    assert parity["passed"] and parity["rel_diff"] <= 1e-4


def test_onnx_batch_axis_is_dynamic(exported):
    folder, model, result = exported
    assert result["onnx"]["input_shape"][0] == "batch"
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 3, 32, 32)
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert got.shape == (3, 10)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_onnx_keeps_the_factorized_structure(exported):
    folder, model, _ = exported
    s = structure_check(folder / "model.onnx", model)
    layers = low_rank_layers(model)
    n_tucker = sum(isinstance(l, TuckerConv2d) for l in layers.values())
    n_lowrank = sum(isinstance(l, LowRankLinear) for l in layers.values())
    assert n_tucker == 2 and n_lowrank == 2
    assert set(s["plan"].values()) == {"tucker3", "merged"}
    assert s["conv_nodes"] == 1 + 3 * n_tucker  # first conv dense, three per Tucker layer
    assert s["matmul_nodes"] + s["gemm_nodes"] == 1 + 2 * n_lowrank  # classifier dense, two per merged LowRankLinear
    assert s["factors_found"] == s["factors_expected"] == 3 * n_tucker + 2 * n_lowrank
    assert s["weight_bytes_within_5pct"] and abs(s["weight_bytes_ratio"] - 1) <= 0.05
    assert s["matches"]


@pytest.mark.parametrize("fold", ["auto", "none"])
def test_plain_forms_compute_the_layer(fold):
    """Every export form == the factorized layer (float rounding only), at small and near-full ranks."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        TuckerConv2d.from_dense(nn.Conv2d(8, 8, 3, stride=2, padding=1), (8, 2)),  # r_out = C_out: fold U_out
        TuckerConv2d.from_dense(nn.Conv2d(8, 16, 3, padding=1), (2, 3)),  # small ranks: three convs
        nn.Flatten(),
        LowRankLinear.from_dense(nn.Linear(16 * 16, 12), 12),  # full rank: the dense product is cheaper
        LowRankLinear.from_dense(nn.Linear(12, 10), 2),  # small rank: S merged, two products
        nn.Linear(10, 4),
    ).eval()
    plan = plan_export(model, fold)
    forms = {n: f.form for n, f in plan.items()}
    if fold == "auto":
        assert forms == {"1": "fold_out", "2": "tucker3", "4": "dense", "5": "merged"}
    else:
        assert forms == {"1": "tucker3", "2": "tucker3", "4": "unmerged", "5": "unmerged"}
    plain = plain_model(model, plan)
    assert not low_rank_layers(plain) and len(low_rank_layers(model)) == 4  # the original is untouched
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        ref, got = model(x), plain(x)
    assert torch.allclose(got, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_legacy_fallback_when_dynamo_fails(tmp_path, monkeypatch, caplog):
    model, _ = _tiny_compressed()

    def broken(*args, **kwargs):
        raise RuntimeError("simulated dynamo failure")

    monkeypatch.setattr(OE, "_export_dynamo", broken)
    with caplog.at_level(logging.WARNING, logger="compressor.export.onnx_export"):
        info = export_onnx(model, tmp_path / "m.onnx", input_size=32)
    assert info.exporter == "legacy" and "simulated dynamo failure" in info.fallback_reason
    assert "simulated dynamo failure" in caplog.text
    assert info.structure["matches"]
    assert parity_check(tmp_path / "m.onnx", model, 32)["passed"]


def test_int8_model_runs(exported):
    folder, model, result = exported
    assert result["int8"]["size_bytes"] == (folder / "model.int8.onnx").stat().st_size > 0
    sess = ort.InferenceSession(str(folder / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(folder / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    out = sess.run(None, {"input": torch.rand(2, 3, 32, 32).numpy()})[0]
    assert out.shape == (2, 10) and np.isfinite(out).all()


# ----------------------------------------------------------------------------- cost


def test_latency_numbers_are_sane(exported):
    folder, _, result = exported
    lat = onnx_latency(folder / "model.onnx", batch_sizes=(1, 4), threads=1, warmup=1, repeats=3, input_size=32)
    for b in (1, 4):
        assert math.isfinite(lat[b]["median_ms"]) and 0 < lat[b]["median_ms"] <= lat[b]["p90_ms"]
    assert set(result["latency"]["compressed"]) == {"1", "32"} == set(result["latency"]["int8"])


def test_latencies_interleave_models_in_blocks(monkeypatch):
    """Side-by-side timing: warm-up for all, then blocks of ``block`` timed runs in turn, each
    block after an untimed lead-in; every model gets exactly ``repeats`` timed runs."""
    from compressor.export import latency as L

    calls: list[tuple[str, int]] = []

    class FakeSession:
        def __init__(self, name):
            self.name = name

        def get_inputs(self):
            return [type("I", (), {"name": "input"})()]

        def run(self, outputs, feed):
            calls.append((self.name, feed["input"].shape[0]))

    monkeypatch.setattr(L, "_LEAD_IN_S", 0.0)  # lead-in by count only: 3 runs
    monkeypatch.setattr(L, "ort_session", lambda path, threads: FakeSession(str(path)))
    lat = onnx_latencies({"a": "a", "b": "b"}, batch_sizes=(1, 4), warmup=2, repeats=7, block=3, input_size=8)
    assert set(lat) == {"a", "b"} and all(set(v) == {1, 4} for v in lat.values())
    assert all(
        lat[m][b]["repeats"] == 7 and lat[m][b]["min_ms"] <= lat[m][b]["median_ms"] <= lat[m][b]["p90_ms"]
        for m in lat
        for b in (1, 4)
    )
    one = [n for n, b in calls if b == 1]
    # warm-up 2 each, then (3 lead-in + block) per turn, blocks of 3, 3, 1 timed runs, a/b alternating
    assert one == ["a"] * 2 + ["b"] * 2 + (["a"] * 6 + ["b"] * 6) * 2 + ["a"] * 4 + ["b"] * 4
    assert [b for _, b in calls] == [1] * len(one) + [4] * len(one)
    calls.clear()
    onnx_latency("solo", batch_sizes=(1,), warmup=1, repeats=4, input_size=8)
    assert calls == [("solo", 1)] * 5  # alone: no lead-in runs
    with pytest.raises(ConfigError, match="at least one"):
        onnx_latencies({}, input_size=8)
    with pytest.raises(ConfigError, match="block"):
        onnx_latencies({"a": "a"}, input_size=8, block=0)


def test_count_macs():
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.Flatten(), nn.Linear(8 * 16 * 16, 5))
    assert count_macs(dense, 32) == 8 * 16 * 16 * 3 * 9 + 8 * 16 * 16 * 5
    torch.manual_seed(0)
    tucker = TuckerConv2d.from_dense(nn.Conv2d(6, 8, 3, padding=1, stride=2), (3, 2))
    low = LowRankLinear.from_dense(nn.Linear(8 * 16 * 16, 5), 4)
    model = nn.Sequential(tucker, nn.Flatten(), low)
    # Tucker: 1×1 at the input resolution, k×k and 1×1 at the output's; LowRankLinear: three products
    expect = 6 * 2 * 32 * 32 + 3 * 2 * 9 * 16 * 16 + 8 * 3 * 16 * 16 + (8 * 16 * 16 * 4 + 4 * 4 + 4 * 5)
    assert count_macs(model, 32, in_chans=6) == expect
    assert count_macs(model, 32, in_chans=6, dense_equivalent=True) == 8 * 16 * 16 * 6 * 9 + 8 * 16 * 16 * 5
    compressed, _ = _tiny_compressed()
    assert count_macs(compressed, 32, dense_equivalent=True) == count_macs(_tiny_create_model("tiny", 10)[0], 32)
    assert count_macs(compressed, 32) < count_macs(compressed, 32, dense_equivalent=True)
