"""The paper's "ℓ2-FGSM" (Appendix B.1.1, eqs. 10-11; reference: UAE-RS ``fgsm``/``ifgsm``).

x' = x + α · g / ‖g‖∞ with g = ∇ₓ L_CE(f(x), y) and the ∞-norm taken per sample (eq. 10),
then δ = x' − x clamped to [−ε, ε] (eq. 11). α = ε as in the paper; ``steps > 1`` iterates it.
Despite the name the threat model is the ℓ∞ box: the step is the gradient scaled so its
largest entry is α.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import MAX_STEPS, Attack, check_float, check_int, register_attack


@register_attack("l2_fgsm")
class L2FGSM(Attack):
    """ℓ∞-normalized gradient ascent with a clamp to the ε-box.

    Args:
        steps: number of iterations (default 1; in [1, MAX_STEPS]).
        alpha: step size in eps units (default ``eps``, the paper's choice; in (0, 1]).
    """

    clean_gradient_shareable = True  # one cross-entropy gradient at x, scaled by ε afterwards

    def __init__(
        self, model: nn.Module, eps: float = 0.1, *, steps: int = 1, alpha: float | None = None, **common
    ) -> None:
        super().__init__(model, eps, **common)
        self.steps = check_int(self.name, "steps", steps, 1, MAX_STEPS)
        self.alpha = self.eps if alpha is None else check_float(self.name, "alpha", alpha, 0.0, 1.0, lo_open=True)

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        # images: (N, C, H, W) in [0, 1]; labels: (N,)
        x_adv = images
        loss = lambda z: F.cross_entropy(z, labels, reduction="sum")  # noqa: E731
        for _ in range(self.steps):
            grad, _ = self.input_grad(x_adv, loss)
            g = self.unit_grad(grad)  # the reference took this ∞-norm in normalized coordinates
            g = g / g.flatten(1).abs().amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            x_adv = self.project(x_adv + self.to_pixel(self.alpha * g), images)  # eq. 10, then eq. 11
        return x_adv
