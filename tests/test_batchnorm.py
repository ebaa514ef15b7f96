"""BatchNorm after rank-adaptive training: running statistics re-estimated on the final model,
and a warning for a model whose statistics do not fit its data."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compressor import compress
from compressor.train.batchnorm import batchnorm_mismatch, batchnorms


def _data(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > x[:, 1].mean((1, 2))).long() + 2 * (x[:, 2].mean((1, 2)) > 0.5).long()
    return x, y


def _loader(seed: int = 0, shuffle: bool = True) -> DataLoader:
    x, y = _data(seed=seed)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=shuffle, generator=torch.Generator().manual_seed(0))


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
        nn.Conv2d(24, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(32, 4),
    )  # fmt: skip


OVERRIDES = {"train.epochs": 2, "factorize.init_rank": 8, "factorize.keep_first_conv": False, "train.bn_batches": 3}


def test_running_statistics_are_reestimated_on_the_final_model():
    import copy

    from torch.optim.swa_utils import update_bn

    loader = _loader(shuffle=False)  # the re-estimation pass sees its first 3 batches
    kept = compress(_bn_net(), loader, 0.05, overrides={**OVERRIDES, "train.bn_batches": 0}).model
    model = compress(_bn_net(), loader, 0.05, overrides=OVERRIDES).model
    for a, b in zip(batchnorms(kept), batchnorms(model)):
        assert not torch.allclose(a.running_mean, b.running_mean)  # the same training, statistics redone
    # what they must be: the average over the first 3 training batches through the final model
    reference = copy.deepcopy(model)
    update_bn([x for x, _ in list(loader)[:3]], reference)
    for a, b in zip(batchnorms(reference), batchnorms(model)):
        assert torch.allclose(a.running_mean, b.running_mean, atol=1e-6)
        assert torch.allclose(a.running_var, b.running_var, atol=1e-6)
        assert int(b.num_batches_tracked) == 3


def test_a_model_with_broken_statistics_gets_a_warning(caplog):
    model = _bn_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):  # train it so that batch statistics give a useful accuracy
        for x, y in _loader():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    with torch.no_grad():
        for bn in batchnorms(model):  # statistics that do not fit the data
            bn.running_mean.add_(3.0)
            bn.running_var.mul_(0.01)
    eval_acc, batch_acc = batchnorm_mismatch(model, _loader(seed=1, shuffle=False), torch.device("cpu"))
    assert eval_acc < batch_acc - 0.2, (eval_acc, batch_acc)
    with caplog.at_level(logging.WARNING, logger="compressor.train.batchnorm"):
        result = compress(model, _loader(), 0.05, val_loader=_loader(seed=1, shuffle=False), overrides=OVERRIDES)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("before compression: accuracy in eval mode") for m in warnings), warnings
    assert not any(m.startswith("after compression") for m in warnings), warnings  # re-estimated: fixed
    fixed_eval, fixed_batch = batchnorm_mismatch(result.model, _loader(seed=1, shuffle=False), torch.device("cpu"))
    assert fixed_eval >= fixed_batch - 0.2


def test_batchnorm_after_factorized_convs_is_folded_in_the_onnx_export(tmp_path):
    import onnx

    from compressor.check import check_export
    from compressor.export import export_model
    from compressor.factorize import factorize_

    model = _bn_net().eval()
    with torch.no_grad():
        for bn in batchnorms(model):  # statistics that make the fold visible in the numbers
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2.0)
    factorize_(model, init_rank=8, r_max=16, keep_first_conv=False)
    result = check_export(model, export_model(model, tmp_path, input_size=8, latency=False, safetensors=False))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node]
    assert "BatchNormalization" not in ops, ops  # folded into the factorized convs' weights
    assert result.parity["passed"] and result.structure["matches"], (result.parity, result.structure)
