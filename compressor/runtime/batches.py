"""What a batch from a user's loader may look like, read one way for every stage."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import DataError


def split_batch(batch: Any, *, labels: bool = True) -> tuple[Tensor, Tensor | None]:
    """``(images, labels)`` of a batch: a pair or list ``(x, y, ...)``, a mapping with
    ``image(s)``/``label(s)`` keys, or (with ``labels=False``) a bare image tensor.

    Raises DataError naming the accepted shapes when the batch is none of these.
    """
    x: Any = None
    y: Any = None
    if isinstance(batch, Tensor) and not labels:
        x = batch
    elif isinstance(batch, Mapping):
        x, y = batch.get("image", batch.get("images")), batch.get("label", batch.get("labels"))
    elif isinstance(batch, (list, tuple)) and batch:
        x, y = batch[0], (batch[1] if len(batch) >= 2 else None)
    if not isinstance(x, Tensor) or (labels and not isinstance(y, Tensor)):
        wanted = "(images, labels) tensor pairs" if labels else "image tensors or (images, labels) pairs"
        raise DataError(f"the loader must yield {wanted}")
    return x, (y if isinstance(y, Tensor) else None)


def first_images(loader: Iterable[Any], n: int) -> Tensor:
    """The first ``n`` images of one pass over ``loader`` (e.g. for INT8 calibration)."""
    parts, seen = [], 0
    for batch in loader:
        x = split_batch(batch, labels=False)[0][: n - seen]
        parts.append(x)
        seen += len(x)
        if seen >= n:
            break
    if not parts:
        raise DataError("the loader yields no images")
    return torch.cat(parts)
