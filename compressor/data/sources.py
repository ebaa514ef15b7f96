"""Data sets by name (digits, fashion-mnist, mnist, cifar10/100, imagefolder), loaded before splitting."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from ..recipe import DataSection
from .datasets import TensorImages
from .idx import _find_idx, read_idx_images, read_idx_labels

log = logging.getLogger(__name__)

FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package puts the gzip IDX files."""

DEFAULT_DOWNLOAD_ROOT = "~/.cache/compressor/data"
"""Download target for torchvision sets when ``data.download`` is true and ``data.root`` unset."""

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DIGIT_CLASSES = [str(i) for i in range(10)]


@dataclass
class _Source:
    """A loaded data set before splitting."""

    dataset: Dataset
    targets: torch.Tensor
    class_names: list[str]
    flip: bool
    """Whether horizontal flips are a valid augmentation."""
    val_dataset: Dataset | None = None
    """A predefined validation set (imagefolder train/val layout); else split from ``dataset``."""
    val_targets: torch.Tensor | None = None


def _require_root(section: DataSection, what: str) -> Path:
    if not section.root:
        raise DataError(f"data set {section.name!r} needs data.root: the folder that holds {what}")
    root = Path(section.root).expanduser()
    if not root.exists():
        raise DataError(f"data.root {root} does not exist: give the folder that holds {what}")
    return root


