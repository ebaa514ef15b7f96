"""The shared work of every attack, so that an attack file writes only ``forward``.

Conventions (Schotthöfer et al., arXiv 2505.08022, Appendix B.1):

* Images are float NCHW tensors in [0, 1] (pixel space); the model normalizes inside itself
  and returns logits ``(N, K)``.
* ``eps`` (and every step size such as ``alpha``) is given in ``eps_unit`` units:

  - ``"pixel"`` (default): the ℓ∞ box is ``|x' - x| <= eps`` on [0, 1] images.
  - ``"normalized"`` with a per-channel ``std``: units of the normalized input
    ``(x - mean) / std``, as the paper's reference code used. The ℓ∞ box per channel c is
    ``eps * std_c`` in pixel space; the ℓ2 ball is ``||(x' - x) / std||_2 <= eps``. Attacks
    compute their directions in these coordinates (the gradient there is ``g * std``), so a
    normalized-unit attack is the reference attack, only clamped to valid [0, 1] images.

* ``round_8bit=True`` reproduces the paper's protocol of scoring adversarial images saved as
  8-bit PNGs. Guarantee: the output is always inside the ε-ball and [0, 1] (up to float
  rounding, < 1e-6); every pixel lies on the k/255 grid whenever a grid point is feasible
  for it — always true when the clean image is itself on the grid (images decoded from 8-bit
  files) or, for ℓ∞, when eps >= 1/510 in pixel units. An infeasible pixel keeps its
  unrounded value rather than leave the ball.
* Randomness comes from a local ``torch.Generator`` seeded with ``seed`` at every call, so a
  call is a pure function of (model, images, labels, options); the global RNG is untouched.
* Every numeric option is checked at construction against a range (:func:`check_int`,
  :func:`check_float`), so that a recipe with an absurd value (``steps: 1000000000``, a
  negative or infinite step size) is refused before any work: ``steps`` in [1, MAX_STEPS];
  ℓ∞ step sizes ``alpha`` in (0, 1] eps units (in pixel units a larger step crosses the whole
  [0, 1] range); momenta and fractions in [0, 1]; ``seed`` in [0, MAX_SEED]. A derived default
  (``alpha = eps``) is not checked: ε has its own check.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..runtime import registering

_log = logging.getLogger(__name__)

_REGISTRY: dict[str, type[Attack]] = {}
_GRID_TOL = 1e-4  # slack, in 1/255 steps, when finding grid points at the ε-box edge

MAX_STEPS = 10_000
"""Most iterations an attack accepts: far above the tens of steps of a PGD or APGD evaluation,
while a value that would never finish on a validation set is refused."""
MAX_SEED = 2**32 - 1
"""Largest attack seed: the recipe's seed range (``compressor.recipe.MAX_SEED``)."""


def register_attack(name: str) -> Callable[[type[Attack]], type[Attack]]:
    """Class decorator: make an attack available to ``create_attack(name, ...)``."""
    return registering(_REGISTRY, name, "attack", _log)


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _interval(lo: float, hi: float, lo_open: bool) -> str:
    return f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"


def check_int(owner: str, name: str, value: object, lo: int, hi: int) -> int:
    """``value`` as an int if it is an integer (not a bool) in [lo, hi], else ConfigError.

    The message is one line naming the attack (``owner``), the option, the value and the range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
        raise ConfigError(f"{owner}: {name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def check_float(owner: str, name: str, value: object, lo: float, hi: float, *, lo_open: bool = False) -> float:
    """``value`` as a float if it is a finite real number (not a bool) in [lo, hi] (``lo_open``:
    (lo, hi]), else ConfigError with a one-line message like :func:`check_int`'s."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(float(value))
    if not ok or not (lo < float(value) if lo_open else lo <= float(value)) or not float(value) <= hi:
        raise ConfigError(f"{owner}: {name} must be a number in {_interval(lo, hi, lo_open)}, got {value!r}")
    return float(value)


