"""TuckerConv2d: a conv kernel in Tucker-2 form on its channel modes.

W (C_out×C_in×kh×kw) = C ×₀ U_out ×₁ U_in with orthonormal U_out (C_out×r_out),
U_in (C_in×r_in) and a core C (r_out×r_in×kh×kw). The spatial modes stay full (the reference
code's fixed k×k orthogonal spatial factors are folded into the core).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import WeightsError
from ..functional import (
    augment_basis,
    hosvd_channel_factors,
    left_singular,
    mode_product,
    rank_spectrum,
    singular_values,
    truncation_rank,
    unfold,
)
from ..runtime.costs import CONV_FORMS, Cost, area2d, conv_costs
from .base import BasisChange, LowRankLayer
from .plain import plain_conv
from .protocol import LatencyKey
from .rank import resolve_rank


def tucker_rank_caps(
    out_channels: int, in_channels: int, kernel_size: tuple[int, int], r_max: int | None = None
) -> tuple[int, int]:
    """Largest useful (r_out, r_in): a mode's rank is bounded by its channels, by the other
    unfolding dimension (the mode-0 unfolding is C_out × C_in·kh·kw, so a 3→64 3×3 conv has
    Tucker rank ≤ 27 on mode 0) and by the user's ``r_max``."""
    kh, kw = kernel_size
    cap_out = min(out_channels, in_channels * kh * kw)
    cap_in = min(in_channels, out_channels * kh * kw)
    if r_max is not None:
        cap_out, cap_in = min(cap_out, r_max), min(cap_in, r_max)
    return cap_out, cap_in


def to_channels_last(x: Tensor) -> Tensor:
    """``x`` in the layout TuckerConv2d runs in (``channels_last``): NHWC for a 4-D tensor
    other than float64 (which stays NCHW); anything else unchanged. The trainer feeds its
    batches through it too (see Trainer.channels_last_input)."""
    if x.dim() == 4 and x.dtype != torch.float64:
        return x.contiguous(memory_format=torch.channels_last)
    return x