def _load_digits(section: DataSection, size: int) -> _Source:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.as_tensor(d.images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    targets = torch.as_tensor(d.target, dtype=torch.long)
    return _Source(TensorImages(images, targets, size), targets, list(DIGIT_CLASSES), flip=False)


def _idx_source(
    section: DataSection, size: int, *, tv_name: str, default_root: str | None, classes: list[str]
) -> _Source:
    """MNIST-format sets: read the training IDX files; download with torchvision if asked."""
    label = section.name
    if section.root:
        root = Path(section.root).expanduser()
    elif default_root and Path(default_root).is_dir():
        root = Path(default_root)
    elif section.download:
        root = Path(DEFAULT_DOWNLOAD_ROOT).expanduser()
    else:
        where = f" (default {default_root} not found: apt-get install dataset-fashion-mnist)" if default_root else ""
        raise DataError(
            f"data set {label!r} needs data.root, the folder with its IDX files{where}, or data.download=true"
        )
    dirs = [root, root / tv_name / "raw"]
    images_path = _find_idx(dirs, "train-images-idx3-ubyte")
    labels_path = _find_idx(dirs, "train-labels-idx1-ubyte")
    if (images_path is None or labels_path is None) and section.download:
        import torchvision.datasets as tvd

        try:
            getattr(tvd, tv_name)(str(root), train=True, download=True)
        except Exception as err:
            raise DataError(
                f"downloading {label} to {root} failed ({type(err).__name__}: {err}); "
                "put the IDX files in data.root instead"
            ) from None
        images_path = _find_idx(dirs, "train-images-idx3-ubyte")
        labels_path = _find_idx(dirs, "train-labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        if not root.exists():
            raise DataError(
                f"data.root {root} does not exist: give the folder with the {label} IDX files or set data.download=true"
            )
        raise DataError(
            f"no {label} training files in {root} (or {root / tv_name / 'raw'}): expected "
            "train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]; or set data.download=true"
        )
    images = read_idx_images(images_path)
    targets = read_idx_labels(labels_path)
    if images.shape[0] != targets.shape[0]:
        raise DataError(
            f"{images_path} has {images.shape[0]} images but {labels_path} {targets.shape[0]} labels: "
            "use matching files"
        )
    if targets.numel() and int(targets.max()) >= len(classes):
        raise DataError(
            f"{labels_path}: label {int(targets.max())} outside 0..{len(classes) - 1}: wrong file for {label}?"
        )
    log.info("%s: %d training images from %s", label, images.shape[0], images_path.parent)
    return _Source(TensorImages(images, targets, size), targets, list(classes), flip=False)


def _load_fashion_mnist(section: DataSection, size: int) -> _Source:
    return _idx_source(
        section, size, tv_name="FashionMNIST", default_root=FASHION_MNIST_DEFAULT_ROOT, classes=FASHION_MNIST_CLASSES
    )


def _load_mnist(section: DataSection, size: int) -> _Source:
    return _idx_source(section, size, tv_name="MNIST", default_root=None, classes=DIGIT_CLASSES)


def _cifar(section: DataSection, size: int, cls_name: str, folder: str) -> _Source:
    import torchvision.datasets as tvd

    if section.root:
        root = Path(section.root).expanduser()
    elif section.download:
        root = Path(DEFAULT_DOWNLOAD_ROOT).expanduser()
    else:
        raise DataError(
            f"data set {section.name!r} needs data.root (the folder holding {folder}/) or data.download=true"
        )
    if not section.download and not root.exists():
        raise DataError(f"data.root {root} does not exist: give the folder holding {folder}/ or set data.download=true")
    try:
        ds = getattr(tvd, cls_name)(str(root), train=True, download=section.download)
    except RuntimeError as err:
        raise DataError(
            f"{section.name} not found in {root} ({err}): pass data.root=<folder holding {folder}/> "
            "or data.download=true"
        ) from None
    except Exception as err:
        raise DataError(
            f"cannot load {section.name} from {root} ({type(err).__name__}: {err}): "
            f"check data.root holds {folder}/ or set data.download=true"
        ) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
    targets = torch.as_tensor(ds.targets, dtype=torch.long)
    return _Source(TensorImages(images, targets, size), targets, list(ds.classes), flip=True)


def _load_cifar10(section: DataSection, size: int) -> _Source:
    return _cifar(section, size, "CIFAR10", "cifar-10-batches-py")


def _load_cifar100(section: DataSection, size: int) -> _Source:
    return _cifar(section, size, "CIFAR100", "cifar-100-python")


def _image_folder(root: Path, size: int) -> Any:
    import torchvision.datasets as tvd
    import torchvision.transforms as T

    # square resize keeps the whole scene (remote-sensing tiles are square anyway)
    tf = T.Compose([T.Resize((size, size)), T.ToTensor()])
    try:
        return tvd.ImageFolder(str(root), transform=tf)
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"no images in {root} ({err}): expected {root}/<class name>/<image files>") from None


def _load_imagefolder(section: DataSection, size: int) -> _Source:
    root = _require_root(section, "one sub-folder of images per class")
    if not root.is_dir():
        raise DataError(f"data.root {root} is not a folder: give the folder with one sub-folder per class")
    val_dir = next(
        (root / n for n in ("val", "valid", "validation") if (root / "train").is_dir() and (root / n).is_dir()), None
    )
    if val_dir is not None:
        train = _image_folder(root / "train", size)
        val = _image_folder(val_dir, size)
        if val.classes != train.classes:
            raise DataError(
                f"{val_dir} has classes {val.classes[:5]} but {root / 'train'} has {train.classes[:5]}: "
                "use the same class folders"
            )
        log.info("imagefolder: using %s and %s as the splits (data.val_fraction not used)", root / "train", val_dir)
        return _Source(
            train,
            torch.as_tensor(train.targets, dtype=torch.long),
            list(train.classes),
            flip=True,
            val_dataset=val,
            val_targets=torch.as_tensor(val.targets, dtype=torch.long),
        )
    ds = _image_folder(root, size)
    return _Source(ds, torch.as_tensor(ds.targets, dtype=torch.long), list(ds.classes), flip=True)


_DATASETS: dict[str, Callable[[DataSection, int], _Source]] = {
    "digits": _load_digits,
    "fashion-mnist": _load_fashion_mnist,
    "mnist": _load_mnist,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "imagefolder": _load_imagefolder,
}


def list_datasets() -> list[str]:
    """Names accepted by ``data.name``."""
    return sorted(_DATASETS)
