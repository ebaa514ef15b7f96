"""Adversarial training: every step trains on adversarial examples made against the model as
it is at that step (``train.adversarial``).

min_θ E max_{‖δ‖∞ ≤ ε} CE(f_θ(x + δ), y) (Madry et al., ICLR 2018), the inner maximum taken by
ℓ∞ PGD from a random start (``pgd``, ``steps`` sign steps of ``alpha`` = 2.5·ε/steps unless
given) or by one sign step of 1.25·ε from a random start (``fgsm``: FGSM-RS, Wong, Rice &
Kolter, ICLR 2020). ε and the step in pixel units of [0, 1] images. The attack's randomness is
seeded by (run seed, global step), so a resumed run draws what an uninterrupted one would.
The examples replace the clean batch (weight 1 on them, the clean images are not trained on);
with distillation the teacher's target is taken on the clean batch (see :mod:`.distill`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ...errors import ConfigError
from .base import LossTerm, TrainingContext, register


@register("adversarial")
class Adversarial(LossTerm):
    """Adversarial examples against the student at every step (see the module docstring)."""

    def __init__(
        self, ctx: TrainingContext, *, attack: str, eps: float, steps: int = 7, alpha: float | None = None
    ) -> None:
        from ...attacks import create_attack

        super().__init__(ctx)
        if attack not in ("fgsm", "pgd"):
            raise ConfigError(f"adversarial training: attack must be 'fgsm' or 'pgd', got {attack!r}")
        steps = 1 if attack == "fgsm" else steps
        if alpha is None and attack == "fgsm":
            alpha = 1.25 * eps
        if alpha is not None and alpha <= 0:  # eps = 0: no perturbation at all
            alpha = None
        self.attack = create_attack("pgd", ctx.model, eps=eps, steps=steps, alpha=alpha, random_start=True)
        self.kind = attack

    def inputs(self, x: Tensor, y: Tensor, step: int) -> Tensor:
        self.attack.seed = (self.ctx.seed * 7919 + step) % (2**32 - 1)
        return self.attack(x, y).detach()

    def describe(self) -> dict[str, Any]:
        # the attack as it runs: fgsm is one step, and alpha the step size actually taken
        return {
            "term": self.name,
            "attack": self.kind,
            "eps": self.attack.eps,
            "steps": self.attack.steps,
            "alpha": self.attack.alpha,
        }