class Attack:
    """Base class: eval mode, mode restoring, input checks, units, projection, rounding, RNG.

    Args:
        model: classifier taking [0, 1] NCHW images, returning logits.
        eps: radius of the threat model, in ``eps_unit`` units.
        eps_unit: ``"pixel"`` or ``"normalized"`` (needs ``std``); see the module docstring.
        std: per-channel std of the model's input normalization.
        round_8bit: round the output to the k/255 grid, staying inside the ball.
        seed: seed of the attack's private random generator (reseeded at every call), an
            integer in [0, MAX_SEED].
    """

    name: str = "attack"
    norm: str = "linf"  # the ball that `project` enforces: "linf" or "l2"
    clean_gradient_shareable: bool = False
    """True where ``forward``'s gradient at the clean images does not depend on ε (the FGSM
    family: one cross-entropy gradient, scaled by ε afterwards). :func:`compressor.evaluate`
    then computes it once per batch for all ε of one attack setting (:meth:`sharing_clean_gradient`)."""

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        *,
        eps_unit: str = "pixel",
        std: Sequence[float] | None = None,
        round_8bit: bool = False,
        seed: int = 0,
    ) -> None:
        _require(isinstance(model, nn.Module), f"model must be a torch.nn.Module, got {type(model).__name__}")
        try:
            eps = float(eps)
        except (TypeError, ValueError):
            raise ConfigError(f"eps must be a number, got {eps!r}") from None
        _require(math.isfinite(eps) and eps >= 0, f"eps must be a finite number >= 0, got {eps!r}")
        _require(eps_unit in ("pixel", "normalized"), f"eps_unit must be 'pixel' or 'normalized', got {eps_unit!r}")
        if std is not None:
            std = tuple(float(s) for s in std)
            # no upper bound: std comes from the model, and evaluation must accept what the
            # model accepted (compressor.models only requires it positive)
            _require(
                len(std) > 0 and all(math.isfinite(s) and s > 0 for s in std),
                f"std must be finite positive per-channel values, got {std}",
            )
        _require(
            eps_unit == "pixel" or std is not None,
            "eps_unit='normalized' needs the per-channel std of the model's input normalization (std=...)",
        )
        self.model, self.eps, self.eps_unit, self.std = model, eps, eps_unit, std
        self.round_8bit, self.seed = bool(round_8bit), check_int(self.name, "seed", seed, 0, MAX_SEED)
        self._scale: Tensor | None = None  # (1, C, 1, 1) pixel size of one eps unit; None = 1
        self._gen: torch.Generator | None = None
        self._x: Tensor | None = None  # the clean images of the running call
        self._box: tuple[Tensor, Tensor] | None = None  # ℓ∞: ball ∩ [0, 1] as per-pixel bounds
        self._clean_grad_memo: dict[str, tuple[Tensor, Tensor]] | None = None

    # ------------------------------------------------------------------ to override
    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        """Return adversarial images (N, C, H, W); the base class projects and rounds them."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the call
    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        self._check_inputs(images, labels)
        images = images.detach()
        labels = labels.detach().to(images.device)
        modes = [(m, m.training) for m in self.model.modules()]  # per module: restore mixed modes exactly
        self.model.eval()  # BN running stats and dropout must not change the attacked function
        self._scale = self._unit_scale(images)
        self._gen = torch.Generator(device=images.device).manual_seed(self.seed)
        self._x, self._box = images, None
        if self.norm == "linf":  # one clamp per projection instead of five ops (x in [0, 1] so lo <= hi)
            b = self.eps if self._scale is None else self.eps * self._scale
            self._box = ((images - b).clamp(min=0.0), (images + b).clamp(max=1.0))
        try:
            with torch.enable_grad():
                adv = self.forward(images, labels)
            with torch.no_grad():
                adv = self.project(adv.detach(), images)  # guarantee the ball whatever forward did
                if self.round_8bit:
                    adv = self._round_8bit(adv, images)
        finally:
            for m, training in modes:
                m.training = training
            self._scale, self._gen, self._x, self._box = None, None, None, None
        return adv.detach()

    def _check_inputs(self, images: Tensor, labels: Tensor) -> None:
        if not isinstance(images, Tensor) or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor, got {getattr(images, 'dtype', type(images))}")
        if images.dim() != 4:
            raise ValueError(f"images must be NCHW (4-D), got shape {tuple(images.shape)}")
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images contain NaN or inf")
        if images.numel() and (images.min() < 0 or images.max() > 1):
            raise ValueError("images must lie in [0, 1] (pixel space; put the normalization inside the model)")
        if not isinstance(labels, Tensor) or labels.dtype != torch.long or labels.dim() != 1:
            got = f"{getattr(labels, 'dtype', type(labels))} {tuple(getattr(labels, 'shape', ()))}"
            raise ValueError(f"labels must be a 1-D long tensor, got {got}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels ({labels.shape[0]}) and images ({images.shape[0]}) differ in batch size")

    def _unit_scale(self, images: Tensor) -> Tensor | None:
        if self.eps_unit == "pixel":
            return None
        c = images.shape[1]
        std = self.std if len(self.std) == c else self.std * c if len(self.std) == 1 else None
        if std is None:
            raise ValueError(f"std has {len(self.std)} values but images have {c} channels")
        return torch.tensor(std, dtype=images.dtype, device=images.device).view(1, c, 1, 1)

    # ------------------------------------------------------------------ helpers for forward
    def to_pixel(self, t: Tensor) -> Tensor:
        """A perturbation in eps units -> pixel units (identity in pixel units)."""
        return t if self._scale is None else t * self._scale

    def unit_grad(self, g: Tensor) -> Tensor:
        """The gradient w.r.t. eps-unit coordinates: chain rule, d/du = d/dx * std."""
        return g if self._scale is None else g * self._scale

    def input_grad(self, x: Tensor, loss_fn: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """Gradient of ``loss_fn(model(x))`` w.r.t. the input only, and the logits.

        ``autograd.grad`` (not ``backward``) leaves parameter ``.grad`` untouched and skips the
        weight-gradient kernels. Inside :meth:`sharing_clean_gradient` the gradient at the clean
        images is taken from the memo when another ε of the same setting computed it already.
        """
        memo = self._clean_grad_memo if x is self._x else None
        if memo is not None and "clean" in memo:
            return memo["clean"]
        x = x.detach().requires_grad_(True)
        logits = self.model(x)
        (grad,) = torch.autograd.grad(loss_fn(logits), x)
        out = grad, logits.detach()
        if memo is not None:
            memo["clean"] = out
        return out

    @contextmanager
    def sharing_clean_gradient(self, memo: dict[str, tuple[Tensor, Tensor]]) -> Iterator[None]:
        """Within the block, the gradient at the clean images is read from / stored in ``memo``.

        For attacks with ``clean_gradient_shareable`` only (elsewhere a no-op). The caller owns
        the promise that makes this exact: one ``memo`` per batch of (images, labels) and per
        attack setting (same class and options; only ε differs).
        """
        if not self.clean_gradient_shareable:
            yield
            return
        self._clean_grad_memo = memo
        try:
            yield
        finally:
            self._clean_grad_memo = None

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Project onto the ε-ball around x (in eps units) and clamp to [0, 1]."""
        if self._box is not None and x is self._x:
            return torch.clamp(x_adv, *self._box)
        delta = x_adv - x
        if self.norm == "linf":
            if self._scale is None:
                delta = delta.clamp(-self.eps, self.eps)
            else:
                bound = self.eps * self._scale
                delta = torch.maximum(torch.minimum(delta, bound), -bound)
        else:
            u = delta if self._scale is None else delta / self._scale
            n = u.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            delta = delta * torch.clamp(self.eps / (n + 1e-12), max=1.0)
        return (x + delta).clamp(0.0, 1.0)

    def rand_like(self, x: Tensor) -> Tensor:
        """U[0, 1) noise from the attack's generator."""
        return torch.rand(x.shape, generator=self._gen, device=x.device, dtype=x.dtype)

    def randn_like(self, x: Tensor) -> Tensor:
        """N(0, 1) noise from the attack's generator."""
        return torch.randn(x.shape, generator=self._gen, device=x.device, dtype=x.dtype)

    # ------------------------------------------------------------------ 8-bit rounding
    def _round_8bit(self, adv: Tensor, x: Tensor) -> Tensor:
        r = torch.round(adv * 255.0) / 255.0
        if self.norm == "linf":
            # feasible grid points per pixel: k/255 in [x - b, x + b] ∩ [0, 1]; pick the one
            # nearest to adv (clamping the nearest grid point into a 1-D interval does that)
            b = self.to_pixel(torch.full_like(x[:1], self.eps))
            lo = torch.ceil((x - b).clamp(min=0.0) * 255.0 - _GRID_TOL) / 255.0
            hi = torch.floor((x + b).clamp(max=1.0) * 255.0 + _GRID_TOL) / 255.0
            return torch.where(lo <= hi, torch.minimum(torch.maximum(r, lo), hi), adv)
        # l2: keep nearest rounding where it stays in the ball; otherwise round each pixel
        # towards x (a grid point between x and adv), which can only shrink |δ| per pixel
        lo = torch.ceil(torch.minimum(x, adv) * 255.0) / 255.0
        hi = torch.floor(torch.maximum(x, adv) * 255.0) / 255.0
        toward = torch.where(lo <= hi, torch.minimum(torch.maximum(r, lo), hi), adv)
        out = torch.where(self._outside_l2(r, x), toward, r)
        return torch.where(self._outside_l2(out, x), adv, out)  # float slack: give up rounding

    def _outside_l2(self, a: Tensor, x: Tensor) -> Tensor:
        u = a - x if self._scale is None else (a - x) / self._scale
        return (u.flatten(1).norm(dim=1) > self.eps).view(-1, 1, 1, 1)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "model")
        return f"{type(self).__name__}({opts})"
