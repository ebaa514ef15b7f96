"""The one cost model: parameters and multiply-adds of a layer in each form it can take.

Factorization (which rank still saves), export (which form to write into the graph), the MAC
count of a model and the compression rate all read their numbers from here: the formulas
below, which each factorized layer applies to its own shape (``LowRankLayer.costs``, asked
through :mod:`.factorized`, so that this module imports no layer).

A form's cost is ``(params, macs)``; ``macs`` counts one output token (linear) or one output
pixel (conv) unless the pixel counts are given. A Tucker-2 conv's 1×1 input projection runs at
the *input* resolution, ``stride²`` as many pixels as the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .factorized import factorized_modules, is_factorized

Cost = tuple[int, int]  # (parameters, multiply-adds)

LINEAR_FORMS = ("unmerged", "merged", "dense")
"""``unmerged`` x·V·Sᵀ·Uᵀ (three products, as trained); ``merged`` S folded into V (two); ``dense``."""
CONV_FORMS = ("tucker3", "fold_out", "fold_in", "dense")
"""``tucker3`` 1×1 → k×k → 1×1; ``fold_out`` core·U_out as one k×k conv; ``fold_in`` U_in folded
into the k×k conv; ``dense``."""


def linear_costs(n_in: int, n_out: int, r: int, *, bias: bool = False, tokens: int = 1) -> dict[str, Cost]:
    """Cost of a rank-``r`` linear layer in each of :data:`LINEAR_FORMS`."""
    b = n_out if bias else 0
    return {
        "unmerged": ((n_in + n_out) * r + r * r + b, tokens * ((n_in + n_out) * r + r * r)),
        "merged": ((n_in + n_out) * r + b, tokens * (n_in + n_out) * r),
        "dense": (n_in * n_out + b, tokens * n_in * n_out),
    }


def conv_costs(
    c_in: int,
    c_out: int,
    kernel_area: int,
    r_out: int,
    r_in: int,
    *,
    stride_area: int = 1,
    bias: bool = False,
    out_px: int = 1,
    in_px: int | None = None,
) -> dict[str, Cost]:
    """Cost of a Tucker-2 conv with ranks ``(r_out, r_in)`` in each of :data:`CONV_FORMS`.

    ``out_px`` output pixels; ``in_px`` input pixels seen by the 1×1 input projection
    (default ``stride_area · out_px``).
    """
    k, b = kernel_area, (c_out if bias else 0)
    in_px = stride_area * out_px if in_px is None else in_px
    return {
        "tucker3": (
            c_in * r_in + r_out * r_in * k + c_out * r_out + b,
            c_in * r_in * in_px + (r_out * r_in * k + c_out * r_out) * out_px,
        ),
        "fold_out": (c_in * r_in + c_out * r_in * k + b, c_in * r_in * in_px + c_out * r_in * k * out_px),
        "fold_in": (r_out * c_in * k + c_out * r_out + b, (r_out * c_in * k + c_out * r_out) * out_px),
        "dense": (c_out * c_in * k + b, c_out * c_in * k * out_px),
    }


def area2d(pair: int | tuple[int, ...]) -> int:
    """kh·kw of a kernel size (or sh·sw of a stride) given as an int or a pair."""
    if isinstance(pair, int):
        return pair * pair
    return int(pair[0]) * int(pair[1])


# ----------------------------------------------------------------------------- parameters


@dataclass
class CompressionStats:
    params: int
    params_dense: int

    @property
    def rate(self) -> float:
        """The paper's c.r. = (1 − #params low-rank / #params dense) × 100, at current ranks."""
        return (1.0 - self.params / self.params_dense) * 100.0 if self.params_dense else 0.0


def compression_stats(model: nn.Module) -> CompressionStats:
    """Parameters now, and of the dense model the factorized layers replaced (at current ranks)."""
    layers = factorized_modules(model).values()
    params = sum(p.numel() for p in model.parameters())
    dense = params - sum(lay.num_parameters() for lay in layers) + sum(lay.dense_num_parameters() for lay in layers)
    return CompressionStats(params, dense)


# ----------------------------------------------------------------------------- multiply-adds


def _infer_in_chans(model: nn.Module) -> int:
    mean = getattr(model, "mean", None)
    if isinstance(mean, torch.Tensor) and mean.dim() == 4:
        return int(mean.shape[1])
    for m in model.modules():
        if isinstance(m, nn.Conv2d) or (is_factorized(m) and issubclass(m.dense_type, nn.Conv2d)):
            return m.in_channels
    return 3


def count_macs(
    model: nn.Module, input_size: int, *, in_chans: int | None = None, dense_equivalent: bool = False
) -> int:
    """Multiply-adds of one image through the Conv2d/Linear layers and the factorized layers.

    Counted with forward hooks on a (1, C, input_size, input_size) input. A factorized layer
    counts its trained form (``costs(...)[trained_form]``: a TuckerConv2d its three
    convolutions, 1×1 at the input resolution, k×k, 1×1; a LowRankLinear its three products
    x·V, ·Sᵀ, ·Uᵀ). ``dense_equivalent=True`` counts every factorized layer as the dense layer
    it replaces: the dense model's MACs without building it. Other ops (norms, activations,
    attention products) are not counted.
    """
    return sum(macs_by_layer(model, input_size, in_chans=in_chans, dense_equivalent=dense_equivalent).values())


@torch.no_grad()
def macs_by_layer(
    model: nn.Module, input_size: int, *, in_chans: int | None = None, dense_equivalent: bool = False
) -> dict[str, int]:
    """{module name: multiply-adds for one image}, by the rules of :func:`count_macs`."""
    in_chans = in_chans or _infer_in_chans(model)
    totals: dict[str, int] = {}
    form = "dense" if dense_equivalent else None

    def macs(module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> int:
        if is_factorized(module):  # its own count, per sample: see LowRankLayer.sample_counts
            out_px, in_px = module.sample_counts(x, output)
            return module.costs(out_px=out_px, in_px=in_px)[form or module.trained_form][1]
        if isinstance(module, nn.Conv2d):
            total = output.numel() * (module.in_channels // module.groups) * area2d(module.kernel_size)
        else:  # nn.Linear
            total = output.numel() * module.in_features
        return total // max(1, output.shape[0])

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            totals[name] = totals.get(name, 0) + macs(module, inputs[0], output)

        return fn

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if is_factorized(m) or isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    param = next(model.parameters(), None)
    was = model.training
    model.eval()
    try:
        x = torch.zeros(
            1,
            in_chans,
            input_size,
            input_size,
            device=param.device if param is not None else None,
            dtype=param.dtype if param is not None and param.is_floating_point() else None,
        )
        model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return {k: int(v) for k, v in totals.items()}
