"""Knowledge distillation from a teacher (the dense model) on the logits.

    objective's data loss = (1 − w) · CE(z_s, y) + w · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))

with z_s the student's and z_t the teacher's logits, w = ``train.distill.weight`` and
T = ``train.distill.temperature``: Hinton, Vinyals & Dean, "Distilling the knowledge in a neural
network" (2015), whose weighted average of the two losses this is; the T² keeps the soft term's
gradient at the scale of the hard one's as T changes. KL is averaged over the batch
(``batchmean``), as the cross-entropy is, so that under torchrun the all-reduced gradient is that
of the global batch. w = 1 trains on the teacher alone (RSLAD's choice); w = 0 is no term at all.

The teacher runs in eval mode (its BatchNorm statistics and dropout do not move), under
``torch.no_grad`` (no graph, no gradients in it), on the student's device and under the
student's autocast setting; its logits enter the loss in float32 like the student's.

**With adversarial training** the student's logits are those of the adversarial examples (made
against the student, :mod:`.adversarial`), and the target is the teacher's soft label of the
*clean* batch: ARD (Goldblum, Fowl, Feizi & Goldstein, AAAI 2020) and RSLAD (Zi, Zhao, Ma & Jiang,
ICCV 2021). The clean soft label is what the student should say near x, and the teacher, not
trained against this student's attack, is most reliable on the clean image; the same choice
costs one teacher forward per step (not one per attack step).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError
from ...runtime import autocast_context
from .base import LossTerm, TrainingContext, register


def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over the batch (Hinton et al. 2015)."""
    t = float(temperature)
    return F.kl_div(
        F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), reduction="batchmean", log_target=True
    ) * (t * t)


def _at_least_float32(logits: Tensor) -> Tensor:
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


@register("distill")
class Distill(LossTerm):
    """(1 − w)·CE + w·T²·KL(teacher ‖ student) on the logits; see the module docstring."""

    def __init__(self, ctx: TrainingContext, *, weight: float, temperature: float = 4.0) -> None:
        super().__init__(ctx)
        if not 0.0 <= weight <= 1.0 or not temperature > 0:
            raise ConfigError(f"distillation: weight in [0, 1] and temperature > 0, got {weight}, {temperature}")
        if ctx.teacher is None:
            raise ConfigError(
                "train.distill.weight > 0 needs a teacher: the pipeline's dense model, compress(..., teacher=) "
                "or Trainer(..., teacher=)"
            )
        self.weight, self.temperature = float(weight), float(temperature)
        self.teacher = ctx.teacher.to(ctx.device).eval()
        ctx.dist.sync_model(self.teacher)  # every process distills from rank 0's teacher

    def data_loss(self, loss: Tensor, logits: Tensor, clean: Tensor, y: Tensor) -> Tensor:
        self.teacher.eval()  # whatever a caller did to it in between
        with torch.no_grad(), autocast_context(self.ctx.device, self.ctx.amp):
            target = self.teacher(clean)
        kd = kd_loss(_at_least_float32(logits), _at_least_float32(target), self.temperature)
        return (1.0 - self.weight) * loss + self.weight * kd

    @property
    def data_weight(self) -> float:
        return 1.0 - self.weight

    def describe(self) -> dict[str, Any]:
        return {"term": self.name, "weight": self.weight, "temperature": self.temperature}
