"""Activation-aware initial factors: bases from what the layers see, not only from their weights.

Plain SVD/HOSVD keeps the directions of largest *weight* energy. That is the right choice for
well-trained weights, whose spectra decay; weights still close to their random initialization
(a dense baseline trained for a few epochs, as offline runs here must use) have flat spectra, and
a rank-150 truncation of a 512-channel conv then throws away more than half of every layer's
weight energy. Compounded over VGG16's layers, this leaves a chance-level network that DLRT
has to retrain from scratch (BENCHMARKS.md, initialization).

Activations are far lower-rank than such weights (VGG16 on digits: the top 50 of 512 channel
directions hold ≥ 95 % of every layer's activation energy). So we choose the bases in the
metric of the data, from a few calibration batches run through the dense model:

- **Linear** ``y = W x``: the rank-r approximation minimizing E‖(W − W_r) x‖² is
  ``W_r = U Uᵀ W`` with U the top-r eigenvectors of the output second moment E[(Wx)(Wx)ᵀ]
  (Eckart–Young in the metric of C = E[xxᵀ]: [W C^½]_r C^-½ = U Uᵀ W). Then Wᵀ U = V R (QR)
  gives the factors ``U S Vᵀ`` with S = Rᵀ: U and V orthonormal, as DLRT needs.
- **Conv** (Tucker-2): U_in = top eigenvectors of the input-channel second moment (over batch
  and pixels); U_out = top eigenvectors of the output-channel second moment of the conv applied
  to the projected input ``U_in U_inᵀ x`` (the best output basis given that input basis);
  core = W ×₀ U_outᵀ ×₁ U_inᵀ, as in the HOSVD.

A mode whose rank reaches its algebraic cap (the layer's full rank, e.g. a 3→64 3×3 conv has
mode-0 rank ≤ 27) takes the weight's own singular vectors instead, so that a full-rank
factorization stays exact whatever the calibration data. Statistics are uncentered second
moments accumulated in float64; under torch.distributed they are pooled over processes
(:meth:`SecondMoment.gather`) so that every process derives its bases from the global batches.
The bases only initialize DLRT: from there on training is the same as after an SVD init.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import DataError
from .functional import (
    augment_basis,
    fix_signs,
    gram64,
    principal_subspace,
    svd,
    top_left_singular,
    truncation_rank,
    unfold,
)
from .layers.conv import tucker_rank_caps
from .layers.rank import resolve_rank
from .runtime import DistContext
from .runtime.batches import split_batch

log = logging.getLogger(__name__)


@dataclass
class LinearBases:
    """Initial output basis of a LowRankLinear (None: full rank, take the plain SVD)."""

    u: Tensor | None
    rank: int


@dataclass
class ConvBases:
    """Initial channel bases of a TuckerConv2d (U_out: C_out×r_out, U_in: C_in×r_in)."""

    u_out: Tensor
    u_in: Tensor


def _images(batch: Any) -> Tensor:
    try:
        return split_batch(batch, labels=False)[0]
    except DataError:
        raise DataError("calibration batches must be image tensors or (images, labels) pairs") from None


class SecondMoment:
    """Accumulates the uncentered second moment Σ xxᵀ of d-dimensional rows.

    While fewer rows than d have arrived it keeps the rows themselves (a linear layer's 4096
    outputs over 256 calibration images: 256×4096 instead of a 4096×4096 Gram, whose
    eigendecomposition costs far more than the thin SVD of the rows); beyond that, the d×d Gram in float64,
    accumulated over row chunks (no float64 copy of a large batch).
    """

    def __init__(self) -> None:
        self.rows: list[Tensor] = []
        self.n = self.d = 0
        self.gram: Tensor | None = None

    def add(self, rows: Tensor) -> None:
        rows = rows.detach()
        self.n, self.d = self.n + rows.shape[0], rows.shape[1]
        if self.gram is None and self.n < rows.shape[1]:
            self.rows.append(rows.to(torch.float64))
            return
        if self.gram is None:
            self._fold_rows()
        self.gram += gram64(rows.mT)

    def _fold_rows(self) -> None:
        self.gram = torch.zeros(self.d, self.d, dtype=torch.float64, device=self.rows[0].device if self.rows else None)
        for kept in self.rows:
            self.gram.addmm_(kept.mT, kept)
        self.rows = []

    def gather(self, dist: DistContext | None) -> None:
        """Make this the moment of every process's rows together (under torch.distributed)."""
        if dist is None or not dist.enabled:
            return
        device = self.gram.device if self.gram is not None else self.rows[0].device
        info = torch.zeros(dist.world_size + 1, dtype=torch.float64, device=device)
        info[dist.rank] = self.n  # this process's row count in its slot
        info[-1] = float(self.gram is not None)
        info = dist.all_reduce_sum(info)
        counts, any_gram = [int(c) for c in info[:-1].tolist()], bool(info[-1] > 0)
        if any_gram or sum(counts) >= self.d:  # sum the Grams (rows still held are folded first)
            if self.gram is None:
                self._fold_rows()
            self.gram = dist.all_reduce_sum(self.gram)
        else:  # all-gather the rows through one sum: each process fills its own slot
            slots = torch.zeros(sum(counts), self.d, dtype=torch.float64, device=device)
            start = sum(counts[: dist.rank])
            slots[start : start + self.n] = torch.cat(self.rows)
            self.rows = [dist.all_reduce_sum(slots)]
        self.n = sum(counts)

    def principal(self, rank: int, fill: Callable[[int], Tensor]) -> tuple[Tensor, Tensor]:
        """Top ``rank`` eigenvectors and the eigenvalues (descending, padded with zeros to d)
        of the moment.

        From rows Y (n×d): the right singular vectors of Y. If fewer than ``rank`` directions
        carry data (fewer rows, or eigenvalues at round-off level: dead or constant units), the
        basis is completed with directions from ``fill(k)`` (d×k, the range of the weight)
        orthogonal to them: they hold no calibration energy, so any choice is as good for the
        data, and directions the weight can produce keep the core free of zero rows.
        """
        if self.gram is not None:
            basis, lam = principal_subspace(self.gram, rank)
        else:
            _, sigma, vh = svd(torch.cat(self.rows))
            basis, lam = fix_signs(vh.mT[:, :rank]), sigma.square()
        lam = torch.cat([lam, lam.new_zeros(max(0, self.d - lam.numel()))])
        carrying = int((lam[:rank] > 1e-10 * lam[0].clamp_min(1e-300)).sum()) if lam.numel() else 0
        if carrying < rank:
            basis = augment_basis(basis[:, :carrying], fill(rank - carrying).to(basis.dtype), rank)
        return basis, lam


