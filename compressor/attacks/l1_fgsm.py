"""The paper's "ℓ1-FGSM" (Appendix B.1.2, eq. 12; reference: CondLR ``fgsm_attack``).

x' = x + α · sign(∇ₓ L_CE(f(x), y)) / Σ with Σ the per-channel std of the training data, then
δ clamped to [−ε, ε] as in eq. 11; α = ε.

Note: for Σ_c <= 1 and α = ε the step ε/Σ_c overshoots the box, so the clamp makes this
attack coincide with sign-FGSM. That is what the equations say, and it is also what the
reference computed (it applied ε·sign/Σ to *normalized* inputs, i.e. ε·sign in pixels).
The 1/Σ weighting only shows with a smaller ``alpha``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Attack, _require, check_float, register_attack


@register_attack("l1_fgsm")
class L1FGSM(Attack):
    """Sign step divided by the per-channel data std, clamped to the ε-box.

    Args:
        data_std: per-channel std Σ of the training data (default: ``std``, else 1). Given
            explicitly, each value in [0.001, 10]: the std of [0, 1] data is at most 0.5, 10
            leaves room for a plain per-channel weighting and refuses values on the 0-255
            scale; below 0.001 the step α/Σ overshoots the box 1000-fold anyway (sign-FGSM),
            and a Σ that rounds to 0 in float32 would divide by zero.
        alpha: step size in eps units (default ``eps``, the paper's choice; in (0, 1]).
    """

    clean_gradient_shareable = True  # one cross-entropy gradient at x, scaled by ε afterwards

    def __init__(
        self,
        model: nn.Module,
        eps: float = 0.1,
        *,
        data_std: Sequence[float] | None = None,
        alpha: float | None = None,
        **common,
    ) -> None:
        super().__init__(model, eps, **common)
        if data_std is not None:
            _require(
                isinstance(data_std, Sequence) and not isinstance(data_std, str) and len(data_std) > 0,
                f"l1_fgsm: data_std must be a non-empty list of per-channel values in [0.001, 10], got {data_std!r}",
            )
            data_std = tuple(check_float(self.name, "data_std", s, 0.001, 10.0) for s in data_std)
        else:  # the model's std, already checked finite and positive by the base class
            data_std = self.std
        self.data_std = data_std
        self.alpha = self.eps if alpha is None else check_float(self.name, "alpha", alpha, 0.0, 1.0, lo_open=True)

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        # images: (N, C, H, W) in [0, 1]; labels: (N,)
        grad, _ = self.input_grad(images, lambda z: F.cross_entropy(z, labels, reduction="sum"))
        step = self.alpha * grad.sign()  # eq. 12, in eps units
        if self.data_std is not None:
            if len(self.data_std) not in (1, images.shape[1]):
                raise ValueError(f"data_std has {len(self.data_std)} values, images have {images.shape[1]} channels")
            sigma = torch.tensor(self.data_std, dtype=images.dtype, device=images.device)
            step = step / sigma.view(1, -1, 1, 1)  # (C,) or (1,) broadcasts over channels
        return images + self.to_pixel(step)  # the base class clamps δ to the ε-box (eq. 11)
