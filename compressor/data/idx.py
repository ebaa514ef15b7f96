"""IDX files (the MNIST format), gzip or plain, read by torchvision's MNIST reader."""

from __future__ import annotations

import gzip
import shutil
import tempfile
import zlib
from pathlib import Path

import torch

from ..errors import DataError


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
