"""Data loading: named data sets → seeded train/validation loaders of [0, 1] images.

Every sample is ``(image, label)`` with ``image`` a float tensor of shape 3×S×S in [0, 1]
(S = ``input_size``; grayscale is repeated to 3 channels) and ``label`` an int. Normalization is
not applied here: the model's :class:`~compressor.models.NormalizedClassifier` does it, with the
``mean``/``std`` of the training split that :func:`build_data` reports.

Data sets (:func:`list_datasets`):

- ``digits``: scikit-learn's 1,797 real 8×8 digits, shipped with scikit-learn (no files needed).
- ``fashion-mnist`` / ``mnist``: the IDX files (``train-images-idx3-ubyte[.gz]``,
  ``train-labels-idx1-ubyte[.gz]``), gzip or not, from ``root``, ``root/FashionMNIST/raw``
  (``root/MNIST/raw``) or, for Fashion-MNIST, by default from
  :data:`FASHION_MNIST_DEFAULT_ROOT` (Debian package ``dataset-fashion-mnist``), parsed by
  torchvision's MNIST file reader. torchvision's ``FashionMNIST`` class itself is not used: it
  wants decompressed train *and* test files under ``root/FashionMNIST/raw``, and the Debian
  package ships gzip files only.
- ``cifar10`` / ``cifar100``: torchvision's classes (``download`` only if ``data.download``).
- ``imagefolder``: ``root/<class>/<image>``; or ``root/train/<class>`` with ``root/val/<class>``
  (then ``val`` is the validation split and ``val_fraction`` is not used).

Splits and order, all pure functions of the seed (so a resumed run sees the same data):

- validation split: stratified by class, ``val_fraction`` of each class, chosen by ``seed``;
  ``train_subset``/``val_subset`` then keep a random subset (by ``seed``) of each split.
- training order of epoch ``e``: ``randperm(n_train, seed + e)`` (the formula of
  ``DistributedSampler``). **Call** :func:`set_epoch` ``(loader, e)`` before every epoch (as
  with ``DistributedSampler``): without it every epoch repeats epoch 0's order.
- several processes (``world_size`` W > 1, torchrun): ``data.batch_size`` B is the *global*
  batch; each process loads B / W images per step (B must be divisible by W). The training
  order is cut into global batches exactly as for one process, and process k takes positions
  k·B/W … (k+1)·B/W − 1 of each (:class:`GlobalBatchShardSampler`), so the W processes'
  j-th batches together are one process's j-th batch: averaged gradients equal the one-process
  gradient. Validation is sharded by whole ``eval_batch_size`` batches: process k gets global
  batches k, k + W, … (:class:`ShardBatchSampler`), so attacks seeded per global batch draw
  what one process would.
- augmentation (``augment=True``, training split only): random crop with zero padding
  (4 px at 32 px, scaled with the input size) and a horizontal flip — no flip for the digit
  sets (digits, mnist, fashion-mnist), where mirrored images are other or no classes. The crop
  offset and flip of a sample are a hash of (seed, epoch, sample index), not of a global RNG,
  so they are the same with any ``num_workers`` and after a resume.
- the training loader drops its last incomplete batch when the split holds at least one full
  (global) batch, so BatchNorm never sees a batch of one; validation keeps every image. With
  W > 1 the split must hold at least one global batch.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import ConfigError, DataError, unknown_name
from .recipe import DataSection

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

STATS_SAMPLE = 1024
"""Images sampled (by seed) to estimate mean/std of file-backed sets (imagefolder)."""

_PRECOMPUTE_BUDGET_BYTES = 512 * 2**20  # resize tensor sets once if the result fits in this
_U64 = (1 << 64) - 1


# ----------------------------------------------------------------------------- the bundle


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


# ----------------------------------------------------------------------------- datasets


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, h, w) float → (N, C, size, size), bilinear; antialiased only when shrinking."""
    if x.shape[-2:] == (size, size):
        return x
    shrink = size < x.shape[-1] or size < x.shape[-2]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


