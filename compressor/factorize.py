"""Model surgery: replace worthwhile Linear/Conv2d layers by their factorized forms, in place.

Policy (paper and reference code): the first conv and the final classifier stay dense; grouped
and depthwise convs stay dense. A factorized layer must never cost more than the dense one: each
layer's rank cap is ``min(r_max, its break-even rank)``, the largest rank at which the factorized
form has fewer parameters *and* fewer multiply-adds, so neither the initial rank nor DLRT's
augmentation can make it bigger; a layer that saves nothing even at ``r_min`` stays dense.
(A 64→64 3×3 conv breaks even at rank 57: with ``r_max=200`` it is factorized with ranks ≤ 57
instead of being left dense or grown past its dense size.) Include/exclude glob patterns on
module names and a ``filter_fn(module, name)`` refine the choice. Every skipped layer is
reported with its reason, every factorized one with its cap and how it was initialized.

Initialization: SVD / HOSVD of the weights, or, given calibration batches, activation-aware
bases (:mod:`compressor.calibration`).

Attention projections: a fused ``qkv`` Linear (timm ViT) is factorized as one matrix, so q, k
and v share one input basis V (they read the same tokens) and one output basis U over the
concatenated outputs. ``nn.MultiheadAttention`` (torchvision ViT, Swin's stages use their own)
reads its projection weights as raw tensors instead of calling its child modules; every
self-attention one is first replaced by :class:`~compressor.layers.ProjectedMultiheadAttention`,
the same function with ``in_proj`` (the packed q/k/v projection) and ``out_proj`` as modules,
which are then factorized like any Linear. A layer whose parent reads its ``.weight`` instead
of calling it (torchvision's Swin ``qkv``/``proj``, timm's EVA) still runs after factorization:
:attr:`LowRankLinear.weight` is the dense U S Vᵀ (and the export writes such layers dense).
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .calibration import activation_bases
from .errors import ConfigError
from .layers import LowRankLayer, layer_type_for, project_attention_
from .recipe import FactorizeSection
from .runtime import DistContext

log = logging.getLogger(__name__)

# Linear/Conv2d subclasses whose forward is known to be the plain op (safe to replace).
_SAFE_SUBCLASS_NAMES = {"timm.layers.linear.Linear"}


@dataclass
class LayerDecision:
    name: str
    kind: str  # the factorized type's kind (compressor.layers.layer_kinds)
    shape: list[int]
    factorized: bool
    reason: str
    ranks: list[int] = field(default_factory=list)
    params_dense: int = 0
    params_factorized: int = 0
    r_max: int = 0  # the layer's rank cap: min(r_max, its break-even rank) when savings are required
    init: str = ""  # "svd" (weights) or "activations" (calibrated), for factorized layers


@dataclass
class FactorizationReport:
    layers: list[LayerDecision]
    seconds: float
    attention: list[str] = field(default_factory=list)
    """nn.MultiheadAttention modules replaced by ProjectedMultiheadAttention (same function)."""

    @property
    def factorized(self) -> list[LayerDecision]:
        return [d for d in self.layers if d.factorized]

    @property
    def skipped(self) -> list[LayerDecision]:
        return [d for d in self.layers if not d.factorized]

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "layers": [asdict(d) for d in self.layers], "attention": self.attention}

    def table(self, macs: dict[str, tuple[int, int]] | None = None) -> str:
        """A plain-text table users can read: every candidate layer, what happened and why;
        with ``macs`` ({layer: (dense, now)} per image) a multiply-add column too."""
        head = ("layer", "kind", "shape", "action", "ranks", "params", *(("MACs",) if macs else ()), "reason")
        rows = [head]
        for d in self.layers:
            params = f"{d.params_dense:,} -> {d.params_factorized:,}" if d.factorized else f"{d.params_dense:,}"
            reason = f"{d.reason} ({d.init} init)" if d.factorized and d.init else d.reason
            cost = ()
            if macs:
                dense, now = macs.get(d.name, (0, 0))
                cost = (f"{dense / 1e6:,.1f}M -> {now / 1e6:,.1f}M" if d.factorized else f"{dense / 1e6:,.1f}M",)
            rows.append(
                (
                    d.name,
                    d.kind,
                    "x".join(map(str, d.shape)),
                    "factorized" if d.factorized else "dense",
                    ",".join(map(str, d.ranks)) or "-",
                    params,
                    *cost,
                    reason,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _is_plain(module: nn.Module, base: type) -> bool:
    cls = type(module)
    if f"{cls.__module__}.{cls.__qualname__}" in _SAFE_SUBCLASS_NAMES:
        return True
    # A conv subclass may keep forward and change the op underneath (_conv_forward), as
    # weight-standardized or same-padding convs do.
    hooks = ("forward", "_conv_forward") if hasattr(base, "_conv_forward") else ("forward",)
    return all(getattr(cls, h) is getattr(base, h) for h in hooks)


def break_even_rank(module: nn.Module, r_max: int) -> int:
    """The largest rank ≤ r_max (and ≤ the layer's full rank) at which factorizing ``module``
    still saves parameters and multiply-adds (``LowRankLayer.saves``); 0 if none does. Costs
    grow with the rank, so a bisection finds it."""
    factorized = layer_type_for(module)
    if factorized is None:
        raise ConfigError(f"no factorized layer type replaces a {type(module).__name__}")
    lo, hi = 0, min(r_max, factorized.full_rank(module))  # invariant: lo saves (or is 0), nothing above hi does
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if factorized.saves(module, mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def factorize_(
    model: nn.Module,
    config: FactorizeSection | None = None,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    require_saving: bool = True,
    calibration: Iterable[Any] | None = None,
    dist: DistContext | None = None,
    seed: int = 0,
    channels_last: bool = True,
    **options: Any,
) -> FactorizationReport:
    """Replace eligible layers of ``model`` in place; return what was replaced and what was not.

    ``config``: the recipe's ``factorize`` section (default: its defaults); ``options`` are
    keyword shortcuts for its keys (``factorize_(model, init_rank=8, r_max=16)``), validated
    like a recipe. ``init_rank``: int rank, or float fraction of each layer's full rank (None:
    the cap); ``init_tol``: choose each initial rank by energy, the smallest r with
    ‖σ[r:]‖ < init_tol‖σ‖, at most ``init_rank``. Ranks are clipped to [r_min, cap],
    cap = min(r_max, full rank, break-even rank). Initialization is the truncated SVD (Linear)
    or HOSVD of the channel modes (Conv2d) of the current weights.

    ``require_saving=False`` drops the cost rule (cap = min(r_max, full rank)) and factorizes
    every layer the other rules allow (the reference code's policy; also how a full-rank
    factorization is checked to be exact, since at full rank no layer saves anything).

    ``calibration``: batches of training images (a DataLoader, or tensors), used when
    ``config.init`` is ``activations`` (the default): the initial bases are then chosen in the
    metric of the activations the first ``calibration_batches`` batches produce
    (:mod:`compressor.calibration`), and ``init_tol`` measures activation energy. Without
    batches: SVD / HOSVD of the weights. ``dist`` pools the statistics of all processes.

    ``channels_last=False`` makes the Tucker convs hand their outputs on in NCHW (see
    :class:`~compressor.layers.TuckerConv2d`), for models that ``view`` conv outputs.
    """
    cfg = _resolve_config(config, options)
    init_rank, init_tol, r_min, r_max = cfg.init_rank, cfg.init_tol, cfg.r_min, cfg.r_max
    include, exclude = cfg.include, cfg.exclude
    keep_first_conv, keep_classifier = cfg.keep_first_conv, cfg.keep_classifier
    if cfg.init != "activations":
        calibration = None
    start = time.perf_counter()
    attention = project_attention_(model)
    modules = dict(model.named_modules())
    mha_children = {  # attention layouts ProjectedMultiheadAttention does not reproduce stay dense
        f"{n}.{c}" if n else c
        for n, m in modules.items()
        if isinstance(m, nn.MultiheadAttention)
        for c, _ in m.named_children()
    }
    # every module a registered layer type replaces (Linear, Conv2d...), with that type
    candidates = [(n, m, cls) for n, m in modules.items() if n and (cls := layer_type_for(m)) is not None]
    first_conv = next((n for n, m, _ in candidates if isinstance(m, nn.Conv2d)), None)
    classifier = candidates[-1][0] if candidates else None

    decisions: list[LayerDecision] = []
    chosen: dict[str, tuple[int, nn.Module, type[LowRankLayer], LayerDecision]] = {}
    for index, (name, module, factorized) in enumerate(candidates):
        shape = list(module.weight.shape)
        dense_params = module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
        decision = LayerDecision(name, factorized.kind, shape, False, "", params_dense=dense_params)
        decisions.append(decision)

        reason = None
        if include and not _matches(name, include):
            reason = "not matched by include patterns"
        elif _matches(name, exclude):
            reason = "matched an exclude pattern"
        elif keep_first_conv and name == first_conv:
            reason = "first conv kept dense (paper's policy; factorize.keep_first_conv)"
        elif keep_classifier and name == classifier:
            reason = "final classifier kept dense (paper's policy; factorize.keep_classifier)"
        elif name in mha_children:
            reason = "nn.MultiheadAttention (with bias_k/bias_v, add_zero_attn or kdim/vdim) reads this weight directly"
        elif not _is_plain(module, factorized.dense_type):
            reason = f"custom subclass {type(module).__name__} with its own forward"
        elif filter_fn is not None and not filter_fn(module, name):
            reason = "rejected by filter_fn"
        else:
            reason = factorized.unsupported(module)
        layer_r_max = r_max
        if reason is None and require_saving:
            # a factorized layer must never cost more than the dense one: its ranks (initial and
            # adaptive) are capped at the break-even rank; no saving even at r_min: stay dense
            layer_r_max = min(r_max, break_even_rank(module, r_max))
            if layer_r_max < r_min:
                reason = f"no saving at any rank >= r_min={r_min} (break-even rank {layer_r_max})"
        if reason is not None:
            decision.reason = reason
            continue
        decision.r_max = layer_r_max
        chosen[name] = (index, module, factorized, decision)

    bases = {}
    if calibration is not None and chosen:
        bases = activation_bases(
            model,
            {n: m for n, (_, m, _, _) in chosen.items()},
            calibration,
            init_rank=init_rank,
            init_tol=init_tol,
            r_min=r_min,
            r_max={n: d.r_max for n, (_, _, _, d) in chosen.items()},
            max_batches=cfg.calibration_batches,
            dist=dist,
            seed=seed,
        )
    for name, (index, module, factorized, decision) in chosen.items():
        layer_seed = seed * 1000 + index
        basis, cap = bases.get(name), decision.r_max
        # decision.init: "activations" where the bases came from them, else "svd" (the weights' factors)
        if basis is not None:
            new, decision.init = factorized.from_calibrated(module, basis, r_min=r_min, r_max=cap, seed=layer_seed)
        else:
            decision.init = "svd"
            new = factorized.from_dense(module, init_rank, tol=init_tol, r_min=r_min, r_max=cap, seed=layer_seed)
        new.train(module.training)
        new.set_channels_last_(channels_last)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, new)
        decision.factorized = True
        decision.reason = "factorized"
        decision.ranks = list(new.ranks)
        decision.params_factorized = new.num_parameters()
        log.debug("factorized %s %s at ranks %s (%s init)", name, decision.shape, new.ranks, decision.init)

    report = FactorizationReport(decisions, time.perf_counter() - start, attention)
    log.info("factorized %d of %d candidate layers in %.1fs", len(report.factorized), len(decisions), report.seconds)
    return report


def _resolve_config(config: FactorizeSection | None, options: dict[str, Any]) -> FactorizeSection:
    """The section with the keyword shortcuts applied, validated as a recipe key would be."""
    from .recipe import recipe_from_dict

    if config is not None and not isinstance(config, FactorizeSection):
        raise ConfigError(
            f"config must be a FactorizeSection (a recipe's factorize section), got {type(config).__name__}"
        )
    if not options:
        return config or FactorizeSection()
    base = config.model_dump() if config is not None else {}
    return recipe_from_dict({"factorize": {**base, **options}}, source="factorize_").factorize


__all__ = ["FactorizationReport", "LayerDecision", "break_even_rank", "factorize_", "project_attention_"]
