"""Compress to a budget: choose every layer's ranks together at each truncation.

A budget is a fraction of the dense model's parameters or multiply-adds (``train.target``).
At a truncation every factorized layer offers its singular values per low-rank mode (one mode
for a linear core, two channel modes for a Tucker core), its rank caps and its cost at any ranks
(``LowRankLayer.spectra``, ``rank_caps``, ``cost_of_ranks``). Starting from the ranks the tolerance
τ would keep, :func:`allocate_ranks` drops, one at a time, the singular value that is worth the
least for what it costs: its normalized energy σᵢ² / Σσ² (the share of that mode's spectrum it
carries) divided by the parameters or multiply-adds its removal saves, which differ per layer
and per Tucker mode (a Tucker mode's saving depends on the other mode's rank, so savings are
re-evaluated lazily). It stops when the whole model fits the budget. With a budget the budget
chooses the ranks and the tolerance τ is not used: every nonzero singular value is on offer, so
the model ends at the budget (within one singular value's cost), not wherever τ would have cut.

The budget is reached gradually: :class:`Budget` interpolates from the model's cost when
training starts to the target over the first ``ramp`` share of the rank-adaptive truncations,
so that accuracy can follow the removed directions instead of losing them in one cut.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..functional import truncation_rank
from ..layers import CostFn, LowRankLayer, low_rank_layers

log = logging.getLogger(__name__)


@dataclass
class LayerOffer:
    """What one layer brings to the allocation: its spectra and its cost at any ranks."""

    sigmas: Sequence[Tensor]
    """Singular values per low-rank mode, descending."""
    max_ranks: tuple[int, ...]
    """The ranks τ keeps (the allocation never exceeds them)."""
    min_ranks: tuple[int, ...]
    cost: CostFn
    """Parameters or multiply-adds of the layer at the given ranks."""


def _step_down(r: int, lo: int, multiple: int) -> int | None:
    """The next rank below ``r`` a mode may take: the multiple of ``multiple`` below it, never
    under ``lo`` (None: ``r`` is already the minimum)."""
    if r <= lo:
        return None
    return max(lo, (r - 1) // multiple * multiple)


def allocate_ranks(
    offers: Mapping[str, LayerOffer], budget: float, fixed_cost: float = 0.0, multiple: int = 1
) -> dict[str, tuple[int, ...]]:
    """Ranks for every layer so that ``fixed_cost + Σ cost(ranks) <= budget`` while keeping as much
    normalized spectral energy as possible (greedy by energy per unit of cost; see the module
    docstring). If even the minimum ranks do not fit, the minimum ranks are returned.

    ``multiple``: ranks move in steps of this many singular values and end on its multiples
    (runtimes' GEMM kernels work in blocks); a mode's minimum rank, and a τ rank below one
    block, stay as they are."""
    if multiple < 1:
        raise ValueError(f"multiple must be at least 1, got {multiple}")

    def start(r: int, lo: int) -> int:
        down = r // multiple * multiple
        return down if down >= max(lo, 1) else r

    ranks = {name: [start(r, lo) for r, lo in zip(o.max_ranks, o.min_ranks, strict=True)] for name, o in offers.items()}
    costs = {name: o.cost(tuple(ranks[name])) for name, o in offers.items()}
    total = fixed_cost + sum(costs.values())
    if total <= budget:
        return {n: tuple(r) for n, r in ranks.items()}
    energy = {
        name: [(s.double() ** 2 / max(float((s.double() ** 2).sum()), 1e-300)).tolist() for s in o.sigmas]
        for name, o in offers.items()
    }

    def key(name: str, mode: int) -> float | None:
        """Worth per unit saved of dropping this mode's last step of singular values (None: cannot)."""
        r = ranks[name]
        lower = _step_down(r[mode], offers[name].min_ranks[mode], multiple)
        if lower is None:
            return None
        smaller = list(r)
        smaller[mode] = lower
        saving = costs[name] - offers[name].cost(tuple(smaller))
        worth = sum(energy[name][mode][lower : r[mode]])
        return worth / saving if saving > 0 else math.inf

    heap = [(k, name, m) for name in offers for m in range(len(ranks[name])) if (k := key(name, m)) is not None]
    heapq.heapify(heap)
    while total > budget and heap:
        k, name, mode = heapq.heappop(heap)
        current = key(name, mode)
        if current is None:
            continue
        if current > k + 1e-18 * max(1.0, abs(k)):  # stale (the other mode changed): re-queue
            heapq.heappush(heap, (current, name, mode))
            continue
        ranks[name][mode] = _step_down(ranks[name][mode], offers[name].min_ranks[mode], multiple)
        new_cost = offers[name].cost(tuple(ranks[name]))
        total += new_cost - costs[name]
        costs[name] = new_cost
        for m in range(len(ranks[name])):  # this layer's keys changed
            if (nk := key(name, m)) is not None:
                heapq.heappush(heap, (nk, name, m))
    return {n: tuple(r) for n, r in ranks.items()}


# ----------------------------------------------------------------------------- the trainer's side


class Budget:
    """The trainer's budget: target, ramp, and the cost of every layer at any ranks.

    ``kind`` is ``params`` or ``macs``; ``fraction`` of the dense model's count; MACs at
    ``input_size`` (per image). ``ramp_truncations``: how many truncations the target is
    reached over; ``start``: the cost the ramp starts from, or ``start_ranks``: the ranks that
    cost is computed at (default: the model's ranks now); ``multiple``: round ranks to it
    (see :func:`allocate_ranks`).
    """

    def __init__(
        self,
        model: nn.Module,
        kind: str,
        fraction: float,
        *,
        input_size: int,
        in_chans: int = 3,
        ramp_truncations: int = 1,
        start: float | None = None,
        start_ranks: Mapping[str, tuple[int, ...]] | None = None,
        multiple: int = 1,
    ) -> None:
        if kind not in ("params", "macs"):
            raise ValueError(f"budget kind must be 'params' or 'macs', got {kind!r}")
        self.kind, self.fraction, self.multiple = kind, float(fraction), int(multiple)
        self.ramp = max(1, int(ramp_truncations))
        self.layers = low_rank_layers(model)
        self._cost_fns: dict[str, CostFn] = {}
        if kind == "params":
            total = sum(p.numel() for p in model.parameters())
            low_rank_now = sum(layer.num_parameters() for layer in self.layers.values())
            self.fixed = total - low_rank_now
            self.dense = self.fixed + sum(layer.dense_num_parameters() for layer in self.layers.values())
            for name, layer in self.layers.items():
                self._cost_fns[name] = layer.cost_of_ranks("params")
        else:
            pixels = _pixels(model, self.layers, input_size, in_chans)
            from ..runtime import macs_by_layer

            now = macs_by_layer(model, input_size, in_chans=in_chans)
            dense = macs_by_layer(model, input_size, in_chans=in_chans, dense_equivalent=True)
            self.fixed = sum(v for n, v in now.items() if n not in self.layers)
            self.dense = sum(dense.values())
            for name, layer in self.layers.items():
                out_px, in_px = pixels[name]
                self._cost_fns[name] = layer.cost_of_ranks("macs", out_px=out_px, in_px=in_px)
        if start is None:
            start = self.cost(start_ranks)
        self.start = float(start)
        self.target = self.fraction * self.dense
        self.truncations = 0

    def cost(self, ranks: Mapping[str, tuple[int, ...]] | None = None) -> int:
        """The model's cost (parameters, or multiply-adds per image) at ``ranks`` (default: now)."""
        ranks = ranks or {n: tuple(layer.ranks) for n, layer in self.layers.items()}
        return int(self.fixed + sum(fn(tuple(ranks[n])) for n, fn in self._cost_fns.items()))

    def current_target(self) -> float:
        """The cap for the next truncation: the ramp from the starting cost to the target."""
        t = min(1.0, (self.truncations + 1) / self.ramp)
        return self.start + t * (self.target - self.start) if self.start > self.target else self.target

    @torch.no_grad()
    def caps(self) -> dict[str, tuple[int, ...]]:
        """The ranks for the truncation about to happen (every layer is in its augmented state):
        every nonzero singular value is on offer, so the model ends at the budget, not below."""
        offers = {}
        for name, layer in self.layers.items():
            sigmas = layer.spectra()
            max_ranks = tuple(
                truncation_rank(s, 0.0, layer.r_min, cap) for s, cap in zip(sigmas, layer.rank_caps, strict=True)
            )
            offers[name] = LayerOffer(sigmas, max_ranks, tuple(layer.r_min for _ in sigmas), self._cost_fns[name])
        target = self.current_target()
        self.truncations += 1
        return allocate_ranks(offers, target, self.fixed, self.multiple)

    def summary(self) -> dict[str, float]:
        return {
            "kind": self.kind,
            "fraction": self.fraction,
            "target": self.target,
            "dense": self.dense,
            "reached": self.cost(),
            "reached_fraction": self.cost() / self.dense if self.dense else 0.0,
        }


def _pixels(
    model: nn.Module, layers: Mapping[str, LowRankLayer], input_size: int, in_chans: int
) -> dict[str, tuple[int, int]]:
    """(output pixels or tokens, input pixels or tokens) of every factorized layer for one image
    (``LowRankLayer.sample_counts``)."""
    seen: dict[str, tuple[int, int]] = {}

    def hook(name: str):
        def fn(module: LowRankLayer, inputs: tuple, output: Tensor) -> None:
            seen[name] = module.sample_counts(inputs[0], output)

        return fn

    handles = [layer.register_forward_hook(hook(n)) for n, layer in layers.items()]
    param = next(model.parameters())
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, input_size, input_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in seen]
    if missing:
        raise ValueError(f"budget: layers {missing[:3]} are not run by the model's forward")
    return seen


__all__ = ["Budget", "LayerOffer", "allocate_ranks"]
