"""Compress to a budget: choose every layer's ranks together at each truncation.

A budget is a fraction of the dense model's parameters, multiply-adds or measured onnxruntime
latency (``train.target``; latency from :mod:`compressor.latency`, a layer's cost at any ranks
being the time of its fastest export form there, dense included).
At a truncation every factorized layer offers its singular values per low-rank mode (one mode
for a linear core, two channel modes for a Tucker core), its rank caps and its cost at any ranks
(``LowRankLayer.spectra``, ``rank_caps``, ``cost_of_ranks``). Starting from the ranks the tolerance
τ would keep, :func:`allocate_ranks` drops, one at a time, the singular value that is worth the
least for what it costs: its normalized energy σᵢ² / Σσ² (the share of that mode's spectrum it
carries) divided by the parameters or multiply-adds its removal saves, which differ per layer
and per Tucker mode (a Tucker mode's saving depends on the other mode's rank, so savings are
re-evaluated lazily). A measured cost can stay flat over a step (a layer whose dense form is
faster than its factorized ones until a much lower rank); such a step is priced as the jump
to the first lower rank that saves time, so that the saving beyond the flat stretch is seen.
It stops when the whole model fits the budget. With a budget the budget
chooses the ranks and the tolerance τ is not used: every nonzero singular value is on offer, so
the model ends at the budget (within one singular value's cost), not wherever τ would have cut.
A latency budget's last truncation is the exception: there τ also bounds every rank from
above. Measured time is flat or nearly so over many ranks (layers at small feature maps, the
output rank of a conv folded at export), so the greedy keeps directions that carry no energy
because they cost next to nothing; left in the final model, they make its cores' spectra
ill-conditioned (κ in the hundreds to millions) for nothing the runtime pays for. A latency
target is an upper bound, so a model that ends a little faster than asked because τ dropped
negligible directions meets it. Only the last truncation: bounding every one by τ leaves the
directions an augmentation adds no time to gain energy, so ranks the ramp cut never grow back
and the model ends well below its budget (VGG16 at 0.2: 0.14, clean 2.8 points under dense).

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
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import UnreachableTargetError
from ..functional import truncation_rank
from ..layers import CostFn, LowRankLayer, low_rank_layers

if TYPE_CHECKING:
    from ..latency import LatencyModel, LatencySettings

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
    (runtimes' GEMM kernels work in blocks); a mode's minimum rank, a τ rank below one block,
    and a layer whose rounded ranks would cost no less, stay as they are."""
    if multiple < 1:
        raise ValueError(f"multiple must be at least 1, got {multiple}")

    def start(r: int, lo: int) -> int:
        down = r // multiple * multiple
        return down if down >= max(lo, 1) else r

    ranks = {name: [start(r, lo) for r, lo in zip(o.max_ranks, o.min_ranks, strict=True)] for name, o in offers.items()}
    for name, o in offers.items():  # rounding that saves nothing (a flat measured cost) keeps the directions
        if o.cost(tuple(ranks[name])) >= o.cost(tuple(o.max_ranks)):
            ranks[name] = list(o.max_ranks)
    costs = {name: o.cost(tuple(ranks[name])) for name, o in offers.items()}
    total = fixed_cost + sum(costs.values())
    if total <= budget:
        return {n: tuple(r) for n, r in ranks.items()}
    energy = {
        name: [(s.double() ** 2 / max(float((s.double() ** 2).sum()), 1e-300)).tolist() for s in o.sigmas]
        for name, o in offers.items()
    }

    def move(name: str, mode: int) -> tuple[float, int] | None:
        """(worth per unit saved, the rank to move to) of this mode's next move (None: it cannot):
        one step, or the jump to the first lower rank that saves anything (a flat cost)."""
        r = ranks[name]
        lo = offers[name].min_ranks[mode]
        first = lower = _step_down(r[mode], lo, multiple)
        while lower is not None:
            smaller = list(r)
            smaller[mode] = lower
            saving = costs[name] - offers[name].cost(tuple(smaller))
            if saving > 0:
                return sum(energy[name][mode][lower : r[mode]]) / saving, lower
            lower = _step_down(lower, lo, multiple)
        return None if first is None else (math.inf, first)

    heap = [(m[0], name, k) for name in offers for k in range(len(ranks[name])) if (m := move(name, k)) is not None]
    heapq.heapify(heap)
    while total > budget and heap:
        k, name, mode = heapq.heappop(heap)
        current = move(name, mode)
        if current is None:
            continue
        if current[0] > k + 1e-18 * max(1.0, abs(k)):  # stale (the other mode changed): re-queue
            heapq.heappush(heap, (current[0], name, mode))
            continue
        ranks[name][mode] = current[1]
        new_cost = offers[name].cost(tuple(ranks[name]))
        total += new_cost - costs[name]
        costs[name] = new_cost
        for m in range(len(ranks[name])):  # this layer's keys changed
            if (nm := move(name, m)) is not None:
                heapq.heappush(heap, (nm[0], name, m))
    return {n: tuple(r) for n, r in ranks.items()}


