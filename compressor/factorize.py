"""Model surgery: replace worthwhile Linear/Conv2d layers by their factorized forms, in place.

Policy (paper and reference code): the first conv and the final classifier stay dense; grouped
and depthwise convs stay dense; a layer is factorized only if, at its r_max, the factorized
form has fewer parameters *and* fewer multiply-adds than the dense one. Include/exclude glob
patterns on module names and a ``filter_fn(module, name)`` refine the choice. Every skipped
layer is reported with its reason.

Attention projections: a fused ``qkv`` Linear (timm ViT) is factorized as one matrix, so q, k
and v share one input basis V (they read the same tokens) and one output basis U over the
concatenated outputs. ``nn.MultiheadAttention`` (torchvision ViT) reads its projection weights
as raw tensors, not through its child modules, so its ``out_proj`` and packed in-projection
stay dense; the MLP blocks, which hold most of a ViT's weights, are factorized.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from torch import nn

from .layers import LowRankLayer, LowRankLinear, TuckerConv2d
from .layers.conv import tucker_rank_caps

log = logging.getLogger(__name__)

# Linear/Conv2d subclasses whose forward is known to be the plain op (safe to replace).
_SAFE_SUBCLASS_NAMES = {"timm.layers.linear.Linear"}


@dataclass
class LayerDecision:
    name: str
    kind: str  # "linear" | "conv"
    shape: list[int]
    factorized: bool
    reason: str
    ranks: list[int] = field(default_factory=list)
    params_dense: int = 0
    params_factorized: int = 0


@dataclass
class FactorizationReport:
    layers: list[LayerDecision]
    seconds: float

    @property
    def factorized(self) -> list[LayerDecision]:
        return [d for d in self.layers if d.factorized]

    @property
    def skipped(self) -> list[LayerDecision]:
        return [d for d in self.layers if not d.factorized]

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "layers": [asdict(d) for d in self.layers]}

    def table(self) -> str:
        """A plain-text table users can read: every candidate layer, what happened and why."""
        rows = [("layer", "kind", "shape", "action", "ranks", "params", "reason")]
        for d in self.layers:
            params = f"{d.params_dense:,} -> {d.params_factorized:,}" if d.factorized else f"{d.params_dense:,}"
            rows.append((d.name, d.kind, "x".join(map(str, d.shape)), "factorized" if d.factorized else "dense",
                         ",".join(map(str, d.ranks)) or "-", params, d.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _is_plain(module: nn.Module, base: type) -> bool:
    cls = type(module)
    if f"{cls.__module__}.{cls.__qualname__}" in _SAFE_SUBCLASS_NAMES:
        return True
    # A Conv2d subclass may keep forward and change the op underneath (_conv_forward), as
    # weight-standardized or same-padding convs do.
    hooks = ("forward", "_conv_forward") if base is nn.Conv2d else ("forward",)
    return all(getattr(cls, h) is getattr(base, h) for h in hooks)


def _linear_cost(out_f: int, in_f: int, r: int) -> tuple[int, int]:
    params = (out_f + in_f) * r + r * r
    return params, params  # multiply-adds per token equal parameter count


def _conv_cost(conv: nn.Conv2d, r_out: int, r_in: int) -> tuple[int, int, int, int]:
    """(params dense, params factorized, MACs dense, MACs factorized) per output pixel."""
    c_out, c_in, kh, kw = conv.weight.shape
    sh, sw = conv.stride
    dense = c_out * c_in * kh * kw
    fact = c_out * r_out + r_out * r_in * kh * kw + r_in * c_in
    # the 1×1 C_in→r_in conv runs at the input resolution: stride² more pixels than the output
    macs_fact = sh * sw * c_in * r_in + r_out * r_in * kh * kw + c_out * r_out
    return dense, fact, dense, macs_fact


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def factorize_(
    model: nn.Module,
    *,
    init_rank: int | float | None = 150,
    init_tol: float | None = None,
    r_min: int = 2,
    r_max: int = 200,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    keep_first_conv: bool = True,
    keep_classifier: bool = True,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    require_saving: bool = True,
    seed: int = 0,
) -> FactorizationReport:
    """Replace eligible layers of ``model`` in place; return what was replaced and what was not.

    ``init_rank``: int rank, or float fraction of each layer's full rank; ``init_tol``: choose
    each initial rank by energy (‖σ[r:]‖ < init_tol‖σ‖) instead. Ranks are clipped to
    [r_min, min(r_max, full rank)]. Initialization is the truncated SVD (Linear) or HOSVD of the
    channel modes (Conv2d) of the current weights.

    ``require_saving=False`` drops the cost test and factorizes every layer the other rules
    allow (the reference code's policy; also how a full-rank factorization is checked to be
    exact, since at full rank no layer saves anything).
    """
    start = time.perf_counter()
    include, exclude = include or [], exclude or []
    modules = dict(model.named_modules())
    mha_children = {f"{n}.{c}" if n else c for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)
                    for c, _ in m.named_children()}
    candidates = [(n, m) for n, m in modules.items()
                  if isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, LowRankLayer) and n]
    first_conv = next((n for n, m in candidates if isinstance(m, nn.Conv2d)), None)
    classifier = candidates[-1][0] if candidates else None

    decisions: list[LayerDecision] = []
    for index, (name, module) in enumerate(candidates):
        is_linear = isinstance(module, nn.Linear)
        kind = "linear" if is_linear else "conv"
        shape = list(module.weight.shape)
        dense_params = module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
        decision = LayerDecision(name, kind, shape, False, "", params_dense=dense_params)
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
            reason = "nn.MultiheadAttention reads this weight directly"
        elif not _is_plain(module, nn.Linear if is_linear else nn.Conv2d):
            reason = f"custom subclass {type(module).__name__} with its own forward"
        elif filter_fn is not None and not filter_fn(module, name):
            reason = "rejected by filter_fn"
        elif not is_linear and module.groups != 1:
            reason = "grouped/depthwise conv"
        elif not is_linear and module.padding_mode != "zeros":
            reason = f"padding_mode {module.padding_mode!r}"
        if reason is None and require_saving:
            if is_linear:
                out_f, in_f = shape
                cap = min(r_max, out_f, in_f)
                p_fact, macs_fact = _linear_cost(out_f, in_f, cap)
                if p_fact >= out_f * in_f:
                    reason = f"no saving at r_max={cap} ({p_fact:,} >= {out_f * in_f:,} weights)"
            else:
                cap_o, cap_i = tucker_rank_caps(shape[0], shape[1], module.kernel_size, r_max)
                p_dense, p_fact, m_dense, m_fact = _conv_cost(module, cap_o, cap_i)
                if p_fact >= p_dense or m_fact >= m_dense:
                    reason = (f"no saving at r_max={max(cap_o, cap_i)} (weights {p_fact:,} vs {p_dense:,}, "
                              f"MACs/pixel {m_fact:,} vs {m_dense:,})")
        if reason is not None:
            decision.reason = reason
            continue

        layer_seed = seed * 1000 + index
        if is_linear:
            new = LowRankLinear.from_dense(module, init_rank, tol=init_tol, r_min=r_min, r_max=r_max, seed=layer_seed)
        else:
            new = TuckerConv2d.from_dense(module, init_rank, tol=init_tol, r_min=r_min, r_max=r_max, seed=layer_seed)
        new.train(module.training)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, new)
        decision.factorized = True
        decision.reason = "factorized"
        decision.ranks = list(new.ranks)
        decision.params_factorized = new.num_parameters()
        log.debug("factorized %s %s at ranks %s", name, shape, new.ranks)

    report = FactorizationReport(decisions, time.perf_counter() - start)
    log.info("factorized %d of %d candidate layers in %.1fs", len(report.factorized), len(decisions), report.seconds)
    return report

