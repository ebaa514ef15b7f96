"""What :func:`~compressor.data.build_data` returns, and how a deployer preprocesses an image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader, Dataset


@dataclass
class DataBundle:
    """What :func:`build_data` returns: loaders, sizes and the statistics the model needs."""

    train_loader: DataLoader
    val_loader: DataLoader
    num_classes: int
    in_chans: int
    """Always 3: grayscale sets are repeated to three channels."""
    mean: list[float]
    """Per-channel mean of the training split in [0, 1] pixel space (for NormalizedClassifier)."""
    std: list[float]
    class_names: list[str]
    n_train: int
    """Images in the whole training split (all ranks together)."""
    n_val: int
    name: str
    train_dataset: Dataset
    val_dataset: Dataset
    input_size: int = 32
    preprocess: dict[str, Any] | None = None
    """How an image file of this data set becomes a model input (see :func:`preprocess_spec`);
    recorded in the exported artifacts for deployers."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (no loaders)."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "input_size": self.input_size,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "mean": self.mean,
            "std": self.std,
            "class_names": self.class_names,
            "preprocess": self.preprocess,
        }


GRAY_SETS = ("digits", "mnist", "fashion-mnist")
"""Data sets of grayscale images: one gray channel, repeated to the model's three."""


def preprocess_spec(name: str, input_size: int) -> dict[str, Any]:
    """How an image becomes this data set's model input, in words a deployer can implement
    without torch: colour conversion, resize, value range, layout. Normalization is not part
    of it: the model applies its mean/std itself."""
    gray = name in GRAY_SETS
    return {
        "color": "gray, repeated to 3 channels" if gray else "RGB",
        "source_channels": 1 if gray else 3,
        "resize": {
            "size": [input_size, input_size],
            "size_order": "height, width",
            "method": "bilinear",
            "align_corners": False,
            "antialias": "when shrinking",
            "keeps_aspect": False,
            "rounded_to_8bit_after_resize": name != "digits",
        },
        "value_range": [0.0, 1.0],
        "scale": "8-bit pixels / 255" if name != "digits" else "scikit-learn digit levels 0-16 / 16",
        "layout": "NCHW float32",
        "normalization": "inside the model (its mean/std); feed [0, 1] pixels",
    }
