"""What every factorized layer offers the trainer, the exporter and the reports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..functional import mode_product, orthonormal_columns, reorthonormalize, tall_matmul
from .protocol import LayerProtocol


@dataclass(frozen=True)
class BasisChange:
    """How a layer's core was re-expressed after its bases changed.

    new_core = core ×₀ leftᵀ ×₁ rightᵀ (for a matrix core: leftᵀ · core · right), chosen so
    that the layer's weight is U_new · new_core · V_newᵀ = U_old · core · V_oldᵀ, projected onto
    the new bases: for augmentation left = U_oldᵀ U_new = [I | 0]; for a truncation
    U_old P = U_new R, so left = P Rᵀ (= U_oldᵀ U_new up to round-off). The trainer applies the
    same map to the optimizer's moments so that they follow the core into the new coordinates.
    """

    left: Tensor
    right: Tensor
    padding: bool = False
    """left and right are [I | 0]: apply() zero-pads instead of multiplying (same values, exactly)."""

    @classmethod
    def zero_padding(cls, old: tuple[int, int], new: tuple[int, int], like: Tensor) -> BasisChange:
        """The change of an augmentation, Û = [U | new columns]: the core is padded with zeros."""
        kw = {"dtype": like.dtype, "device": like.device}
        return cls(torch.eye(old[0], new[0], **kw), torch.eye(old[1], new[1], **kw), padding=True)

    def apply(self, tensor: Tensor) -> Tensor:
        if self.padding:
            # A copy into zeros, not two products with [I | 0]: the same numbers, written once
            # instead of computed by two mode products whose factors are mostly zeros (the core
            # and each of its optimizer moments go through here every cycle).
            out = tensor.new_zeros(self.left.shape[1], self.right.shape[1], *tensor.shape[2:])
            out[: tensor.shape[0], : tensor.shape[1]] = tensor
            return out
        return mode_product(tensor, self.left.to(tensor.dtype), self.right.to(tensor.dtype))

    @classmethod
    def truncation(
        cls, left_basis: Tensor, right_basis: Tensor, kept_left: Tensor, kept_right: Tensor, *, refactor: bool
    ) -> tuple[BasisChange, Tensor, Tensor]:
        """The bases after a truncation that keeps the singular vectors ``kept_left`` (r×r₁) and
        ``kept_right`` of the core, with the change that carries the core (and its optimizer
        state) into them: (change, U·P, V·Q) in the bases' precision.

        P and Q are first corrected to orthonormal in float64 (``orthonormal_columns``), so that
        U·P drifts from orthonormality by only ~1e-8 a cycle. ``refactor`` also re-factors the
        tall products by Cholesky QR, U P = Q_u R_u, clearing that drift; the core in the bases
        Q_u, Q_v is then core ×₀ (P R_uᵀ)ᵀ ×₁ (Q R_vᵀ)ᵀ, so W is unchanged either way.
        """
        left, right = orthonormal_columns(kept_left), orthonormal_columns(kept_right)
        new_left, new_right = tall_matmul(left_basis, left), tall_matmul(right_basis, right)
        if refactor:
            new_left, r_left = reorthonormalize(new_left)
            new_right, r_right = reorthonormalize(new_right)
            left, right = left @ r_left.mT, right @ r_right.mT
        return cls(left, right), new_left, new_right


class LowRankLayer(LayerProtocol, nn.Module):
    """Common interface of LowRankLinear and TuckerConv2d: training here, and what each type
    states about itself for costs, export, serialization and budgets in :class:`LayerProtocol`.

    Parameters are split in two groups with different update rules:
    - ``bases()``: orthonormal factors, set by QR/SVD in augment_/truncate_, never by an
      optimizer (weight decay or a gradient step would break orthonormality);
    - ``core``: the small coefficient tensor the optimizer trains (plus the bias).
    Rank changes resize the *same* Parameter objects (``param.data = ...``), so optimizer
    param groups stay valid; only their state needs the BasisChange.
    """

    r_min: int
    r_max: int

    # -- to implement ---------------------------------------------------------
    @property
    def core(self) -> nn.Parameter:
        raise NotImplementedError

    def bases(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def core_matrix(self) -> Tensor:
        """The matrix whose spectrum the regularizer and κ act on (S, or C₍₀₎ for a conv)."""
        raise NotImplementedError

    @property
    def ranks(self) -> tuple[int, ...]:
        raise NotImplementedError

    def augment_(self, *, seed: int = 0) -> BasisChange:
        raise NotImplementedError

    def truncate_(
        self, tau: float, *, reorthonormalize_bases: bool = True, rank_cap: tuple[int, ...] | None = None
    ) -> BasisChange:
        raise NotImplementedError

    def set_ranks_(self, ranks: tuple[int, ...]) -> None:
        """Resize factors to ``ranks`` (contents undefined): used before loading a state dict."""
        raise NotImplementedError

    def to_dense(self) -> nn.Module:
        raise NotImplementedError

    def dense_num_parameters(self) -> int:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------
    def set_bases_trainable(self, flag: bool) -> None:
        for p in self.bases():
            p.requires_grad_(flag)
            if not flag:
                p.grad = None

    @torch.no_grad()
    def clamp_condition_(self, kappa_max: float, live: int | None = None) -> None:
        """Raise the core matrix's singular values to at least σ_max / ``kappa_max`` (the singular
        vectors stay), so that κ ≤ kappa_max: CondLR's hard bound (Savostianova et al., 2023),
        applied to the core since the bases are orthonormal. ``live``: floor only the largest
        this-many singular values — in an augmented core, the directions the layer had before
        the augmentation; the candidates it admitted (at σ = 0) grow by their gradients alone
        and meet the bound when a truncation keeps them."""
        m = self.core_matrix()
        p, sigma, qh = torch.linalg.svd(m.double(), full_matrices=False)
        if not bool(sigma[0] > 0):
            return
        floor = float(sigma[0]) / float(kappa_max)
        n = len(sigma) if live is None else max(1, min(int(live), len(sigma)))
        if float(sigma[n - 1]) >= floor:
            return
        clamped = torch.cat([sigma[:n].clamp_min(floor), sigma[n:]])
        self.core.data.copy_(((p * clamped) @ qh).to(m.dtype).reshape(self.core.shape))

    def condition_number(self, *, precise: bool = True) -> float:
        """κ of the core matrix (float64; ``precise=False``: to ~0.1 %, see ``condition_number``)."""
        from ..functional import condition_number

        return condition_number(self.core_matrix(), precise=precise)

    def num_parameters(self) -> int:
        """Parameters at the current ranks (the paper's compression-rate count)."""
        return sum(p.numel() for p in self.parameters())

    @staticmethod
    def _options_like(dense: nn.Module, r_min: int, r_max: int | None) -> dict[str, Any]:
        """The constructor options every layer type takes from the dense layer it replaces."""
        w = dense.weight
        return {"bias": dense.bias is not None, "r_min": r_min, "r_max": r_max, "device": w.device, "dtype": w.dtype}

    def _store_ranks(self) -> None:
        self.rank_state.copy_(torch.tensor(self.ranks, dtype=torch.long))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A checkpoint may hold other ranks than this module has now: resize first, so that
        # load_state_dict works across rank changes (resume, load_compressed).
        key = prefix + "rank_state"
        if key in state_dict:
            ranks = tuple(int(r) for r in state_dict[key].tolist())
            if ranks != self.ranks:
                self.set_ranks_(ranks)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def low_rank_layers(model: nn.Module) -> dict[str, LowRankLayer]:
    """Name → layer for every factorized layer in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLayer)}
