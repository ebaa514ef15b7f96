"""Projected gradient descent, ℓ∞ and ℓ2 (Madry et al. 2018, arXiv:1706.06083).

ℓ∞: x_{t+1} = Π(x_t + α · sign(∇ₓ L_CE)); ℓ2: x_{t+1} = Π(x_t + α · g/‖g‖₂), Π the projection
onto the ε-ball and [0, 1]. With ``random_start=False`` the ℓ∞ variant equals
``torchattacks.PGD`` step for step.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import MAX_STEPS, Attack, _require, check_float, check_int, register_attack


@register_attack("pgd")
class PGD(Attack):
    """Iterated gradient steps with projection.

    Args:
        norm: ``"linf"`` (sign steps) or ``"l2"`` (ℓ2-normalized steps, ℓ2 ball of radius eps).
        steps: number of steps (default 10; in [1, MAX_STEPS]).
        alpha: step size in eps units (default ``2.5 * eps / steps``, Madry et al.): in (0, 1]
            for ``"linf"``, where in pixel units a larger sign step crosses the whole [0, 1]
            range; in (0, 100] for ``"l2"``, whose ball grows with the image size.
        random_start: start uniformly in the ℓ∞ box / uniformly in radius in the ℓ2 ball.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        *,
        norm: str = "linf",
        steps: int = 10,
        alpha: float | None = None,
        random_start: bool = True,
        **common,
    ) -> None:
        super().__init__(model, eps, **common)
        _require(norm in ("linf", "l2"), f"pgd: norm must be 'linf' or 'l2', got {norm!r}")
        steps = check_int(self.name, "steps", steps, 1, MAX_STEPS)
        if alpha is not None:
            alpha = check_float(self.name, "alpha", alpha, 0.0, 1.0 if norm == "linf" else 100.0, lo_open=True)
        self.norm, self.steps, self.random_start = norm, steps, bool(random_start)
        self.alpha = 2.5 * self.eps / steps if alpha is None else alpha

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        # images: (N, C, H, W) in [0, 1]; labels: (N,)
        x_adv = images
        if self.random_start:
            if self.norm == "linf":
                x_adv = images + self.to_pixel((2 * self.rand_like(images) - 1) * self.eps)
            else:  # direction uniform on the sphere, radius uniform in [0, eps]
                d = self.randn_like(images)
                d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                r = self.rand_like(images[:, :1, :1, :1]) * self.eps
                x_adv = images + self.to_pixel(d * r)
            x_adv = self.project(x_adv, images)
        loss = lambda z: F.cross_entropy(z, labels, reduction="sum")  # noqa: E731
        for _ in range(self.steps):
            grad, _ = self.input_grad(x_adv, loss)
            if self.norm == "linf":
                step = self.alpha * grad.sign()  # sign(g · std) = sign(g): already in eps units
            else:
                g = self.unit_grad(grad)
                step = self.alpha * g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            x_adv = self.project(x_adv + self.to_pixel(step), images)
        return x_adv
