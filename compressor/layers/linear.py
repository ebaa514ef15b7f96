"""LowRankLinear: W = U S Vᵀ with orthonormal U (out×r), V (in×r) and a small core S (r×r)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import WeightsError
from ..functional import (
    augment_basis,
    gram_suffices,
    left_singular,
    qr_positive,
    rank_spectrum,
    svd,
    top_singular,
    truncation_rank,
)
from ..runtime.costs import LINEAR_FORMS, Cost, linear_costs
from .base import BasisChange, LowRankLayer
from .plain import plain_linear
from .protocol import LatencyKey
from .rank import resolve_rank


class LowRankLinear(LowRankLayer):
    """Factorized linear layer (paper §2); forward never forms W.

    Forms (:data:`~compressor.runtime.costs.LINEAR_FORMS`): ``unmerged`` x·V·Sᵀ·Uᵀ, three
    products, as trained; ``merged`` x·(V Sᵀ)·Uᵀ, S folded into the first factor: r² fewer
    weights and MACs, the same result up to float rounding (a re-association); ``dense``, W.
    The export chooses between ``merged`` and ``dense`` (dense when in·out ≤ (in+out)·r).
    """

    kind = "linear"
    dense_type = nn.Linear
    n_modes = 1
    forms = LINEAR_FORMS
    trained_form = "unmerged"
    export_forms = ("merged", "dense")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        bias: bool = True,
        r_min: int = 1,
        r_max: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        full = min(in_features, out_features)
        self.r_max = min(r_max or full, full)
        self.r_min = min(r_min, self.r_max)
        if not 1 <= rank <= full:
            raise ValueError(f"rank {rank} outside [1, {full}] for a {out_features}×{in_features} layer")
        self.U = nn.Parameter(torch.empty(out_features, rank, **kw), requires_grad=False)
        self.S = nn.Parameter(torch.empty(rank, rank, **kw))
        self.V = nn.Parameter(torch.empty(in_features, rank, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.register_buffer("rank_state", torch.tensor([rank], dtype=torch.long))
        self.register_buffer("rank_bounds", torch.tensor([self.r_min, self.r_max], dtype=torch.long))

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        rank: int | float | None = None,
        *,
        tol: float | None = None,
        r_min: int = 1,
        r_max: int | None = None,
        seed: int = 0,
    ) -> LowRankLinear:
        """Truncated SVD of the trained weight: U, V = leading singular vectors, S = diag(σ).

        ``rank``: int, or a float fraction of full rank (None: r_max); ``tol``: the smallest rank
        keeping ‖σ[r:]‖ < tol·‖σ‖, at most ``rank``.
        At full rank the layer reproduces ``linear`` to round-off.
        """
        w = linear.weight.detach()
        full = min(w.shape)
        r_cap = min(r_max or full, full)
        r = resolve_rank(rank, full, r_min, r_cap)  # with tol: the most the energy rule may keep
        if tol is not None:
            r = truncation_rank(rank_spectrum(w, r, seed=seed), tol, r_min, r)
        u, s, v = top_singular(w, r, seed=seed)
        return cls._from_factors(linear, u, torch.diag(s), v, r_min=r_min, r_max=r_cap)

    @classmethod
    def from_output_basis(
        cls, linear: nn.Linear, u: Tensor, *, r_min: int = 1, r_max: int | None = None
    ) -> LowRankLinear:
        """W ≈ U Uᵀ W for a given orthonormal output basis U (out×r): the factors of Uᵀ W.

        Wᵀ U = V R (QR) gives U S Vᵀ = U Uᵀ W with S = Rᵀ and V orthonormal. With U from the
        output activations this is the best rank-r approximation in the data's metric
        (:mod:`compressor.calibration`).
        """
        w = linear.weight.detach()
        v, r = qr_positive(w.mT @ u.to(w.dtype))  # a general matrix: Householder
        full = min(w.shape)
        return cls._from_factors(linear, u.to(w.dtype), r.mT, v, r_min=r_min, r_max=min(r_max or full, full))

    @classmethod
    def _from_factors(
        cls, linear: nn.Linear, u: Tensor, s: Tensor, v: Tensor, *, r_min: int, r_max: int
    ) -> LowRankLinear:
        layer = cls.empty_like(linear, (u.shape[1],), r_min, r_max)
        with torch.no_grad():
            layer.U.copy_(u)
            layer.S.copy_(s)
            layer.V.copy_(v)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    # x: (..., in) → (..., r) → (..., r) → (..., out)
    def forward(self, x: Tensor) -> Tensor:
        h = F.linear(x, self.V.mT)
        h = F.linear(h, self.S)
        return F.linear(h, self.U, self.bias)

    # -- interface --------------------------------------------------------------
    @property
    def core(self) -> nn.Parameter:
        return self.S

    def bases(self) -> list[nn.Parameter]:
        return [self.U, self.V]

    def core_matrix(self) -> Tensor:
        return self.S

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.S.shape[0],)

    def augment_(self, *, seed: int = 0) -> BasisChange:
        """Û = orth([U | ∂L/∂U]), V̂ = orth([V | ∂L/∂V]) at rank min(2r, r_max) (eq. 7).

        Needs the gradients of U and V from a backward pass with ``set_bases_trainable(True)``.
        """
        if self.U.grad is None or self.V.grad is None:
            raise RuntimeError("augment_ needs U.grad and V.grad: call set_bases_trainable(True) before backward")
        r = self.ranks[0]
        new = min(2 * r, self.r_max)
        with torch.no_grad():
            u_hat = augment_basis(self.U, self.U.grad, new, seed=seed)
            v_hat = augment_basis(self.V, self.V.grad, new, seed=seed + 1)
            change = BasisChange.zero_padding((r, r), (new, new), self.S)  # UᵀÛ = [I | 0]
            s_hat = change.apply(self.S)
            self._set(u_hat, s_hat, v_hat)
        return change

    def truncate_(
        self, tau: float, *, reorthonormalize_bases: bool = True, rank_cap: tuple[int, ...] | None = None
    ) -> BasisChange:
        """SVD Ŝ = P Σ Qᵀ; keep the smallest r₁ with ‖σ[r₁:]‖ < τ‖σ‖, r₁ ∈ [r_min, r_max], at most
        ``rank_cap`` (a budget's choice, :mod:`compressor.train.budget`).

        New bases U·P₁, V·Q₁ (P₁, Q₁ corrected to orthonormal in float64); ``reorthonormalize_bases``
        as in :meth:`TuckerConv2d.truncate_`. Where τ allows it (``gram_suffices``), P and Q come
        from the eigendecompositions of ŜŜᵀ and ŜᵀŜ, as a conv core's modes do, σ from the first:
        two symmetric eigendecompositions cost less than the SVD's bidiagonalization.
        """
        with torch.no_grad():
            work = torch.float64 if self.S.dtype == torch.float64 else torch.float32
            s_work = self.S.to(work)
            if gram_suffices(tau, s_work.shape[0], work):
                (p, sigma), (q, _) = left_singular(s_work, tol=tau), left_singular(s_work.mT, tol=tau)
            else:
                p, sigma, qh = svd(s_work)
                q = qh.mT
            r1 = truncation_rank(sigma, tau, self.r_min, self.r_max)
            if rank_cap is not None:
                r1 = max(self.r_min, min(r1, int(rank_cap[0])))
            change, u, v = BasisChange.truncation(
                self.U.to(work), self.V.to(work), p[:, :r1], q[:, :r1], refactor=reorthonormalize_bases
            )
            dt = self.S.dtype
            self._set(u.to(dt), change.apply(s_work).to(dt), v.to(dt))
        return change

    @property
    def weight(self) -> Tensor:
        """The dense W = U S Vᵀ (out × in), differentiable in S: for code that reads a layer's
        ``.weight`` instead of calling it (e.g. torchvision's Swin attention). It costs the
        dense layer's multiply-adds; calling the layer does not."""
        return self.U @ self.S @ self.V.mT

    def set_ranks_(self, ranks: tuple[int, ...]) -> None:
        (r,) = ranks
        self._set(self.U.new_zeros(self.out_features, r), self.S.new_zeros(r, r), self.V.new_zeros(self.in_features, r))

    def _set(self, u: Tensor, s: Tensor, v: Tensor) -> None:
        for p, val in ((self.U, u), (self.S, s), (self.V, v)):
            # Same Parameter object, new shape: optimizer param groups stay valid. (A graph
            # built before the change must not be backpropagated after it.)
            p.grad = None
            p.data = val.contiguous()
        self._store_ranks()

    def to_dense(self) -> nn.Linear:
        lin = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=self.S.device, dtype=self.S.dtype
        )
        with torch.no_grad():
            lin.weight.copy_(self.U @ self.S @ self.V.mT)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def dense_num_parameters(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    # -- protocol (see .protocol) ------------------------------------------------------
    def costs(
        self, ranks: tuple[int, ...] | None = None, *, out_px: int = 1, in_px: int | None = None
    ) -> dict[str, Cost]:
        """:func:`~compressor.runtime.costs.linear_costs` for ``out_px`` tokens (``in_px`` is the same count)."""
        (r,) = self.ranks if ranks is None else ranks
        return linear_costs(self.in_features, self.out_features, r, bias=self.bias is not None, tokens=out_px)

    def sample_counts(self, inputs: Tensor, output: Tensor) -> tuple[int, int]:
        tokens = output.numel() // output.shape[-1] // max(1, output.shape[0])
        return tokens, tokens

    @torch.no_grad()
    def export_module(self, form: str) -> nn.Module:
        f32 = torch.float32
        bias = self.bias.detach().to(f32) if self.bias is not None else None
        u, s, v = (t.detach().double() for t in (self.U, self.S, self.V))
        if form == "unmerged":
            return nn.Sequential(
                plain_linear(v.mT.to(f32), None), plain_linear(s.to(f32), None), plain_linear(u.to(f32), bias)
            )
        if form == "merged":  # x·V·Sᵀ·Uᵀ = x·(S Vᵀ)ᵀ·Uᵀ
            return nn.Sequential(plain_linear((s @ v.mT).to(f32), None), plain_linear(u.to(f32), bias))
        if form == "dense":
            return plain_linear((u @ s @ v.mT).to(f32), bias)
        raise ValueError(f"unknown form {form!r} for a {self.kind} layer (expected one of {self.forms})")

    @classmethod
    def empty_like(cls, dense: nn.Module, ranks: Sequence[int], r_min: int, r_max: int) -> LowRankLinear:
        if not isinstance(dense, nn.Linear):
            raise WeightsError(f"expected an nn.Linear to factorize, found {type(dense).__name__}")
        (rank,) = ranks
        return cls(dense.in_features, dense.out_features, int(rank), **cls._options_like(dense, r_min, r_max))

    @classmethod
    def factor_ranks(cls, ranks: Sequence[int]) -> dict[str, tuple[int, int]]:
        return {"S": (0, ranks[0]), "U": (1, ranks[0]), "V": (1, ranks[0])}

    @classmethod
    def stored_factor_error(cls, name: str, ranks: Sequence[int], header: Any) -> str | None:
        error = super().stored_factor_error(name, ranks, header)
        square = [ranks[0], ranks[0]]
        if error is None and header[f"{name}.S"]["shape"] != square:
            error = f"tensor {name}.S has shape {header[f'{name}.S']['shape']}, expected {square}"
        return error

    @classmethod
    def full_rank(cls, dense: nn.Module) -> int:
        return min(dense.weight.shape)

    @classmethod
    def saves(cls, dense: nn.Module, r: int) -> bool:
        out_f, in_f = dense.weight.shape
        costs = linear_costs(in_f, out_f, r)
        return costs["unmerged"][0] < costs["dense"][0]

    @classmethod
    def from_calibrated(
        cls, dense: nn.Module, bases: Any, *, r_min: int, r_max: int, seed: int
    ) -> tuple[LowRankLinear, str]:
        """From the output basis U of :class:`~compressor.calibration.LinearBases`; without one
        (the activations chose full rank) the SVD of the weights, which is then exact."""
        if bases.u is not None:
            return cls.from_output_basis(dense, bases.u, r_min=r_min, r_max=r_max), "activations"
        return cls.from_dense(dense, bases.rank, r_min=r_min, r_max=r_max, seed=seed), "svd"

    def latency_key(self, input_shape: Sequence[int]) -> LatencyKey:
        tokens = math.prod(int(d) for d in input_shape[1:-1])
        shape = (
            ("in_features", self.in_features),
            ("out_features", self.out_features),
            ("tokens", tokens),
            ("bias", self.bias is not None),
        )
        return LatencyKey(self.kind, shape)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.ranks[0]}, "
            f"r_min={self.r_min}, r_max={self.r_max}, bias={self.bias is not None}"
        )
