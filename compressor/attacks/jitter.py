"""Jitter attack (Schwinn et al. 2021, arXiv:2105.10304); paper Appendix B.1.3, eqs. 13-18.

Per iteration k: ẑ = softmax(s · z / ‖z‖∞) of the logits z (eq. 13), z̃ = ẑ + σ·η with
η ~ N(0, 1) (eq. 14), L = ‖z̃ − onehot(y)‖² (eq. 15, averaged over classes as the references
do), and for k > 0 the loss of an already misclassified sample is divided by ‖x'_k − x‖∞
(eq. 18), which favours small perturbations that stay misclassified. The ascent step is
x' = x + α · g/‖g‖∞ per sample (eq. 16, as in the UAE-RS reference) with δ clamped to the
ε-box (eq. 17); α = ε, s = 10, σ = 0.1, 5 iterations.

``step="sign"`` (α · sign(g)) reproduces ``torchattacks.Jitter`` for comparisons.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MAX_STEPS, Attack, _require, check_float, check_int, register_attack


@register_attack("jitter")
class Jitter(Attack):
    """Noisy-softmax MSE ascent with a perturbation-size normalization.

    Args:
        steps: iterations (default 5; in [1, MAX_STEPS]).
        alpha: step size in eps units (default ``eps``; in (0, 1]).
        scale: softmax temperature s of eq. 13 (default 10; in (0, 100]: s·z/‖z‖∞ spans
            [−s, s], and a larger s only saturates the softmax further, e^(−2s) underflowing
            in float32 already from s ≈ 52, and with it the gradient).
        sigma: std of the output noise of eq. 14 (default 0.1; 0 disables it; in [0, 1]: the
            noise is added to probabilities in [0, 1], which a larger σ drowns).
        step: ``"normalized"`` (eq. 16, default) or ``"sign"`` (torchattacks).
        random_start: start uniformly in the ε-box (default False, as in the paper).
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 0.035,
        *,
        steps: int = 5,
        alpha: float | None = None,
        scale: float = 10.0,
        sigma: float = 0.1,
        step: str = "normalized",
        random_start: bool = False,
        **common,
    ) -> None:
        super().__init__(model, eps, **common)
        steps = check_int(self.name, "steps", steps, 1, MAX_STEPS)
        _require(step in ("normalized", "sign"), f"jitter: step must be 'normalized' or 'sign', got {step!r}")
        sigma = check_float(self.name, "sigma", sigma, 0.0, 1.0)
        scale = check_float(self.name, "scale", scale, 0.0, 100.0, lo_open=True)
        self.steps, self.scale, self.sigma, self.step, self.random_start = steps, scale, sigma, step, bool(random_start)
        self.alpha = self.eps if alpha is None else check_float(self.name, "alpha", alpha, 0.0, 1.0, lo_open=True)

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        # images: (N, C, H, W) in [0, 1]; labels: (N,)
        x_adv = images
        if self.random_start:
            x_adv = self.project(images + self.to_pixel((2 * self.rand_like(images) - 1) * self.eps), images)
        for k in range(self.steps):
            x_adv = x_adv.detach().requires_grad_(True)
            z = self.model(x_adv)  # (N, K)
            onehot = F.one_hot(labels, z.shape[1]).to(z.dtype)
            z_hat = torch.softmax(self.scale * z / z.abs().amax(dim=1, keepdim=True).clamp_min(1e-12), dim=1)
            if self.sigma:
                z_hat = z_hat + self.sigma * self.randn_like(z_hat)
            loss = ((z_hat - onehot) ** 2).mean(dim=1)  # (N,)
            if k > 0:
                with torch.no_grad():
                    d = x_adv - images if self._scale is None else (x_adv - images) / self._scale
                    r = d.flatten(1).abs().amax(dim=1)
                    divide = (z.argmax(dim=1) != labels) & (r > 0)
                loss = torch.where(divide, loss / torch.where(divide, r, torch.ones_like(r)), loss)
            (grad,) = torch.autograd.grad(loss.sum(), x_adv)
            if self.step == "sign":
                step = grad.sign()
            else:
                g = self.unit_grad(grad)
                step = g / g.flatten(1).abs().amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            x_adv = self.project(x_adv.detach() + self.to_pixel(self.alpha * step), images)
        return x_adv
