"""Model loading: name resolution, heads, normalization inside, weight files, offline pretrained."""

from __future__ import annotations

import logging
from urllib.error import URLError

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from compressor import models as M
from compressor.errors import ConfigError, UnknownNameError, WeightsError
from compressor.models import (
    BARE_NAME_ORDER,
    NormalizedClassifier,
    count_parameters,
    create_model,
    find_head,
    list_models,
    replace_head,
    resolve_name,
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No test may reach the network or a real weight cache: empty caches, HF_HUB_OFFLINE on."""
    import huggingface_hub.constants as hf

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # read once at import; this is what the hub consults


def _no_download(*_a, **_k):
    raise AssertionError("a download was attempted")


def _resnet(num_classes=5, **kw):
    torch.manual_seed(0)
    return create_model("resnet18", num_classes, input_size=32, **kw)


# ----------------------------------------------------------------------------- names


def test_bare_names_resolve_torchvision_first_then_timm():
    assert BARE_NAME_ORDER == ("torchvision", "timm")
    assert resolve_name("vgg16") == ("torchvision", "vgg16")
    assert resolve_name("ResNet18") == ("torchvision", "resnet18")
    assert resolve_name("resnet18d") == ("timm", "resnet18d")  # only timm has it
    assert resolve_name("tv:resnet18") == ("torchvision", "resnet18")
    assert resolve_name("torchvision:vgg11") == ("torchvision", "vgg11")
    assert resolve_name("timm:vgg16") == ("timm", "vgg16")
    assert resolve_name("timm:resnet18.a1_in1k") == ("timm", "resnet18.a1_in1k")


@pytest.mark.parametrize(
    "spec, suggestion", [("resnet19", "resnet18"), ("tv:resnt18", "tv:resnet18"), ("timm:vgg61", "timm:vgg16")]
)
def test_unknown_model_name_suggests_close_matches(spec, suggestion):
    with pytest.raises(UnknownNameError, match="Did you mean") as err:
        resolve_name(spec)
    assert repr(suggestion) in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_prefix_and_empty_name():
    with pytest.raises(ConfigError, match="prefix"):
        resolve_name("keras:vgg16")
    with pytest.raises(ConfigError):
        resolve_name("  ")


def test_list_models_and_count_parameters():
    vgg = list_models("vgg1?")
    assert "tv:vgg11" in vgg and "timm:vgg11" in vgg
    assert all(n.startswith("tv:") for n in list_models("tv:resnet*"))
    assert "tv:resnet18" in list_models("tv:resnet*")
    assert count_parameters(nn.Linear(3, 2)) == 8
    lin = nn.Linear(3, 2)
    lin.bias.requires_grad_(False)
    assert count_parameters(lin, trainable_only=True) == 6


# ----------------------------------------------------------------------------- building


@pytest.mark.parametrize(
    "spec, source, head",
    [
        ("tv:vgg11", "torchvision", "classifier.6"),
        ("tv:resnet18", "torchvision", "fc"),
        ("timm:resnet18", "timm", "fc"),
    ],
)
def test_create_model_replaces_head(spec, source, head):
    model, info = create_model(spec, 7, input_size=32)
    assert isinstance(model, NormalizedClassifier)
    assert (info.source, info.head, info.num_classes, info.input_size) == (source, head, 7, 32)
    assert info.weights == "random-init"
    assert model.net.get_submodule(head).out_features == 7
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    assert model.training  # handed over in train mode
    assert set(info.to_dict()) >= {
        "source",
        "name",
        "spec",
        "num_classes",
        "in_chans",
        "input_size",
        "mean",
        "std",
        "weights",
    }


def test_vit_is_built_for_the_input_size():
    model, info = create_model("timm:vit_tiny_patch16_224", 3, input_size=32)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(ConfigError, match="divisible by its patch size 16"):
        create_model("vit_b_16", 3, input_size=40)


def test_channel_checks():
    with pytest.raises(ConfigError, match="3 input channels"):
        create_model("tv:resnet18", 3, in_chans=1)
    with pytest.raises(ConfigError, match="one per channel"):
        create_model("tv:resnet18", 3, mean=[0.1, 0.2], std=[0.3, 0.3, 0.3])
    model, info = create_model("timm:resnet18", 3, in_chans=1, input_size=16)
    assert info.mean == [0.5] and model(torch.rand(2, 1, 16, 16)).shape == (2, 3)


def test_too_small_input_fails_clearly():
    with pytest.raises(ConfigError, match="input_size"):
        create_model("tv:inception_v3", 3, input_size=32)


def test_find_and_replace_head_general_helper():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 10))
    assert find_head(net)[0] == "4"
    assert replace_head(net, 3) == "4" and net[4].out_features == 3 and net[4].in_features == 9
    # no Linear at all (squeezenet style): the last 1x1 conv is the head
    conv_net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert replace_head(conv_net, 4) == "1" and conv_net[1].out_channels == 4


# ----------------------------------------------------------------------------- normalization


def test_normalization_is_inside_the_model():
    mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    model, info = _resnet(mean=mean, std=std)
    model.eval()
    x = torch.rand(2, 3, 32, 32)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), model.net((x - m) / s))
    assert info.mean == pytest.approx(mean) and info.std == pytest.approx(std)
    assert model.mean.shape == (1, 3, 1, 1)


def test_default_normalization_without_pretrained_is_half():
    _, info = _resnet()
    assert info.mean == [0.5, 0.5, 0.5] and info.std == [0.5, 0.5, 0.5]


# ----------------------------------------------------------------------------- weight files


def _same_outputs(a: nn.Module, b: nn.Module) -> None:
    a.eval(), b.eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_safetensors_round_trip_of_the_wrapper(tmp_path):
    src, _ = _resnet(mean=[0.2, 0.3, 0.4], std=[0.25, 0.25, 0.25])
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    torch.manual_seed(1)
    dst, info = create_model("resnet18", 5, weights=path)
    _same_outputs(src, dst)
    assert info.weights == f"file:{path}"
    assert info.mean == pytest.approx([0.2, 0.3, 0.4])  # stored with the weights, none passed


def test_pth_round_trip_bare_net_and_nested(tmp_path):
    src, _ = _resnet()
    bare = tmp_path / "bare.pth"
    torch.save(src.net.state_dict(), bare)
    nested = tmp_path / "nested.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, nested)
    for path in (bare, nested):
        torch.manual_seed(2)
        dst, _ = create_model("tv:resnet18", 5, weights=path)
        _same_outputs(src, dst)


def test_head_with_other_class_count_is_skipped(tmp_path, caplog):
    src, _ = _resnet(num_classes=10)
    path = tmp_path / "w10.safetensors"
    save_file(src.net.state_dict(), str(path))
    with caplog.at_level(logging.INFO, logger="compressor.models"):
        dst, info = create_model("resnet18", 4, weights=path)
    torch.testing.assert_close(dst.net.conv1.weight, src.net.conv1.weight)
    assert dst.net.fc.out_features == 4
    assert "head fc fresh" in info.weights
    assert any("head" in r.message for r in caplog.records)


def test_mismatched_weights_raise_one_line(tmp_path):
    src, _ = _resnet()
    state = dict(src.net.state_dict())
    del state["conv1.weight"], state["layer1.0.bn1.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["layer2.0.conv1.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError) as err:
        create_model("resnet18", 5, weights=path)
    msg = str(err.value)
    assert "2 missing (conv1.weight" in msg and "1 unexpected (extra.weight)" in msg and "1 with another shape" in msg
    assert "\n" not in msg


def test_missing_corrupt_truncated_and_non_tensor_files(tmp_path):
    src, _ = _resnet()
    good = tmp_path / "good.pth"
    torch.save(src.net.state_dict(), good)
    truncated = tmp_path / "trunc.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    st_good = tmp_path / "good.safetensors"
    save_file(src.net.state_dict(), str(st_good))
    st_trunc = tmp_path / "trunc.safetensors"
    st_trunc.write_bytes(st_good.read_bytes()[:1000])
    pickled = tmp_path / "obj.pth"
    torch.save({"model": src.net}, pickled)  # a whole module: refused by weights_only
    tensor_only = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_only)
    mixed = tmp_path / "mixed.pth"
    torch.save({"conv1.weight": torch.zeros(1), "epoch": 3}, mixed)
    cases = {
        tmp_path / "absent.pth": "not found",
        tmp_path / "w.ckpt": "unsupported extension",
        truncated: "cannot read",
        garbage: "cannot read",
        st_trunc: "cannot read",
        pickled: "cannot read",
        tensor_only: "does not hold a state dict",
        mixed: "not tensors",
    }
    (tmp_path / "w.ckpt").write_bytes(b"x")
    for path, text in cases.items():
        with pytest.raises(WeightsError, match=text) as err:
            create_model("resnet18", 5, weights=path)
        assert "\n" not in str(err.value), path


# ----------------------------------------------------------------------------- pretrained


def test_pretrained_offline_falls_back_to_random_init(caplog, monkeypatch):
    from torchvision.models._api import WeightsEnum

    monkeypatch.setattr(WeightsEnum, "get_state_dict", _no_download)  # HF_HUB_OFFLINE: not even tried
    with caplog.at_level(logging.WARNING, logger="compressor.models"):
        model, info = create_model("resnet18", 3, pretrained=True)
        _, info_timm = create_model("timm:resnet18", 3, pretrained=True)
    assert info.weights.startswith("random-init (pretrained unavailable: offline")
    assert info_timm.weights.startswith("random-init (pretrained unavailable: offline")
    assert "timm/resnet18.a1_in1k not cached" in info_timm.weights
    assert info.mean == [0.5, 0.5, 0.5]  # no pretrained weights were loaded
    assert any("model.weights" in r.message for r in caplog.records)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 3)


def test_timm_url_weights_obey_offline_switch(monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    _, info = create_model("timm:legacy_seresnet18.in1k", 3, pretrained=True)
    assert info.weights.startswith("random-init (pretrained unavailable: offline (HF_HUB_OFFLINE=1)")


def test_library_error_without_offline_switch_becomes_the_warning(monkeypatch, caplog):
    import huggingface_hub.constants as hf
    from torchvision.models._api import WeightsEnum

    def no_network(*_a, **_k):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(WeightsEnum, "get_state_dict", no_network)  # what torchvision raises without network
    with caplog.at_level(logging.WARNING, logger="compressor.models"):
        model, info = create_model("resnet18", 3, pretrained=True)
    assert info.weights.startswith("random-init (pretrained unavailable: URLError")
    assert "name resolution" in info.weights and "\n" not in info.weights
    assert any("continuing from random init" in r.message and "model.weights" in r.message for r in caplog.records)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 3)


def test_timm_pretrained_from_local_cache_without_network(tmp_path, monkeypatch):
    import timm
    from timm.models import get_pretrained_cfg

    # the Hugging Face cache layout: refs/main names the snapshot that holds the file
    cfg = get_pretrained_cfg("resnet18")
    commit = "0" * 40
    repo = tmp_path / "hf_cache" / ("models--" + cfg.hf_hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    torch.manual_seed(3)
    ref = timm.create_model("resnet18", pretrained=False)  # 1000 ImageNet classes
    save_file(ref.state_dict(), str(repo / "snapshots" / commit / "model.safetensors"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    model, info = create_model("timm:resnet18", 6, pretrained=True)
    assert info.weights == f"pretrained (timm {cfg.hf_hub_id})"
    torch.testing.assert_close(model.net.conv1.weight, ref.conv1.weight)
    assert model.net.fc.out_features == 6
    assert info.mean == pytest.approx(list(cfg.mean)) and info.std == pytest.approx(list(cfg.std))


def test_torchvision_pretrained_from_local_cache(tmp_path, monkeypatch):
    import torchvision.models as tvm
    from torchvision.models._api import WeightsEnum

    weights = tvm.get_model_weights("resnet18").DEFAULT
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")  # in torch's hub cache: allowed under HF_HUB_OFFLINE
    torch.manual_seed(4)
    ref = tvm.resnet18().state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: ref)
    model, info = create_model("resnet18", 6, pretrained=True)
    assert info.weights.startswith("pretrained (torchvision")
    torch.testing.assert_close(model.net.conv1.weight, ref["conv1.weight"])
    assert model.net.fc.out_features == 6
    assert info.mean == pytest.approx(list(M.IMAGENET_MEAN)) and info.std == pytest.approx(list(M.IMAGENET_STD))