class TuckerConv2d(LowRankLayer):
    """Three plain convolutions: 1×1 C_in→r_in, k×k r_in→r_out (original stride, padding,
    dilation), 1×1 r_out→C_out adding the bias once (the reference adds it twice).

    ``channels_last`` (default True): run the three convs in NHWC and hand the output on in
    that layout, as torch's own convs do for a channels-last input. Set it to False (or
    ``factorize_(..., channels_last=False)``) for a model that calls ``x.view(n, -1)`` on conv
    outputs instead of ``flatten``/``reshape``: NCHW in, NCHW out, at the price of the layout
    reorders that NHWC avoids.

    Forms (:data:`~compressor.runtime.costs.CONV_FORMS`): ``tucker3``, the three convs as
    trained; ``fold_out`` (core·U_out: one k×k conv r_in→C_out after the 1×1), ``fold_in``
    (U_in folded into the strided k×k conv C_in→r_out before the 1×1) and ``dense``: the export
    takes one of the last three where it is cheaper, which needs a rank near its channel count.
    """

    kind = "conv"
    dense_type = nn.Conv2d
    n_modes = 2
    forms = CONV_FORMS
    trained_form = "tucker3"
    export_forms = CONV_FORMS
    channels_last: bool = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        ranks: tuple[int, int],
        *,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        r_min: int = 1,
        r_max: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        # Each channel mode has its own cap; r_max is the user's bound on both.
        self.r_max_out, self.r_max_in = tucker_rank_caps(out_channels, in_channels, self.kernel_size, r_max)
        self.r_max = max(self.r_max_out, self.r_max_in)
        self.r_min = min(r_min, self.r_max_out, self.r_max_in)
        r_out, r_in = ranks
        kh, kw_ = self.kernel_size
        self.U_out = nn.Parameter(torch.empty(out_channels, r_out, **kw), requires_grad=False)
        self.C = nn.Parameter(torch.empty(r_out, r_in, kh, kw_, **kw))
        self.U_in = nn.Parameter(torch.empty(in_channels, r_in, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_channels, **kw)) if bias else None
        self.register_buffer("rank_state", torch.tensor([r_out, r_in], dtype=torch.long))
        self.register_buffer("rank_bounds", torch.tensor([self.r_min, self.r_max], dtype=torch.long))

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        rank: int | float | tuple[int, int] | None = None,
        *,
        tol: float | None = None,
        r_min: int = 1,
        r_max: int | None = None,
        seed: int = 0,
    ) -> TuckerConv2d:
        """HOSVD on modes 0 and 1 (reduced SVDs of the unfoldings), core = W ×₀ U_outᵀ ×₁ U_inᵀ."""
        if conv.groups != 1:
            raise ValueError("grouped/depthwise convolutions are not factorized (leave them dense)")
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
        w = conv.weight.detach()
        c_out, c_in = w.shape[:2]
        cap_out, cap_in = tucker_rank_caps(c_out, c_in, conv.kernel_size, r_max)
        rank_out, rank_in = rank if isinstance(rank, tuple) else (rank, rank)
        r_out = resolve_rank(rank_out, c_out, r_min, cap_out)  # with tol: the most the energy rule may keep
        r_in = resolve_rank(rank_in, c_in, r_min, cap_in)
        if tol is not None:
            r_out = truncation_rank(rank_spectrum(unfold(w, 0), r_out, seed=seed), tol, r_min, r_out)
            r_in = truncation_rank(rank_spectrum(unfold(w, 1), r_in, seed=seed + 1), tol, r_min, r_in)
        u_out, u_in, core = hosvd_channel_factors(w, r_out, r_in, seed=seed)
        return cls._from_factors(conv, u_out, core, u_in, r_min=r_min, r_max=r_max)

    @classmethod
    def from_bases(
        cls, conv: nn.Conv2d, u_out: Tensor, u_in: Tensor, *, r_min: int = 1, r_max: int | None = None
    ) -> TuckerConv2d:
        """Given orthonormal channel bases U_out (C_out×r_out), U_in (C_in×r_in): core = W ×₀ U_outᵀ ×₁ U_inᵀ.

        Used with activation-aware bases (:mod:`compressor.calibration`); exact when both bases
        span the kernel's mode-0 and mode-1 column spaces (e.g. at full rank).
        """
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("only plain (groups=1, zero-padded) convolutions are factorized")
        w = conv.weight.detach()
        u_out, u_in = u_out.to(w.dtype), u_in.to(w.dtype)
        return cls._from_factors(conv, u_out, mode_product(w, u_out, u_in), u_in, r_min=r_min, r_max=r_max)

    @classmethod
    def _from_factors(
        cls, conv: nn.Conv2d, u_out: Tensor, core: Tensor, u_in: Tensor, *, r_min: int, r_max: int | None
    ) -> TuckerConv2d:
        layer = cls.empty_like(conv, (core.shape[0], core.shape[1]), r_min, r_max)
        with torch.no_grad():
            layer.U_out.copy_(u_out)
            layer.U_in.copy_(u_in)
            layer.C.copy_(core)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    # x: (N, C_in, H, W) → (N, r_in, H, W) → (N, r_out, H', W') → (N, C_out, H', W')
    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            # In NHWC the 1×1s are plain GEMMs over the contiguous channel axis and oneDNN
            # skips its layout reorders. The output stays channels-last: converting it back
            # would copy every activation (and its gradient in the backward), and the next
            # factorized layer would only convert it again.
            x = to_channels_last(x)
        h = F.conv2d(x, self.U_in.mT[:, :, None, None])
        h = F.conv2d(h, self.C, None, self.stride, self.padding, self.dilation)
        return F.conv2d(h, self.U_out[:, :, None, None], self.bias)

    # -- interface --------------------------------------------------------------
    @property
    def core(self) -> nn.Parameter:
        return self.C

    def bases(self) -> list[nn.Parameter]:
        return [self.U_out, self.U_in]

    def core_matrix(self) -> Tensor:
        # The paper's regularizer and κ act on the mode-0 unfolding C₍₀₎ (r_out × r_in·kh·kw);
        # with orthonormal factors κ(W₍₀₎) = κ(C₍₀₎).
        return unfold(self.C, 0)

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.C.shape[0], self.C.shape[1])

    def augment_(self, *, seed: int = 0) -> BasisChange:
        """Augment both channel bases with their gradients; the core is zero-padded (W unchanged)."""
        if self.U_out.grad is None or self.U_in.grad is None:
            raise RuntimeError(
                "augment_ needs U_out.grad and U_in.grad: call set_bases_trainable(True) before backward"
            )
        r_out, r_in = self.ranks
        n_out, n_in = min(2 * r_out, self.r_max_out), min(2 * r_in, self.r_max_in)
        with torch.no_grad():
            u_out = augment_basis(self.U_out, self.U_out.grad, n_out, seed=seed)
            u_in = augment_basis(self.U_in, self.U_in.grad, n_in, seed=seed + 1)
            change = BasisChange.zero_padding((r_out, r_in), (n_out, n_in), self.C)  # U_oldᵀÛ = [I | 0]
            self._set(u_out, change.apply(self.C), u_in)
        return change

    def truncate_(
        self, tau: float, *, reorthonormalize_bases: bool = True, rank_cap: tuple[int, ...] | None = None
    ) -> BasisChange:
        """Per channel mode: SVD of that mode's unfolding of the core, keep by τ (at most
        ``rank_cap``, a budget's choice of (r_out, r_in)), project the core.

        The new bases are U·P with P the kept singular vectors, corrected to orthonormal in
        float64 (``orthonormal_columns``). ``reorthonormalize_bases`` also re-factors the tall
        U·P (Cholesky QR, its R folded into the core), clearing the round-off U has gathered,
        ~1e-8 a cycle; the trainer does it at every 8th truncation of a run and skips it
        otherwise: eight cycles of drift stay far below float32's ~1e-6 orthonormality, while
        each re-factorization is a Gram and a product over the tall bases.
        """
        with torch.no_grad():
            work = torch.float64 if self.C.dtype == torch.float64 else torch.float32
            core = self.C.to(work)
            # only P and σ (the right factors are never used), σ only for the rank rule at τ
            p0, s0 = left_singular(unfold(core, 0), tol=tau)
            p1, s1 = left_singular(unfold(core, 1), tol=tau)
            r0 = truncation_rank(s0, tau, self.r_min, self.r_max_out)
            r1 = truncation_rank(s1, tau, self.r_min, self.r_max_in)
            if rank_cap is not None:
                r0, r1 = max(self.r_min, min(r0, int(rank_cap[0]))), max(self.r_min, min(r1, int(rank_cap[1])))
            p0, p1, r0, r1 = self._reachable_ranks(core, p0, p1, r0, r1, tau)
            change, u_out, u_in = BasisChange.truncation(
                self.U_out.to(work), self.U_in.to(work), p0[:, :r0], p1[:, :r1], refactor=reorthonormalize_bases
            )
            dt = self.C.dtype
            self._set(u_out.to(dt), change.apply(core).to(dt), u_in.to(dt))
        return change

    def _reachable_ranks(
        self, core: Tensor, p0: Tensor, p1: Tensor, r0: int, r1: int, tau: float
    ) -> tuple[Tensor, Tensor, int, int]:
        """Bases and ranks with each mode within what the other leaves reachable.

        Once mode 1 keeps r1 directions, the core's mode-0 unfolding is r_out × r1·kh·kw: its
        rank is at most r1·kh·kw, and directions of U_out beyond it carry nothing but make the
        core's spectrum singular (κ unbounded, and a regularizer on it cannot help). A budget
        that cuts one mode hard (e.g. where the export folds the core into U_out, whose rank
        then costs nothing) reaches this; τ alone hardly ever does. The capped mode is then
        taken from the core already projected on the other mode's kept basis, which keeps all
        of its energy (sequential truncation, as ST-HOSVD); a bound below r_min is left alone.
        """
        area = self.kernel_size[0] * self.kernel_size[1]
        if self.r_min <= r1 * area < r0:  # core ×₁ P1ᵀ, then its mode-0 basis
            projected = torch.tensordot(p1[:, :r1], core, dims=([0], [1])).transpose(0, 1)
            p0, _ = left_singular(unfold(projected, 0), tol=tau)
            r0 = r1 * area
        elif self.r_min <= r0 * area < r1:  # core ×₀ P0ᵀ, then its mode-1 basis
            p1, _ = left_singular(unfold(torch.tensordot(p0[:, :r0], core, dims=([0], [0])), 1), tol=tau)
            r1 = r0 * area
        return p0, p1, r0, r1

    def set_ranks_(self, ranks: tuple[int, ...]) -> None:
        r_out, r_in = ranks
        self._set(
            self.U_out.new_zeros(self.out_channels, r_out),
            self.C.new_zeros(r_out, r_in, *self.kernel_size),
            self.U_in.new_zeros(self.in_channels, r_in),
        )

    def _set(self, u_out: Tensor, core: Tensor, u_in: Tensor) -> None:
        for p, val in ((self.U_out, u_out), (self.C, core), (self.U_in, u_in)):
            # Same Parameter object, new shape: optimizer param groups stay valid. (A graph
            # built before the change must not be backpropagated after it.)
            p.grad = None
            p.data = val.contiguous()
        self._store_ranks()

    def to_dense(self) -> nn.Conv2d:
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.bias is not None,
            device=self.C.device,
            dtype=self.C.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(mode_product(self.C, self.U_out.mT, self.U_in.mT))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def dense_num_parameters(self) -> int:
        kh, kw = self.kernel_size
        return self.out_channels * self.in_channels * kh * kw + (self.out_channels if self.bias is not None else 0)

    # -- protocol (see .protocol) ------------------------------------------------------
    def costs(
        self, ranks: tuple[int, ...] | None = None, *, out_px: int = 1, in_px: int | None = None
    ) -> dict[str, Cost]:
        """:func:`~compressor.runtime.costs.conv_costs`; ``in_px`` defaults to stride² · ``out_px``."""
        r_out, r_in = self.ranks if ranks is None else ranks
        return conv_costs(
            self.in_channels,
            self.out_channels,
            area2d(self.kernel_size),
            r_out,
            r_in,
            stride_area=area2d(self.stride),
            bias=self.bias is not None,
            out_px=out_px,
            in_px=in_px,
        )

    def sample_counts(self, inputs: Tensor, output: Tensor) -> tuple[int, int]:
        return output.shape[-2] * output.shape[-1], inputs.shape[-2] * inputs.shape[-1]

    @torch.no_grad()
    def export_module(self, form: str) -> nn.Module:
        f32 = torch.float32
        bias = self.bias.detach().to(f32) if self.bias is not None else None
        u_out, core, u_in = (t.detach().double() for t in (self.U_out, self.C, self.U_in))
        spatial = {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}
        first = u_in.mT[:, :, None, None].to(f32)  # r_in × C_in × 1 × 1
        last = u_out[:, :, None, None].to(f32)  # C_out × r_out × 1 × 1
        if form == "tucker3":
            return nn.Sequential(
                plain_conv(first, None), plain_conv(core.to(f32), None, **spatial), plain_conv(last, bias)
            )
        if form == "fold_out":
            folded = torch.einsum("oa,aihw->oihw", u_out, core).to(f32)
            return nn.Sequential(plain_conv(first, None), plain_conv(folded, bias, **spatial))
        if form == "fold_in":
            folded = torch.einsum("abhw,cb->achw", core, u_in).to(f32)
            return nn.Sequential(plain_conv(folded, None, **spatial), plain_conv(last, bias))
        if form == "dense":
            return plain_conv(torch.einsum("oa,abhw,cb->ochw", u_out, core, u_in).to(f32), bias, **spatial)
        raise ValueError(f"unknown form {form!r} for a {self.kind} layer (expected one of {self.forms})")

    def manifest_entry(self) -> dict[str, Any]:
        return {**super().manifest_entry(), "channels_last": bool(self.channels_last)}

    def apply_manifest_entry_(self, entry: Any) -> None:
        if "channels_last" in entry:
            self.channels_last = bool(entry["channels_last"])

    @classmethod
    def empty_like(cls, dense: nn.Module, ranks: Sequence[int], r_min: int, r_max: int | None) -> TuckerConv2d:
        if not isinstance(dense, nn.Conv2d):
            raise WeightsError(f"expected an nn.Conv2d to factorize, found {type(dense).__name__}")
        if dense.groups != 1 or dense.padding_mode != "zeros":
            raise WeightsError(
                f"conv with groups={dense.groups}, padding_mode={dense.padding_mode!r} cannot be a TuckerConv2d"
            )
        r_out, r_in = (int(r) for r in ranks)
        if not (1 <= r_out <= dense.out_channels and 1 <= r_in <= dense.in_channels):
            raise WeightsError(
                f"ranks {list(ranks)} exceed the conv's channels ({dense.out_channels}, {dense.in_channels})"
            )
        return cls(
            dense.in_channels,
            dense.out_channels,
            dense.kernel_size,
            (r_out, r_in),
            stride=dense.stride,
            padding=dense.padding,
            dilation=dense.dilation,
            **cls._options_like(dense, r_min, r_max),
        )

    @classmethod
    def factor_ranks(cls, ranks: Sequence[int]) -> dict[str, tuple[int, int]]:
        return {"C": (0, ranks[0]), "U_out": (1, ranks[0]), "U_in": (1, ranks[1])}

    @classmethod
    def stored_factor_error(cls, name: str, ranks: Sequence[int], header: Any) -> str | None:
        error = super().stored_factor_error(name, ranks, header)
        if error is None and header[f"{name}.C"]["shape"][1:2] != [ranks[1]]:
            error = (
                f"tensor {name}.C has shape {header[f'{name}.C']['shape']}, expected ranks {ranks} as the manifest says"
            )
        return error

    @property
    def rank_caps(self) -> tuple[int, ...]:
        return (self.r_max_out, self.r_max_in)

    def spectra(self) -> list[Tensor]:
        core = self.C.detach().float()
        return [singular_values(unfold(core, 0)), singular_values(unfold(core, 1))]

    @classmethod
    def full_rank(cls, dense: nn.Module) -> int:
        return max(tucker_rank_caps(dense.out_channels, dense.in_channels, dense.kernel_size))

    @classmethod
    def saves(cls, dense: nn.Module, r: int) -> bool:
        cap_o, cap_i = tucker_rank_caps(dense.out_channels, dense.in_channels, dense.kernel_size, r)
        kh, kw = dense.kernel_size
        sh, sw = dense.stride
        costs = conv_costs(dense.in_channels, dense.out_channels, kh * kw, cap_o, cap_i, stride_area=sh * sw)
        (p_fact, m_fact), (p_dense, m_dense) = costs["tucker3"], costs["dense"]
        return p_fact < p_dense and m_fact < m_dense

    @classmethod
    def unsupported(cls, dense: nn.Module) -> str | None:
        if dense.groups != 1:
            return "grouped/depthwise conv"
        if dense.padding_mode != "zeros":
            return f"padding_mode {dense.padding_mode!r}"
        return None

    @classmethod
    def from_calibrated(
        cls, dense: nn.Module, bases: Any, *, r_min: int, r_max: int, seed: int
    ) -> tuple[TuckerConv2d, str]:
        """From the channel bases of :class:`~compressor.calibration.ConvBases`."""
        return cls.from_bases(dense, bases.u_out, bases.u_in, r_min=r_min, r_max=r_max), "activations"

    def latency_key(self, input_shape: Sequence[int]) -> LatencyKey:
        def pair(v: Any) -> Any:
            return v if isinstance(v, str) else tuple(int(x) for x in (v if isinstance(v, tuple) else (v, v)))

        shape = (
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("kernel", pair(self.kernel_size)),
            ("stride", pair(self.stride)),
            ("padding", pair(self.padding)),
            ("dilation", pair(self.dilation)),
            ("input", (int(input_shape[-2]), int(input_shape[-1]))),
            ("bias", self.bias is not None),
        )
        return LatencyKey(self.kind, shape)

    def set_channels_last_(self, flag: bool) -> None:
        self.channels_last = bool(flag)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, ranks={self.ranks}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"r_min={self.r_min}, r_max={self.r_max}, bias={self.bias is not None}"
        )
