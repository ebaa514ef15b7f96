"""APGD-CE, ℓ∞ (Croce & Hein 2020, "Reliable evaluation of adversarial robustness...", Alg. 1).

The strong check: PGD with momentum 0.75 and a step size η (starting at 2ε) that is halved
at checkpoints w_j where (i) the loss grew in fewer than ρ·(w_j − w_{j−1}) of the steps
since the last checkpoint, or (ii) η was not halved last time and the best loss has not
improved since; after halving, the iterate restarts from the best point found. Checkpoint
spacing follows the reference (22% of the steps, shrinking by 3% down to 6%). Returns per
sample a misclassified point if one was met (the clean image included), else the highest-loss
point. Single restart, CE loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MAX_STEPS, Attack, check_float, check_int, register_attack


def _bcast(mask: Tensor) -> Tensor:
    return mask.view(-1, 1, 1, 1)


@register_attack("apgd")
class APGD(Attack):
    """Args: steps (default 20, in [1, MAX_STEPS]), rho (default 0.75, in (0, 1]), momentum
    (default 0.75, in (0, 1]; 0 would take no gradient step after the first), random_start."""

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        *,
        steps: int = 20,
        rho: float = 0.75,
        momentum: float = 0.75,
        random_start: bool = True,
        **common,
    ) -> None:
        super().__init__(model, eps, **common)
        self.steps = check_int(self.name, "steps", steps, 1, MAX_STEPS)
        self.rho = check_float(self.name, "rho", rho, 0.0, 1.0, lo_open=True)
        self.momentum = check_float(self.name, "momentum", momentum, 0.0, 1.0, lo_open=True)
        self.random_start = bool(random_start)

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        # images: (N, C, H, W) in [0, 1]; labels: (N,)
        x = images
        ce = lambda z: F.cross_entropy(z, labels, reduction="none")  # noqa: E731
        with torch.no_grad():
            fooled = self.model(x).argmax(dim=1) != labels  # a misclassified clean image counts
        x_fool = x.clone()
        x_adv = x
        if self.random_start:  # a random point on the surface of the box, as the reference
            t = 2 * self.rand_like(x) - 1
            t = t / t.flatten(1).abs().amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            x_adv = self.project(x + self.to_pixel(self.eps * t), x)
        loss, z, grad = self._step_info(x_adv, ce)
        x_max, g_max, loss_max = x_adv.clone(), grad.clone(), loss.clone()
        eta = torch.full_like(loss, 2 * self.eps).view(-1, 1, 1, 1)
        period, p_min, p_decr = (
            max(int(0.22 * self.steps), 1),
            max(int(0.06 * self.steps), 1),
            max(int(0.03 * self.steps), 1),
        )
        n_up, since, loss_prev = torch.zeros_like(loss), 0, loss
        loss_max_ckpt, halved_ckpt = loss_max.clone(), torch.ones_like(loss, dtype=torch.bool)
        x_prev = x_adv
        for i in range(self.steps):
            with torch.no_grad():
                a = self.momentum if i > 0 else 1.0
                z_new = self.project(x_adv + eta * self.to_pixel(grad.sign()), x)
                x_new = self.project(x_adv + a * (z_new - x_adv) + (1 - a) * (x_adv - x_prev), x)
                x_prev, x_adv = x_adv, x_new
            loss, z, grad = self._step_info(x_adv, ce)
            with torch.no_grad():
                now = z.argmax(dim=1) != labels
                x_fool = torch.where(_bcast(now & ~fooled), x_adv, x_fool)
                fooled |= now
                better = loss > loss_max
                x_max, g_max = torch.where(_bcast(better), x_adv, x_max), torch.where(_bcast(better), grad, g_max)
                loss_max = torch.where(better, loss, loss_max)
                n_up += (loss > loss_prev).to(loss.dtype)
                loss_prev, since = loss, since + 1
                if since == period:  # checkpoint
                    halve = (n_up < self.rho * period) | (~halved_ckpt & (loss_max <= loss_max_ckpt))
                    eta = torch.where(_bcast(halve), eta / 2, eta)
                    x_adv = torch.where(_bcast(halve), x_max, x_adv)
                    grad = torch.where(_bcast(halve), g_max, grad)
                    halved_ckpt, loss_max_ckpt = halve, loss_max.clone()
                    n_up.zero_()
                    since, period = 0, max(period - p_decr, p_min)
        return torch.where(_bcast(fooled), x_fool, x_max)

    def _step_info(self, x_adv: Tensor, ce) -> tuple[Tensor, Tensor, Tensor]:
        x_adv = x_adv.detach().requires_grad_(True)
        z = self.model(x_adv)
        loss = ce(z)  # (N,) per-sample loss: the bookkeeping is per sample
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        return loss.detach(), z.detach(), grad
