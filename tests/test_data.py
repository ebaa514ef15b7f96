"""Data loading: shapes and ranges, seeded splits and order, subsets, readers, sharding, errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

from compressor.data import (
    FASHION_MNIST_DEFAULT_ROOT,
    CropFlip,
    GlobalBatchShardSampler,
    SeededShuffleSampler,
    ShardBatchSampler,
    build_data,
    list_datasets,
    read_idx_images,
    read_idx_labels,
    set_epoch,
    whole_split_loader,
)
from compressor.errors import ConfigError, DataError, UnknownNameError
from compressor.recipe import DataSection


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _digits(seed=0, size=16, **kw):
    return build_data(DataSection(name="digits", **kw), input_size=size, seed=seed)


def _order(loader, epoch):
    set_epoch(loader, epoch)
    return list(iter(loader.sampler))


# ----------------------------------------------------------------------------- digits


def test_list_datasets():
    assert set(list_datasets()) >= {"digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder"}


def test_digits_bundle_shapes_ranges_and_stats():
    b = _digits(batch_size=64, eval_batch_size=100)
    assert (b.name, b.num_classes, b.in_chans, b.class_names[:2]) == ("digits", 10, 3, ["0", "1"])
    assert b.n_train + b.n_val == 1797 and b.n_val == pytest.approx(0.2 * 1797, abs=10)
    x, y = next(iter(b.train_loader))
    assert x.shape == (64, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
    torch.testing.assert_close(x[:, 0], x[:, 1])  # grayscale repeated
    xv, _ = next(iter(b.val_loader))
    assert xv.shape == (100, 3, 16, 16)
    # stats are those of the training split, in [0, 1] pixel space
    imgs = torch.stack([b.train_dataset[i][0] for i in range(len(b.train_dataset))])
    assert b.mean == pytest.approx(imgs.mean(dim=(0, 2, 3)).tolist(), abs=1e-4)
    assert b.std == pytest.approx(imgs.std(dim=(0, 2, 3)).tolist(), abs=1e-3)
    # stratified: every class in both splits
    assert set(b.val_dataset.targets.tolist()) == set(range(10))
    assert b.to_dict()["n_train"] == b.n_train


def test_split_is_a_function_of_the_seed():
    a, b, c = _digits(seed=0), _digits(seed=0), _digits(seed=1)
    assert a.val_dataset.indices == b.val_dataset.indices
    assert a.val_dataset.indices != c.val_dataset.indices
    assert not set(a.train_dataset.indices) & set(a.val_dataset.indices)
    assert len(set(a.train_dataset.indices) | set(a.val_dataset.indices)) == 1797
    xa, ya = next(iter(a.train_loader))
    xb, yb = next(iter(b.train_loader))
    torch.testing.assert_close(xa, xb)
    assert torch.equal(ya, yb)


def test_batch_order_of_an_epoch_is_a_pure_function_of_seed_and_epoch():
    a, b = _digits(seed=3), _digits(seed=3)
    first = _order(a.train_loader, 0)
    assert sorted(first) == list(range(a.n_train))
    _order(a.train_loader, 1)
    e2 = _order(a.train_loader, 2)
    assert _order(b.train_loader, 2) == e2  # a "resumed" loader jumps straight to epoch 2
    assert e2 != first
    assert _order(_digits(seed=4).train_loader, 2) != e2


def test_subsets_keep_the_split_and_are_seeded():
    full = _digits()
    sub = _digits(train_subset=100, val_subset=30)
    assert (sub.n_train, sub.n_val) == (100, 30)
    assert set(sub.train_dataset.indices) <= set(full.train_dataset.indices)
    assert set(sub.val_dataset.indices) <= set(full.val_dataset.indices)
    assert _digits(train_subset=100).train_dataset.indices == sub.train_dataset.indices
    assert _digits(seed=5, train_subset=100).train_dataset.indices != sub.train_dataset.indices
    assert sub.mean != full.mean  # stats follow the (sub)set actually trained on


def test_augmentation_train_only_deterministic_and_in_range():
    b = _digits(size=32, augment=True, train_subset=64)
    assert b.val_dataset.augment is None
    aug = b.train_dataset.augment
    assert aug is not None and aug.flip is False and aug.padding == 4  # digits: crop only
    set_epoch(b.train_loader, 0)
    x0 = torch.stack([b.train_dataset[i][0] for i in range(16)])
    again = torch.stack([b.train_dataset[i][0] for i in range(16)])
    torch.testing.assert_close(x0, again)
    set_epoch(b.train_loader, 1)
    x1 = torch.stack([b.train_dataset[i][0] for i in range(16)])
    assert not torch.equal(x0, x1)
    assert x1.shape == (16, 3, 32, 32) and 0 <= x1.min() and x1.max() <= 1


def test_crop_flip_flips_some_and_keeps_content():
    img = torch.rand(3, 8, 8)
    no_pad = CropFlip(padding=0, flip=True, seed=0)
    outs = [no_pad(img, i, 0) for i in range(32)]
    flipped = sum(torch.equal(o, img.flip(-1)) for o in outs)
    assert 0 < flipped < 32 and all(torch.equal(o, img) or torch.equal(o, img.flip(-1)) for o in outs)
    crop = CropFlip(padding=2, flip=False, seed=0)(img, 7, 0)
    assert crop.shape == img.shape


# ----------------------------------------------------------------------------- sharding


def test_distributed_shards_partition_every_global_batch_and_val_batches():
    section = DataSection(name="digits", train_subset=100, val_subset=37, batch_size=16, eval_batch_size=8)
    one = build_data(section, input_size=8, seed=0)
    two = [build_data(section, input_size=8, seed=0, rank=r, world_size=2) for r in range(2)]
    for b in two:
        assert isinstance(b.train_loader.sampler, GlobalBatchShardSampler)
        assert isinstance(b.val_loader.batch_sampler, ShardBatchSampler)
        assert b.n_train == one.n_train and b.mean == one.mean
    for epoch in (0, 3):
        for loader in [one.train_loader] + [b.train_loader for b in two]:
            set_epoch(loader, epoch)
        batches, shards = list(one.train_loader), [list(b.train_loader) for b in two]
        assert len(batches) == len(shards[0]) == len(shards[1]) == 100 // 16  # last incomplete batch dropped
        for (x, y), (x0, y0), (x1, y1) in zip(batches, *shards):
            # process k holds positions k*8..k*8+7 of the one-process batch: same global batch
            assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))
        whole = whole_split_loader(two[1].train_loader)
        assert all(torch.equal(x, w) for (x, _), (w, _) in zip(batches, whole))
    # validation: whole batches 0, 2, 4 on rank 0 and 1, 3 on rank 1; every image once
    assert [b.val_loader.batch_sampler.global_batches for b in two] == [[0, 2, 4], [1, 3]]
    assert sorted(i for b in two for batch in b.val_loader.batch_sampler for i in batch) == list(range(37))
    assert sum(b.val_loader.batch_sampler.num_samples for b in two) == 37
    val = [x for x, _ in one.val_loader]
    assert all(torch.equal(a, w) for a, (w, _) in zip(val, whole_split_loader(two[0].val_loader)))


def test_global_batch_must_divide_and_fit():
    with pytest.raises(ConfigError, match="divisible"):
        build_data(DataSection(name="digits", batch_size=15), input_size=8, seed=0, rank=0, world_size=2)
    with pytest.raises(DataError, match="global batch"):
        build_data(
            DataSection(name="digits", train_subset=20, batch_size=32), input_size=8, seed=0, rank=0, world_size=2
        )


def test_single_process_order_equals_one_replica_distributed_order():
    from torch.utils.data import DistributedSampler

    s = SeededShuffleSampler(50, seed=7)
    d = DistributedSampler(range(50), num_replicas=1, rank=0, shuffle=True, seed=7)
    for e in (0, 3):
        s.set_epoch(e), d.set_epoch(e)
        assert list(s) == list(d)


def test_bad_rank():
    with pytest.raises(ConfigError):
        build_data(DataSection(name="digits"), input_size=8, seed=0, rank=2, world_size=2)


# ----------------------------------------------------------------------------- imagefolder


def _make_folder(root: Path, classes=("cat", "dog", "owl"), per_class=4, seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = (torch.rand(10, 12, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / c / f"{i}.png")


def test_imagefolder_bundle(tmp_path):
    _make_folder(tmp_path / "set")
    b = build_data(
        DataSection(name="imagefolder", root=str(tmp_path / "set"), val_fraction=0.25, batch_size=4),
        input_size=16,
        seed=0,
    )
    assert (b.num_classes, b.class_names, b.n_train, b.n_val) == (3, ["cat", "dog", "owl"], 9, 3)
    x, y = next(iter(b.train_loader))
    assert x.shape == (4, 3, 16, 16) and 0 <= x.min() and x.max() <= 1
    assert 0.3 < b.mean[0] < 0.7 and len(b.std) == 3


def test_imagefolder_train_val_layout(tmp_path):
    _make_folder(tmp_path / "set" / "train", per_class=3)
    _make_folder(tmp_path / "set" / "val", per_class=2, seed=1)
    b = build_data(DataSection(name="imagefolder", root=str(tmp_path / "set")), input_size=8, seed=0)
    assert (b.n_train, b.n_val, b.num_classes) == (9, 6, 3)


def test_imagefolder_missing_or_empty_root(tmp_path):
    with pytest.raises(DataError, match="nope"):
        build_data(DataSection(name="imagefolder", root=str(tmp_path / "nope")), input_size=8, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        build_data(DataSection(name="imagefolder", root=str(tmp_path / "empty")), input_size=8, seed=0)
    with pytest.raises(DataError, match="data.root"):
        build_data(DataSection(name="imagefolder"), input_size=8, seed=0)


# ----------------------------------------------------------------------------- IDX (fashion-mnist)


def _write_idx(folder: Path, images: torch.Tensor, labels: torch.Tensor, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n, r, c = images.shape
    img_bytes = struct.pack(">IIII", 2051, n, r, c) + images.to(torch.uint8).numpy().tobytes()
    lab_bytes = struct.pack(">II", 2049, n) + labels.to(torch.uint8).numpy().tobytes()
    for stem, data in (("train-images-idx3-ubyte", img_bytes), ("train-labels-idx1-ubyte", lab_bytes)):
        if gz:
            with gzip.open(folder / (stem + ".gz"), "wb") as f:
                f.write(data)
        else:
            (folder / stem).write_bytes(data)


def _tiny_idx(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8), torch.arange(n) % 10


def test_fashion_mnist_reader_on_synthetic_gzip_idx(tmp_path):
    images, labels = _tiny_idx()
    _write_idx(tmp_path, images, labels)
    assert torch.equal(read_idx_images(tmp_path / "train-images-idx3-ubyte.gz")[:, 0], images)
    assert torch.equal(read_idx_labels(tmp_path / "train-labels-idx1-ubyte.gz"), labels)
    b = build_data(DataSection(name="fashion-mnist", root=str(tmp_path), val_fraction=0.25), input_size=28, seed=0)
    assert (b.n_train, b.n_val, b.num_classes, b.class_names[0]) == (30, 10, 10, "T-shirt/top")
    j = b.train_dataset.indices[0]
    x, y = b.train_dataset[0]
    torch.testing.assert_close(x, (images[j].float() / 255).expand(3, 28, 28))
    assert y == labels[j]
    big = build_data(DataSection(name="fashion_mnist", root=str(tmp_path)), input_size=32, seed=0)
    assert big.train_dataset[0][0].shape == (3, 32, 32)


def test_idx_reader_accepts_decompressed_torchvision_layout(tmp_path):
    images, labels = _tiny_idx()
    _write_idx(tmp_path / "FashionMNIST" / "raw", images, labels, gz=False)
    b = build_data(DataSection(name="fashion-mnist", root=str(tmp_path)), input_size=28, seed=0)
    assert b.n_train + b.n_val == 40


def test_idx_reader_rejects_truncated_and_wrong_files(tmp_path):
    images, labels = _tiny_idx()
    _write_idx(tmp_path, images, labels, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        read_idx_images(path)
    with pytest.raises(DataError, match="not an IDX image file"):
        read_idx_images(tmp_path / "train-labels-idx1-ubyte")
    bad_gz = tmp_path / "x.gz"
    bad_gz.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="corrupt"):
        read_idx_labels(bad_gz)
    bad_stream = tmp_path / "y.gz"  # a gzip header followed by a broken deflate stream
    bad_stream.write_bytes(gzip.compress(b"x" * 100)[:10] + b"\xff" * 20)
    with pytest.raises(DataError, match="corrupt"):
        read_idx_labels(bad_stream)
    junk = tmp_path / "junk"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        read_idx_images(junk)
    assert "\n" not in str(err.value)


def test_gzip_idx_is_decompressed_to_a_private_temporary_folder_and_removed(tmp_path, monkeypatch):
    import tempfile

    images, labels = _tiny_idx()
    data = tmp_path / "data"
    _write_idx(data, images, labels)
    data.chmod(0o555)  # like the Debian package folder: nothing may be written next to the files
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    try:
        assert torch.equal(read_idx_images(data / "train-images-idx3-ubyte.gz")[:, 0], images)
    finally:
        data.chmod(0o755)
    assert sorted(p.name for p in data.iterdir()) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    assert not any(scratch.iterdir())


def test_idx_missing_root_or_files(tmp_path):
    with pytest.raises(DataError, match="nope"):
        build_data(DataSection(name="fashion-mnist", root=str(tmp_path / "nope")), input_size=28, seed=0)
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        build_data(DataSection(name="mnist", root=str(tmp_path)), input_size=28, seed=0)
    with pytest.raises(DataError, match="data.download"):
        build_data(DataSection(name="mnist"), input_size=28, seed=0)


@pytest.mark.skipif(
    not Path(FASHION_MNIST_DEFAULT_ROOT, "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist_files():
    b = build_data(DataSection(name="fashion-mnist", val_subset=500), input_size=28, seed=0)
    assert b.n_train == 48000 and b.n_val == 500 and b.num_classes == 10
    assert 0.25 < b.mean[0] < 0.32  # the known Fashion-MNIST mean is 0.286
    x, y = next(iter(b.val_loader))
    assert x.shape[1:] == (3, 28, 28) and set(y.tolist()) <= set(range(10))


# ----------------------------------------------------------------------------- other errors


def test_unknown_data_set_name_suggests():
    with pytest.raises(UnknownNameError, match="Did you mean 'digits'"):
        build_data(DataSection(name="digitz"), input_size=8, seed=0)


def test_torchvision_sets_without_files_say_how_to_fix(tmp_path):
    with pytest.raises(DataError, match="data.root .* or data.download=true"):
        build_data(DataSection(name="cifar10"), input_size=32, seed=0)
    with pytest.raises(DataError, match="data.download=true"):
        build_data(DataSection(name="cifar100", root=str(tmp_path)), input_size=32, seed=0)