class TensorImages(Dataset):
    """Images held in one tensor (N, C, h, w): uint8 (0–255) or float (already in [0, 1]).

    Resized to ``size`` once when the result fits :data:`_PRECOMPUTE_BUDGET_BYTES` (uint8 stays
    uint8, rounded), otherwise per item. Items are 3×size×size float in [0, 1].
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, size: int):
        if images.ndim != 4 or images.shape[0] != targets.shape[0]:
            raise DataError(f"images {tuple(images.shape)} and labels {tuple(targets.shape)} do not match")
        self.size = size
        self.targets = targets.long()
        self.scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
        n, c = images.shape[:2]
        if (
            images.shape[-2:] != (size, size)
            and n * c * size * size * images.element_size() <= _PRECOMPUTE_BUDGET_BYTES
        ):
            chunks = []
            for start in range(0, n, 4096):
                x = _resize(images[start : start + 4096].float(), size)
                if images.dtype == torch.uint8:
                    x = x.round_().clamp_(0, 255).to(torch.uint8)
                else:
                    x = x.clamp_(0.0, 1.0)
                chunks.append(x)
            images = torch.cat(chunks)
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].float() * self.scale
        if x.shape[-2:] != (self.size, self.size):
            x = _resize(x[None], self.size)[0].clamp_(0.0, 1.0)
        if x.shape[0] == 1:
            x = x.repeat(3, 1, 1)
        return x, int(self.targets[i])

    def channel_stats(self, indices: Sequence[int]) -> tuple[list[float], list[float]]:
        """Exact per-channel mean/std over the given items (at the stored resolution)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        c = self.images.shape[1]
        s = torch.zeros(c, dtype=torch.float64)
        s2 = torch.zeros(c, dtype=torch.float64)
        count = 0
        for start in range(0, len(idx), 4096):
            x = self.images[idx[start : start + 4096]].to(torch.float64) * self.scale
            s += x.sum(dim=(0, 2, 3))
            s2 += (x * x).sum(dim=(0, 2, 3))
            count += x.shape[0] * x.shape[2] * x.shape[3]
        mean = s / count
        std = (s2 / count - mean * mean).clamp_min(0).sqrt()
        if c == 1:
            mean, std = mean.repeat(3), std.repeat(3)
        return mean.tolist(), std.tolist()


