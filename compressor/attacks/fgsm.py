"""Sign-FGSM, ℓ∞ (Goodfellow et al. 2015, "Explaining and harnessing adversarial examples").

x' = clip_[0,1](x + ε · sign(∇ₓ L_CE(f(x), y))) — one step of size ε. Matches
``torchattacks.FGSM`` in pixel units.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import Attack, register_attack


@register_attack("fgsm")
class FGSM(Attack):
    """One ℓ∞ sign step of size ``eps``; no options besides the common ones."""

    clean_gradient_shareable = True  # one cross-entropy gradient at x, scaled by ε afterwards

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        # images: (N, C, H, W) in [0, 1]; labels: (N,)
        # sum, not mean: the per-sample gradient must not depend on the batch size
        grad, _ = self.input_grad(images, lambda z: F.cross_entropy(z, labels, reduction="sum"))
        return images + self.eps * self.to_pixel(grad.sign())
