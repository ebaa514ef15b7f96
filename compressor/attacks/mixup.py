"""Mixup attack (Xu & Ghamisi 2022, UAE-RS); paper Appendix B.1.4, eqs. 19-22.

Loss (eq. 19): β · Σ_k CE(f(x'/2^k), y) − Σ_k KL(p_mix ‖ softmax f(x'/2^k)): a scale-invariant
CE (Lin et al. 2020) plus a term pulling the output towards that of a mixing ("virtual")
sample. Ascent as in the reference: g ← g/‖g‖₁, momentum m ← g + μ·m, x' ← x' + α · m/‖m‖∞
(eq. 20), δ clamped to the ε-box (eq. 22). β = 1e-3, α = 1 (in eps units), μ = 1, 5 iterations.

Our reading of the ambiguous parts:
* Scales: the reference code (and Lin et al.) use k = 0..4, i.e. the image itself and four
  down-scaled copies; eq. 19 writes k = 1..5. Default (0, 1, 2, 3, 4); set
  ``scale_exponents=[1, 2, 3, 4, 5]`` for the literal equation.
* "Features": our models expose only logits, so the alignment is the KL between the softmax
  outputs, with the mixing sample's (clean) output as the target distribution.
* Mixing sample: per image, another image of the batch with a different label, drawn with the
  attack's generator (a same-label image if the batch has one class; no alignment term for a
  batch of one). The reference used one fixed precomputed image instead.
* λ ~ Beta(β, β) of eq. 21: the reference code never samples it, and with β = 1e-3 λ is almost
  surely ≈0 or ≈1, i.e. eq. 21 would leave about half of the samples unattacked. Default: off
  (λ = 0, the reference); ``lam_beta=1e-3`` applies x' = x + (1 − λ)δ per sample at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MAX_STEPS, Attack, _require, check_float, check_int, register_attack


def _l_norm(t: Tensor, p: float) -> Tensor:
    n = t.flatten(1).abs().amax(dim=1) if p == float("inf") else t.flatten(1).abs().sum(dim=1)
    return n.clamp_min(1e-12).view(-1, 1, 1, 1)


@register_attack("mixup")
class Mixup(Attack):
    """Scale-invariant CE + output alignment to a mixing sample, with momentum (see module doc).

    Args:
        steps: iterations (default 5; in [1, MAX_STEPS]). alpha: step size in eps units
            (default 1; in (0, 1]).
        beta: weight of the CE term (default 1e-3; in [0, 1000], where CE already outweighs the
            alignment term). decay: momentum μ (default 1; in [0, 1]).
        scale_exponents: the k of x/2^k (default 0..4): 1 to 9 integers in [0, 8]; x/2^8 already
            maps every pixel below one 8-bit step, and each k costs a forward and backward.
        lam_beta: Beta parameter of eq. 21 or None; in (0, 1000]: Beta(1000, 1000) already
            puts λ at 1/2 to within ~0.01 (one standard deviation).
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 0.025,
        *,
        steps: int = 5,
        alpha: float = 1.0,
        beta: float = 1e-3,
        decay: float = 1.0,
        scale_exponents: Sequence[int] = (0, 1, 2, 3, 4),
        lam_beta: float | None = None,
        **common,
    ) -> None:
        super().__init__(model, eps, **common)
        self.steps = check_int(self.name, "steps", steps, 1, MAX_STEPS)
        self.alpha = check_float(self.name, "alpha", alpha, 0.0, 1.0, lo_open=True)
        self.beta = check_float(self.name, "beta", beta, 0.0, 1000.0)
        self.decay = check_float(self.name, "decay", decay, 0.0, 1.0)
        _require(
            isinstance(scale_exponents, Sequence)
            and not isinstance(scale_exponents, str)
            and 1 <= len(scale_exponents) <= 9,
            f"mixup: scale_exponents must be a list of 1 to 9 integers in [0, 8], got {scale_exponents!r}",
        )
        self.scale_exponents = tuple(check_int(self.name, "scale_exponents entry", k, 0, 8) for k in scale_exponents)
        self.lam_beta = (
            None if lam_beta is None else check_float(self.name, "lam_beta", lam_beta, 0.0, 1000.0, lo_open=True)
        )

    def _mixing_partner(self, labels: Tensor) -> Tensor:
        n = labels.shape[0]
        score = torch.rand((n, n), generator=self._gen, device=labels.device)
        score = score + 2.0 * (labels[None, :] != labels[:, None])  # prefer another class
        score.fill_diagonal_(-1.0)  # never itself
        return score.argmax(dim=1)

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        # images: (N, C, H, W) in [0, 1]; labels: (N,)
        partner = self._mixing_partner(labels)
        with torch.no_grad():
            p_mix = torch.softmax(self.model(images), dim=1)[partner]  # (N, K) target distribution
        use_mix = (partner != torch.arange(len(labels), device=labels.device)).to(images.dtype)
        x_adv, momentum = images, torch.zeros_like(images)
        for _ in range(self.steps):
            x_adv = x_adv.detach().requires_grad_(True)
            ce = kl = 0.0
            for k in self.scale_exponents:
                z = self.model(x_adv / 2**k)
                ce = ce + F.cross_entropy(z, labels, reduction="sum")
                kl_i = F.kl_div(F.log_softmax(z, dim=1), p_mix, reduction="none").sum(dim=1)  # (N,)
                kl = kl + (kl_i * use_mix).sum()
            (grad,) = torch.autograd.grad(self.beta * ce - kl, x_adv)  # eq. 19
            g = self.unit_grad(grad)
            momentum = g / _l_norm(g, 1.0) + self.decay * momentum
            step = self.alpha * momentum / _l_norm(momentum, float("inf"))  # eq. 20
            x_adv = self.project(x_adv.detach() + self.to_pixel(step), images)  # eq. 22
        if self.lam_beta is not None:  # eq. 21, per sample
            rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=self._gen, device=self._gen.device)))
            lam = torch.as_tensor(rng.beta(self.lam_beta, self.lam_beta, size=len(labels)), dtype=images.dtype)
            x_adv = images + (1 - lam.to(images.device).view(-1, 1, 1, 1)) * (x_adv - images)
        return x_adv