def _mix64(*values: int) -> int:
    """splitmix64 over a tuple of ints: a fast, portable hash for per-sample augmentation."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _U64)) & _U64
        h = (h + 0x9E3779B97F4A7C15) & _U64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _U64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _U64
        h ^= h >> 31
    return h


@dataclass(frozen=True)
class CropFlip:
    """Random crop after zero padding, plus an optional horizontal flip.

    The randomness of each call is ``hash(seed, epoch, index)``: reproducible, worker-independent.
    """

    padding: int
    flip: bool
    seed: int

    def __call__(self, x: torch.Tensor, index: int, epoch: int) -> torch.Tensor:
        # x: (C, H, W) → (C, H, W)
        h = _mix64(self.seed, epoch, index)
        p = self.padding
        if p > 0:
            dy, dx = h % (2 * p + 1), (h >> 20) % (2 * p + 1)
            hh, ww = x.shape[-2:]
            x = F.pad(x, (p, p, p, p))[:, dy : dy + hh, dx : dx + ww]
        if self.flip and (h >> 40) & 1:
            x = x.flip(-1)
        return x


class SplitDataset(Dataset):
    """The items ``indices`` of ``base``, optionally augmented (training split)."""

    def __init__(self, base: Dataset, indices: Sequence[int], targets: torch.Tensor, augment: CropFlip | None = None):
        self.base = base
        self.indices = [int(i) for i in indices]
        self.targets = targets[torch.as_tensor(self.indices, dtype=torch.long)] if self.indices else targets[:0]
        self.augment = augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of this epoch (called by :func:`set_epoch`)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = self.indices[i]
        x, y = self.base[j]
        if self.augment is not None:
            x = self.augment(x, j, self.epoch)
        return x, y


# ----------------------------------------------------------------------------- samplers


class SeededShuffleSampler(Sampler[int]):
    """Epoch ``e`` yields ``randperm(n, generator seeded with seed + e)``.

    The same formula as ``DistributedSampler(shuffle=True, seed=seed)`` with one replica, so
    the order is a pure function of (seed, epoch). Call ``set_epoch`` before each epoch.
    """

    def __init__(self, n: int, seed: int):
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class GlobalBatchShardSampler(Sampler[int]):
    """Process ``rank``'s part of the one-process training order, global batch by global batch.

    Epoch ``e``'s order is ``randperm(n, seed + e)`` (as :class:`SeededShuffleSampler`); it is
    cut into ``n // global_batch`` full global batches (the incomplete rest is dropped, as the
    one-process loader's ``drop_last`` does), and process k takes positions
    ``k*b .. (k+1)*b - 1`` of each, ``b = global_batch / world_size``. Batched by ``b``, the
    j-th batches of the ``world_size`` processes are together the one-process j-th batch.
    """

    def __init__(self, n: int, seed: int, rank: int, world_size: int, global_batch: int):
        if global_batch % world_size:
            raise ConfigError(
                f"data.batch_size {global_batch} is the global batch and must be divisible by the "
                f"number of processes ({world_size}); use a multiple of {world_size}"
            )
        if n < global_batch:
            raise DataError(
                f"the training split has {n} images, fewer than one global batch "
                f"(data.batch_size {global_batch}): lower data.batch_size or use more images"
            )
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.global_batch, self.local_batch = global_batch, global_batch // world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        full = (self.n // self.global_batch) * self.global_batch
        mine = perm[:full].view(-1, self.world_size, self.local_batch)[:, self.rank]
        return iter(mine.reshape(-1).tolist())

    def __len__(self) -> int:
        return (self.n // self.global_batch) * self.local_batch


class ShardBatchSampler(Sampler[list[int]]):
    """Batches of an unshuffled split, whole batches per process: global batches
    ``rank, rank + world_size, ...`` of size ``batch_size`` (the last one may be short).

    :func:`~compressor.evaluate.evaluate` reads :attr:`global_batches` to seed attacks by the
    global batch index and to find the first ``max_samples`` of the global order.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.global_batches = list(range(rank, -(-n // batch_size), world_size))
        """Global index of each batch this process yields, in order."""
        self.num_samples = sum(min(batch_size, n - b * batch_size) for b in self.global_batches)
        """Images this process yields."""

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.global_batches:
            yield list(range(b * self.batch_size, min(self.n, (b + 1) * self.batch_size)))

    def __len__(self) -> int:
        return len(self.global_batches)


def whole_split_loader(loader: DataLoader) -> DataLoader:
    """The loader one process would have over the same split, from a (possibly sharded) one.

    For work done by rank 0 alone on the whole split (ONNX evaluation, INT8 calibration in the
    export): a training loader keeps the same seed and current epoch (so the same order as one
    process), a validation loader becomes the plain unshuffled one. An unsharded loader is
    returned as it is.
    """
    sampler, batch_sampler = loader.sampler, loader.batch_sampler
    common = dict(num_workers=loader.num_workers, pin_memory=loader.pin_memory)
    if isinstance(sampler, GlobalBatchShardSampler):
        whole = SeededShuffleSampler(sampler.n, sampler.seed)
        whole.set_epoch(sampler.epoch)
        return DataLoader(loader.dataset, batch_size=sampler.global_batch, sampler=whole, drop_last=True, **common)
    if isinstance(batch_sampler, ShardBatchSampler):
        return DataLoader(loader.dataset, batch_size=batch_sampler.batch_size, shuffle=False, **common)
    return loader


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Prepare ``loader`` for epoch ``epoch``: shuffle order, augmentation draws, worker seeds.

    Works for the training samplers (:class:`SeededShuffleSampler`, :class:`GlobalBatchShardSampler`,
    ``DistributedSampler``) and is harmless on validation loaders. The pipeline must call it at
    the start of every epoch.
    """
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    seed = getattr(sampler, "seed", None)
    if loader.generator is not None and seed is not None:
        loader.generator.manual_seed(int(seed) + int(epoch))


# ----------------------------------------------------------------------------- sources


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


def _read_idx(path: str | Path, ndim: int, kind: str) -> torch.Tensor:
    """One uint8 IDX file (gzip or plain) parsed by torchvision's MNIST reader.

    torchvision's reader opens the path as a plain file, and Debian's ``dataset-fashion-mnist``
    ships only gzip files in a read-only folder: a ``.gz`` file is therefore decompressed into a
    private temporary folder first, read, and the folder removed (nothing is written next to the
    data, and concurrent processes never see each other's half-written copy).
    """
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    p = Path(path)
    with tempfile.TemporaryDirectory(prefix="compressor-idx-") as tmp:
        plain = p
        if p.suffix == ".gz":
            plain = Path(tmp) / p.stem
            try:
                with gzip.open(p, "rb") as src, plain.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (gzip.BadGzipFile, EOFError, zlib.error) as err:
                raise DataError(
                    f"cannot read {p} ({type(err).__name__}: {err}): the file is corrupt; replace it"
                ) from None
            except OSError as err:
                raise DataError(
                    f"cannot decompress {p} into {tmp} ({type(err).__name__}: {err}): check that the file is "
                    "readable and that the temporary folder (TMPDIR) is writable with room for it"
                ) from None
        try:
            x = read_sn3_pascalvincent_tensor(str(plain), strict=False)
        except OSError as err:
            raise DataError(
                f"cannot read {p} ({type(err).__name__}: {err}): check the path and its permissions"
            ) from None
        except Exception as err:  # its header checks are asserts, its size check a failed view
            text = str(err).strip().splitlines()[0][:160] if str(err).strip() else "bad header"
            raise DataError(
                f"{p} is not a complete IDX {kind} file, the file is truncated or corrupt "
                f"(torchvision: {type(err).__name__}: {text}); replace it"
            ) from None
    if x.dtype != torch.uint8 or x.ndim != ndim:
        dtype = str(x.dtype).removeprefix("torch.")
        raise DataError(
            f"{p} is not an IDX {kind} file (it holds {x.ndim}-D {dtype} data, expected {ndim}-D uint8): "
            "check the file name"
        )
    return x


def read_idx_images(path: str | Path) -> torch.Tensor:
    """IDX3 image file (gzip or plain) → uint8 tensor (N, 1, rows, cols)."""
    return _read_idx(path, 3, "image").unsqueeze(1)


def read_idx_labels(path: str | Path) -> torch.Tensor:
    """IDX1 label file (gzip or plain) → int64 tensor (N,)."""
    return _read_idx(path, 1, "label").long()


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


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


# ----------------------------------------------------------------------------- splits


def _stratified_split(targets: torch.Tensor, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Per class, a seeded ``val_fraction`` share goes to validation. Returns sorted index lists."""
    g = torch.Generator()
    g.manual_seed(seed)
    n = targets.numel()
    perm = torch.randperm(n, generator=g)
    val: list[int] = []
    for c in torch.unique(targets).tolist():
        members = perm[targets[perm] == c]  # this class, in seeded random order
        val.extend(members[: int(round(val_fraction * members.numel()))].tolist())
    if not val and n >= 2:
        val = [int(perm[0])]
    val_set = set(val)
    train = [i for i in range(n) if i not in val_set]
    return train, sorted(val)


def _subset(indices: list[int], k: int | None, seed: int) -> list[int]:
    if k is None or k >= len(indices):
        return indices
    g = torch.Generator()
    g.manual_seed(seed)
    keep = torch.randperm(len(indices), generator=g)[:k]
    return sorted(indices[i] for i in keep.tolist())


def _estimate_stats(ds: Dataset, n: int, seed: int) -> tuple[list[float], list[float]]:
    """Per-channel mean/std from up to :data:`STATS_SAMPLE` items (file-backed sets)."""
    g = torch.Generator()
    g.manual_seed(seed)
    pick = torch.randperm(n, generator=g)[:STATS_SAMPLE].tolist()
    s = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, dtype=torch.float64)
    count = 0
    for i in pick:
        x = ds[i][0].to(torch.float64)
        s += x.sum(dim=(1, 2))
        s2 += (x * x).sum(dim=(1, 2))
        count += x.shape[1] * x.shape[2]
    mean = s / count
    std = (s2 / count - mean * mean).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()


# ----------------------------------------------------------------------------- entry point


def build_data(section: DataSection, *, input_size: int, seed: int, rank: int = 0, world_size: int = 1) -> DataBundle:
    """Load ``section.name``, split it by ``seed`` and build the loaders for this rank.

    With ``world_size > 1``, ``section.batch_size`` is the global batch: the training loader
    yields this rank's ``batch_size / world_size`` images of each global batch
    (:class:`GlobalBatchShardSampler`) and the validation loader whole global batches
    ``rank, rank + world_size, ...`` (:class:`ShardBatchSampler`; every image on exactly one
    rank). The statistics and split sizes are global and equal on every rank. The caller must
    call :func:`set_epoch` on the training loader at the start of each epoch.
    """
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise ConfigError(f"input_size must be a positive int, got {input_size!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} / world_size {world_size}: need world_size >= 1 and 0 <= rank < world_size")
    key = section.name.strip().lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist", "image-folder": "imagefolder"}.get(key, key)
    if key not in _DATASETS:
        raise unknown_name("data set", section.name, list_datasets())
    src = _DATASETS[key](section, input_size)

    n_all = len(src.dataset)
    if n_all == 0:
        raise DataError(f"data set {section.name!r} is empty: check data.root")
    # separate streams so that changing a subset size never changes the split
    if src.val_dataset is None:
        train_idx, val_idx = _stratified_split(src.targets, section.val_fraction, seed)
        val_base, val_targets = src.dataset, src.targets
    else:
        train_idx, val_idx = list(range(n_all)), list(range(len(src.val_dataset)))
        val_base, val_targets = src.val_dataset, src.val_targets
    train_idx = _subset(train_idx, section.train_subset, seed + 1)
    val_idx = _subset(val_idx, section.val_subset, seed + 2)
    if not train_idx or not val_idx:
        raise DataError(
            f"data set {section.name!r} has {n_all} images: too few for a training and a validation split; "
            "add images or change data.val_fraction"
        )

    augment = None
    if section.augment:
        augment = CropFlip(padding=max(1, round(4 * input_size / 32)), flip=src.flip, seed=seed)
    train_ds = SplitDataset(src.dataset, train_idx, src.targets, augment)
    val_ds = SplitDataset(val_base, val_idx, val_targets)

    if hasattr(src.dataset, "channel_stats"):
        mean, std = src.dataset.channel_stats(train_idx)
    else:
        mean, std = _estimate_stats(SplitDataset(src.dataset, train_idx, src.targets), len(train_idx), seed + 3)
    std = [max(s, 1e-3) for s in std]  # a constant channel must not divide by zero downstream

    train_sampler: Sampler[int]
    pin = torch.cuda.is_available()
    g = torch.Generator()
    g.manual_seed(seed)
    if world_size > 1:
        train_sampler = GlobalBatchShardSampler(len(train_ds), seed, rank, world_size, section.batch_size)
        local_batch, drop_last = section.batch_size // world_size, False  # the sampler yields whole batches only
        val_kwargs: dict[str, Any] = {
            "batch_sampler": ShardBatchSampler(len(val_ds), section.eval_batch_size, rank, world_size)
        }
    else:
        train_sampler = SeededShuffleSampler(len(train_ds), seed)
        local_batch, drop_last = section.batch_size, len(train_sampler) >= section.batch_size
        val_kwargs = {"batch_size": section.eval_batch_size, "shuffle": False}
    train_loader = DataLoader(
        train_ds,
        batch_size=local_batch,
        sampler=train_sampler,
        num_workers=section.num_workers,
        drop_last=drop_last,
        generator=g,
        pin_memory=pin,
    )
    val_loader = DataLoader(val_ds, num_workers=section.num_workers, pin_memory=pin, **val_kwargs)
    num_classes = len(src.class_names)
    log.info(
        "data %s: %d train / %d val images, %d classes, %dx%d, mean %s std %s%s",
        key,
        len(train_ds),
        len(val_ds),
        num_classes,
        input_size,
        input_size,
        [round(m, 4) for m in mean],
        [round(s, 4) for s in std],
        f", rank {rank}/{world_size}, {section.batch_size // world_size} of each global batch of {section.batch_size}"
        if world_size > 1
        else "",
    )
    return DataBundle(
        train_loader=train_loader,
        val_loader=val_loader,
        num_classes=num_classes,
        in_chans=3,
        mean=[float(m) for m in mean],
        std=[float(s) for s in std],
        class_names=src.class_names,
        n_train=len(train_ds),
        n_val=len(val_ds),
        name=key,
        train_dataset=train_ds,
        val_dataset=val_ds,
        input_size=input_size,
        preprocess=preprocess_spec(key, input_size),
    )