def _channel_rows(t: Tensor) -> Tensor:
    """(N, C, H, W) → (N·H·W, C): one row per pixel."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def _run(model: nn.Module, batches: list[Tensor], hooks: dict[nn.Module, Callable]) -> None:
    handles = [m.register_forward_hook(h) for m, h in hooks.items()]
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()


def activation_bases(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calibration: Iterable[Any],
    *,
    init_rank: int | float | None,
    init_tol: float | None,
    r_min: int,
    r_max: int | Mapping[str, int],
    max_batches: int = 8,
    dist: DistContext | None = None,
    seed: int = 0,
) -> dict[str, LinearBases | ConvBases]:
    """Initial bases for ``layers`` (name → nn.Linear / nn.Conv2d of ``model``), see the module doc.

    Runs at most ``max_batches`` of ``calibration`` through ``model`` twice (inputs, then the
    projected conv outputs) in eval mode; the model's modes are restored. Ranks: ``init_tol``
    (energy of the activation spectrum: smallest r with ‖λ[r:]^½‖ < init_tol·‖λ^½‖) or
    ``init_rank``, clipped to [r_min, min(r_max, the mode's cap)]; ``r_max`` may be given per
    layer (name → cap). ``dist``: a
    :class:`~compressor.train.DistContext`; the statistics are then those of all processes.
    """
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    batches: list[Tensor] = []
    for batch in calibration:
        batches.append(_images(batch).to(device))
        if len(batches) >= max_batches:
            break
    if _any_process(dist, not batches):  # every process raises, none waits in a collective
        raise DataError("no calibration batches: the loader is empty")
    caps = {n: r_max[n] if isinstance(r_max, Mapping) else r_max for n in layers}
    convs = {n: m for n, m in layers.items() if isinstance(m, nn.Conv2d)}
    linears = {n: m for n, m in layers.items() if isinstance(m, nn.Linear)}
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # BatchNorm statistics and dropout must not change during calibration
    try:
        # pass 1: input-channel moments of convs, output moments of linears (W x, no bias)
        first = {n: SecondMoment() for n in layers}

        def conv_in(name: str):
            return lambda m, inp, out: first[name].add(_channel_rows(inp[0]))

        def linear_out(name: str):
            def hook(m, inp, out):
                y = out if m.bias is None else out - m.bias
                first[name].add(y.reshape(-1, y.shape[-1]))

            return hook

        _run(
            model,
            batches,
            {**{m: conv_in(n) for n, m in convs.items()}, **{m: linear_out(n) for n, m in linears.items()}},
        )
        unused = sorted(n for n in sorted(first) if _any_process(dist, first[n].n == 0))
        if unused:  # never called in forward (an auxiliary head, say): SVD of the weights instead
            log.info("no activations reached %s: their initial bases come from the weights' SVD", ", ".join(unused))
            convs = {n: m for n, m in convs.items() if n not in unused}
            linears = {n: m for n, m in linears.items() if n not in unused}
        for name in sorted(set(convs) | set(linears)):  # the same order on every process
            first[name].gather(dist)

        out: dict[str, LinearBases | ConvBases] = {}
        for name, lin in linears.items():
            out[name] = _linear_bases(lin, first[name], init_rank, init_tol, r_min, caps[name], seed)
        u_in = {
            name: _mode_basis(conv, 1, first[name], init_rank, init_tol, r_min, caps[name], seed)
            for name, conv in convs.items()
        }

        # pass 2: output-channel moments of each conv applied to its projected input
        second = {n: SecondMoment() for n in convs}

        def conv_out(name: str):
            u = u_in[name]

            def hook(m, inp, out):
                w_in = torch.tensordot(m.weight.detach(), u.to(m.weight.dtype), dims=([1], [0])).movedim(3, 1)
                z = torch.einsum("nchw,cr->nrhw", inp[0], u.to(inp[0].dtype))  # U_inᵀ x
                y = F.conv2d(z, w_in, None, m.stride, m.padding, m.dilation)  # W ∗ (U_in U_inᵀ x)
                second[name].add(_channel_rows(y))

            return hook

        if convs:
            _run(model, batches, {m: conv_out(n) for n, m in convs.items()})
            for name in sorted(second):
                second[name].gather(dist)
        for name, conv in convs.items():
            out[name] = ConvBases(
                _mode_basis(conv, 0, second[name], init_rank, init_tol, r_min, caps[name], seed), u_in[name]
            )
    finally:
        for m, training in modes:
            m.training = training
    log.info("activation-aware bases for %d layers from %d calibration batches", len(out), len(batches))
    return out


def _any_process(dist: DistContext | None, flag: bool) -> bool:
    """``flag`` on any process (under torch.distributed every process takes the same branch)."""
    return dist.any(flag) if dist is not None else flag


def _rank(
    spectrum: Tensor, full: int, cap: int, init_rank: int | float | None, init_tol: float | None, r_min: int
) -> int:
    r = resolve_rank(init_rank, full, r_min, cap)  # with init_tol: the most the energy rule may keep
    if init_tol is not None:
        r = truncation_rank(spectrum.clamp_min(0).sqrt(), init_tol, r_min, r)
    return r


def _range_sketch(matrix: Tensor, k: int, seed: int) -> Tensor:
    """k random vectors in the range of ``matrix`` (m×n): matrix @ Ω, Ω seeded Gaussian."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(matrix.shape[1], k, generator=gen, dtype=matrix.dtype).to(matrix.device)
    return matrix @ omega


def _linear_bases(
    linear: nn.Linear, moment: SecondMoment, init_rank, init_tol, r_min: int, r_max: int, seed: int
) -> LinearBases:
    w = linear.weight.detach()
    full = min(w.shape)
    cap = min(r_max, full)
    u, lam = moment.principal(cap, lambda k: _range_sketch(w, k, seed))
    r = _rank(lam, full, cap, init_rank, init_tol, r_min)
    if r >= full:  # full rank: the plain SVD is exact
        return LinearBases(None, r)
    return LinearBases(u[:, :r].to(w.dtype), r)


def _mode_basis(
    conv: nn.Conv2d, mode: int, moment: SecondMoment, init_rank, init_tol, r_min: int, r_max: int, seed: int
) -> Tensor:
    """Top eigenvectors of a channel moment (mode 0: output, 1: input channels); at the mode's
    algebraic cap the kernel's own singular vectors, so that full rank stays exact."""
    w = conv.weight.detach()
    caps = tucker_rank_caps(conv.out_channels, conv.in_channels, conv.kernel_size, r_max)
    cap, channels = caps[mode], w.shape[mode]
    unfolded = unfold(w, mode)
    u, lam = moment.principal(cap, lambda k: _range_sketch(unfolded, k, seed + mode))
    r = _rank(lam, channels, cap, init_rank, init_tol, r_min)
    if r >= min(unfolded.shape):
        return top_left_singular(unfolded, r, seed=seed + mode)[0]
    return u[:, :r].to(w.dtype)


__all__ = ["ConvBases", "LinearBases", "SecondMoment", "activation_bases"]
