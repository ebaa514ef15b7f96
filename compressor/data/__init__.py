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

from .bundle import GRAY_SETS, DataBundle, preprocess_spec
from .datasets import SplitDataset, TensorImages
from .idx import read_idx_images, read_idx_labels
from .loaders import build_data
from .samplers import GlobalBatchShardSampler, SeededShuffleSampler, ShardBatchSampler, set_epoch, whole_split_loader
from .sources import (
    DEFAULT_DOWNLOAD_ROOT,
    DIGIT_CLASSES,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DEFAULT_ROOT,
    list_datasets,
)
from .splits import STATS_SAMPLE
from .transforms import CropFlip

__all__ = [
    "DEFAULT_DOWNLOAD_ROOT",
    "DIGIT_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DEFAULT_ROOT",
    "GRAY_SETS",
    "STATS_SAMPLE",
    "CropFlip",
    "DataBundle",
    "GlobalBatchShardSampler",
    "SeededShuffleSampler",
    "ShardBatchSampler",
    "SplitDataset",
    "TensorImages",
    "build_data",
    "list_datasets",
    "preprocess_spec",
    "read_idx_images",
    "read_idx_labels",
    "set_epoch",
    "whole_split_loader",
]