# ----------------------------------------------------------------------------- the trainer's side


class Budget:
    """The trainer's budget: target, ramp, and the cost of every layer at any ranks.

    ``kind`` is ``params``, ``macs`` or ``latency``; ``fraction`` of the dense model's count;
    MACs at ``input_size`` (per image). ``ramp_truncations``: how many truncations the target is
    reached over; ``start``: the cost the ramp starts from, or ``start_ranks``: the ranks that
    cost is computed at (default: the model's ranks now); ``multiple``: round ranks to it
    (see :func:`allocate_ranks`; with ``latency``, 1 means 8, the step of the measured grid);
    ``tau``: with ``latency``, the tolerance that bounds every rank from above at the last
    truncation (``caps(last=True)``; see the module docstring); otherwise every nonzero singular
    value is on offer.

    ``latency``: how a latency target is measured (:class:`compressor.latency.LatencySettings`;
    default: batch 32, 2 threads, fp32 at ``input_size``); ``latency_model``: a latency model
    to use instead of building one (:func:`compressor.latency.build_latency_model`, which
    times what its cache does not hold). Each layer then costs its fastest form's measured
    time at its ranks, and the model's time is the latency model's curve of their sum
    (``LatencyModel.network_ms``; a target in milliseconds is a budget on the sum through its
    inverse); the layers the forward does not call are not offered (they keep their ranks and
    are exported dense).

    A target below the model's floor (its cost with every offered layer at its smallest rank)
    raises :class:`~compressor.errors.UnreachableTargetError` (a ConfigError) naming the floor:
    the allocation could only put every layer at its smallest rank and still miss it.
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
        latency: LatencySettings | None = None,
        latency_model: LatencyModel | None = None,
        tau: float = 0.0,
    ) -> None:
        if kind not in ("params", "macs", "latency"):
            raise ValueError(f"budget kind must be 'params', 'macs' or 'latency', got {kind!r}")
        self.kind, self.fraction, self.multiple, self.tau = kind, float(fraction), int(multiple), float(tau)
        self.ramp = max(1, int(ramp_truncations))
        self.layers = low_rank_layers(model)
        self._cost_fns: dict[str, CostFn] = {}
        self.latency_model: LatencyModel | None = None
        if kind == "latency":
            if latency_model is None:
                from ..latency import LatencySettings, build_latency_model

                settings = latency or LatencySettings(input_size=input_size, in_chans=in_chans)
                latency_model = build_latency_model(model, settings)
            self.latency_model = latency_model
            self.multiple = 8 if self.multiple == 1 else self.multiple
            self.layers = {n: layer for n, layer in self.layers.items() if n in latency_model.tables}
            self.fixed = 0.0  # costs are the layers' tables; the network's time is a curve of their sum
            self.dense = latency_model.dense_ms
            for name in self.layers:
                self._cost_fns[name] = latency_model.cost_fn(name)
        elif kind == "params":
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
        self.floor = self.cost(
            {n: tuple(min(layer.r_min, c) for c in layer.rank_caps) for n, layer in self.layers.items()}
        )
        if self.target < self.floor:
            raise UnreachableTargetError(self._unreachable(), self.floor / self.dense)

    def _unreachable(self) -> str:
        """Why the target cannot be met and what to ask for instead (the allocation would put
        every layer at its smallest rank and still miss it: a wrecked model for nothing)."""

        def share(x: float) -> str:  # two decimals, or two significant digits below 0.1
            return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"

        floor = share(self.floor / self.dense)
        what = {"params": "parameters", "macs": "multiply-adds", "latency": "latency"}[self.kind]
        why = (
            "what it does not factorize keeps its time: depthwise convs, normalization, activations, pooling"
            if self.kind == "latency"
            else f"the layers it does not factorize hold {share(self.fixed / self.dense)} of them"
        )
        return (
            f"train.target.{self.kind} = {self.fraction:g} is out of reach for this model: with every factorized "
            f"layer at its smallest rank it still has {floor} of the dense model's {what} ({why}). "
            f"Ask for more than {floor} (near it every layer sits at its smallest rank and accuracy suffers), "
            "or reach lower with channel pruning or INT8 (BENCHMARKS.md's decision table compares them)."
        )

    def cost(self, ranks: Mapping[str, tuple[int, ...]] | None = None) -> float:
        """The model's cost (parameters, multiply-adds per image, or milliseconds) at ``ranks``
        (default: now)."""
        ranks = ranks or {n: tuple(layer.ranks) for n, layer in self.layers.items()}
        total = self.fixed + sum(fn(tuple(ranks[n])) for n, fn in self._cost_fns.items())
        if self.latency_model is not None:
            return self.latency_model.network_ms(total)
        return int(total)

    def layer_cost(self, name: str, ranks: tuple[int, ...]) -> float:
        """Layer ``name``'s cost at ``ranks`` (parameters, multiply-adds per image, or the
        milliseconds of its stand-alone graph)."""
        return self._cost_fns[name](tuple(ranks))

    def current_target(self) -> float:
        """The cap for the next truncation: the ramp from the starting cost to the target."""
        t = min(1.0, (self.truncations + 1) / self.ramp)
        return self.start + t * (self.target - self.start) if self.start > self.target else self.target

    @torch.no_grad()
    def caps(self, last: bool = False) -> dict[str, tuple[int, ...]]:
        """The ranks for the truncation about to happen (every layer is in its augmented state):
        every nonzero singular value is on offer, so the model ends at the budget, not below;
        ``last``: a latency budget's last truncation, where τ bounds the ranks too."""
        offers = {}
        tol = self.tau if last and self.kind == "latency" else 0.0
        for name, layer in self.layers.items():
            sigmas = layer.spectra()
            max_ranks = tuple(
                truncation_rank(s, tol, layer.r_min, cap) for s, cap in zip(sigmas, layer.rank_caps, strict=True)
            )
            offers[name] = LayerOffer(sigmas, max_ranks, tuple(layer.r_min for _ in sigmas), self._cost_fns[name])
        target = self.current_target()
        if self.latency_model is not None:  # the network's milliseconds → the sum of the layers' tables
            target = self.latency_model.tables_budget(target)
        self.truncations += 1
        return allocate_ranks(offers, target, self.fixed, self.multiple)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "fraction": self.fraction,
            "target": self.target,
            "dense": self.dense,
            "reached": self.cost(),
            "reached_fraction": self.cost() / self.dense if self.dense else 0.0,
        }
        if self.latency_model is not None:  # what building it cost (nothing when the cache held it)
            lm = self.latency_model
            out["latency_model"] = {"measured_graphs": lm.measured_graphs, "seconds": lm.seconds}
        return out

    def preview(self) -> dict[str, tuple[int, ...]]:
        """The ranks the allocation chooses at the target (the ramp's end) from the layers'
        spectra now, every nonzero singular value on offer (a dry run's preview)."""
        truncations, self.truncations = self.truncations, self.ramp
        try:
            return self.caps()
        finally:
            self.truncations = truncations


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
