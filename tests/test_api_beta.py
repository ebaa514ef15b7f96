"""compress(): β comes from the recipe unless the caller passes it (issue 29's β trap).

The β checked is the one the trainer built its loss terms with (report["loss_terms"], from the
Trainer) and the one in the resolved recipe the report saves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compressor import compress
from compressor.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DLRT = ROOT / "recipes" / "dlrt.yaml"  # train.beta: 0.0
SMALL = {"train.epochs": 1, "train.bn_batches": 0, "factorize.calibration_batches": 1}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.rand(16, 3, 4, 4, generator=g), torch.randint(0, 4, (16,), generator=g)), 8)


def _beta_used(result) -> float:
    """β of the spectral term the trainer ran (0: no such term), checked against the recipe."""
    report = result.report
    terms = {t["term"]: t for t in report["loss_terms"]}
    used = terms["spectral"]["weight"] if "spectral" in terms else 0.0
    assert used == report["recipe"]["train"]["beta"]
    return used


@pytest.mark.parametrize(
    ("args", "kwargs", "beta"),
    [
        ((), {"recipe": DLRT}, 0.0),  # the file's β, not the argument's former default
        ((), {"recipe": str(DLRT)}, 0.0),
        ((), {}, 0.075),  # no recipe: the built-in recipe's β
        ((0.3,), {"recipe": DLRT}, 0.3),  # an argument wins over the file
        ((), {"recipe": {"train": {"beta": 0.01}}}, 0.01),
        ((None,), {"recipe": DLRT}, 0.0),  # None says "the recipe's", like leaving it out
        ((0.0,), {}, 0.0),  # an explicit 0 is a choice, not a missing value
        ((), {"recipe": DLRT, "extra": {"train.beta": 0.2}}, 0.2),  # overrides apply without the argument
        ((0.3,), {"recipe": DLRT, "extra": {"train.beta": 0.2}}, 0.3),  # the argument wins over overrides
        ((0.3,), {"recipe": DLRT, "extra": ["train.beta=0.2"]}, 0.3),  # ... given as a list too
    ],
    ids=[
        "file",
        "file-str",
        "default",
        "arg-over-file",
        "dict",
        "none",
        "zero",
        "overrides",
        "arg-over-dict",
        "arg-over-list",
    ],  # fmt: skip
)
def test_beta_comes_from_the_recipe_unless_passed(args, kwargs, beta) -> None:
    kwargs = dict(kwargs)
    extra = kwargs.pop("extra", None)
    if isinstance(extra, dict):
        overrides: dict | list = {**SMALL, **extra}
    else:
        overrides = [f"{k}={v}" for k, v in SMALL.items()] + (extra or [])
    result = compress(_model(), _loader(), *args, overrides=overrides, device="cpu", **kwargs)
    assert _beta_used(result) == beta


def test_compress_without_overrides_uses_the_recipe_file() -> None:
    """The user's call from the issue, exactly: no overrides at all."""
    result = compress(_model(), _loader(), recipe=DLRT, device="cpu")
    assert _beta_used(result) == 0.0
    assert result.report["recipe"]["train"]["epochs"] == 2  # the file's, so the file was read


@pytest.mark.parametrize("bad", [-0.1, True, "0.1", float("nan")])
def test_a_bad_beta_is_refused(bad) -> None:
    with pytest.raises(ConfigError, match="beta"):
        compress(_model(), _loader(), bad)
