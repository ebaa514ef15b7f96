"""What a factorized layer type states about itself, so that code outside layers/ asks the
layer instead of testing its type.

Every :class:`~compressor.layers.LowRankLayer` subclass answers:

- **serialization**: ``kind``, its name in a safetensors manifest (:mod:`.registry` maps it
  back to the class), ``n_modes`` (how many ranks it has), :meth:`~LayerProtocol.manifest_entry`
  and :meth:`~LayerProtocol.apply_manifest_entry_`, :meth:`~LayerProtocol.empty_like` (an
  unfilled layer for a dense module, to load a state dict into) and
  :meth:`~LayerProtocol.factor_ranks` (which stored tensors must show which rank);
- **costs**: :meth:`~LayerProtocol.costs`, parameters and multiply-adds per form at any ranks
  (the formulas of :mod:`compressor.runtime.costs` applied to its shape), and
  :meth:`~LayerProtocol.sample_counts`, the pixels or tokens one forward call sees;
- **export**: ``forms`` (every form :meth:`costs` prices), ``trained_form`` (the one forward
  computes), ``export_forms`` (those ``fold="auto"`` chooses among) and
  :meth:`~LayerProtocol.export_module`, plain float32 modules computing a form;
- **budget**: :attr:`~LayerProtocol.rank_caps`, :meth:`~LayerProtocol.spectra` (singular values per
  rank mode) and :meth:`~LayerProtocol.cost_of_ranks`;
- **factorization** of a dense module: ``dense_type``, :meth:`~LayerProtocol.full_rank`,
  :meth:`~LayerProtocol.saves`, :meth:`~LayerProtocol.unsupported`, ``from_dense`` and
  :meth:`~LayerProtocol.from_calibrated`;
- **latency**: :meth:`~LayerProtocol.latency_key`, the shape a measured latency model is keyed by;
- **layout**: ``channels_last`` and :meth:`~LayerProtocol.set_channels_last_`.

A new layer type is one file implementing these (and the training interface of
:class:`~compressor.layers.LowRankLayer`) plus ``register_layer_type(cls)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from ..functional import singular_values
from ..runtime.costs import Cost

CostFn = Callable[[tuple[int, ...]], int]
"""The parameters or multiply-adds of one layer at the given ranks."""


@dataclass(frozen=True)
class LatencyKey:
    """What a layer's latency depends on besides its ranks, form and the run's batch, threads
    and precision: its kind and shape (channels or features, kernel, stride, input size).
    Layers with equal keys take equal time at equal ranks, so a measured table is shared."""

    kind: str
    shape: tuple[tuple[str, Any], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.shape}}


class LayerProtocol:
    """Mixin of :class:`~compressor.layers.LowRankLayer`: the description (see the module docstring)."""

    factorized_layer: ClassVar[bool] = True
    """Marks the class for :mod:`compressor.runtime.factorized` (which may not import layers/)."""
    kind: ClassVar[str] = ""
    dense_type: ClassVar[type[nn.Module]] = nn.Module
    """The dense module type this layer replaces."""
    n_modes: ClassVar[int] = 1
    """How many ranks the layer has (one per low-rank mode)."""
    forms: ClassVar[tuple[str, ...]] = ()
    trained_form: ClassVar[str] = ""
    export_forms: ClassVar[tuple[str, ...]] = ()
    channels_last: bool = False
    """Whether forward runs (and hands on its output) in NHWC."""

    # what LowRankLayer provides
    ranks: tuple[int, ...]
    r_min: int
    r_max: int
    bias: Tensor | None

    def core_matrix(self) -> Tensor:
        raise NotImplementedError

    # -- costs ----------------------------------------------------------------------------
    def costs(
        self, ranks: tuple[int, ...] | None = None, *, out_px: int = 1, in_px: int | None = None
    ) -> dict[str, Cost]:
        """(parameters, multiply-adds) of every form in ``forms`` at ``ranks`` (default: the
        current ones), for ``out_px`` output pixels or tokens and ``in_px`` input pixels
        (default: as many as a forward at that output size reads)."""
        raise NotImplementedError

    def sample_counts(self, inputs: Tensor, output: Tensor) -> tuple[int, int]:
        """(output pixels or tokens, input pixels or tokens) per entry of the leading axis of one
        forward call with ``inputs`` → ``output``: what :meth:`costs` takes as ``out_px, in_px``."""
        raise NotImplementedError

    # -- export ---------------------------------------------------------------------------
    def export_module(self, form: str) -> nn.Module:
        """Plain float32 ``nn`` modules computing the layer in ``form`` (one of ``forms``), each
        factor a weight of its own op (products formed in float64), for an ONNX graph."""
        raise NotImplementedError

    # -- serialization ----------------------------------------------------------------------
    def manifest_entry(self) -> dict[str, Any]:
        """What a safetensors manifest records to rebuild the layer (kind, ranks, rank bounds)."""
        return {
            "kind": self.kind,
            "ranks": [int(r) for r in self.ranks],
            "r_min": int(self.r_min),
            "r_max": int(self.r_max),
        }

    def apply_manifest_entry_(self, entry: Mapping[str, Any]) -> None:
        """Restore what :meth:`manifest_entry` records beyond ranks and bounds (nothing here)."""

    @classmethod
    def empty_like(cls, dense: nn.Module, ranks: Sequence[int], r_min: int, r_max: int) -> LayerProtocol:
        """A layer with ``dense``'s hyper-parameters and the given ranks, factor contents
        undefined (to be filled by ``load_state_dict``). Raises WeightsError when ``dense``
        cannot be this layer. The bounds passed back in are a layer's stored ``r_min`` and
        ``r_max``, which rebuild the same caps."""
        raise NotImplementedError

    @classmethod
    def factor_ranks(cls, ranks: Sequence[int]) -> dict[str, tuple[int, int]]:
        """Stored tensor (state-dict key after the layer's name) → (dim, rank) it must show."""
        raise NotImplementedError

    @classmethod
    def stored_factor_error(
        cls, name: str, ranks: Sequence[int], header: Mapping[str, Mapping[str, Any]]
    ) -> str | None:
        """What is wrong with the tensors a file holds for layer ``name`` recorded with
        ``ranks`` (``header``: tensor → {"shape": [...]}), or None if they fit."""
        for factor, (dim, rank) in cls.factor_ranks(ranks).items():
            key = f"{name}.{factor}"
            if key not in header:
                return (
                    f"the manifest lists {cls.kind} layer {name!r} but the file has no "
                    f"tensor {key!r} (file and manifest do not match)"
                )
            shape = header[key]["shape"]
            if len(shape) <= dim or shape[dim] != rank:
                return f"tensor {key!r} has shape {shape}, not rank {rank} as the manifest says for {name!r}"
        return None

    # -- budget ---------------------------------------------------------------------------
    @property
    def rank_caps(self) -> tuple[int, ...]:
        """The largest rank of each mode."""
        return (self.r_max,)

    def spectra(self) -> list[Tensor]:
        """Singular values (float32, descending) of each rank mode's unfolding of the core."""
        return [singular_values(self.core_matrix().detach().float())]

    def cost_of_ranks(self, measure: str, *, out_px: int = 1, in_px: int | None = None) -> CostFn:
        """ranks → parameters (``measure="params"``) or multiply-adds (``"macs"``, for ``out_px``
        and ``in_px`` as in :meth:`costs`) of the trained form."""
        index = {"params": 0, "macs": 1}[measure]
        form = self.trained_form
        return lambda ranks: self.costs(ranks, out_px=out_px, in_px=in_px)[form][index]

    # -- factorization of a dense module ------------------------------------------------------
    @classmethod
    def full_rank(cls, dense: nn.Module) -> int:
        """The largest rank any mode of ``dense``'s factorization can have."""
        raise NotImplementedError

    @classmethod
    def saves(cls, dense: nn.Module, r: int) -> bool:
        """Whether factorizing ``dense`` at rank ``r`` (every mode, capped) costs fewer
        parameters and fewer multiply-adds than ``dense``."""
        raise NotImplementedError

    @classmethod
    def unsupported(cls, dense: nn.Module) -> str | None:
        """Why ``dense`` (a ``dense_type``) cannot be factorized by this type, or None."""
        return None

    @classmethod
    def from_calibrated(
        cls, dense: nn.Module, bases: Any, *, r_min: int, r_max: int, seed: int
    ) -> tuple[LayerProtocol, str]:
        """The layer initialized from activation bases (:mod:`compressor.calibration`), and how:
        "activations", or "svd" where the bases say the weights' own factors are exact."""
        raise NotImplementedError

    # -- latency --------------------------------------------------------------------------
    def latency_key(self, input_shape: Sequence[int]) -> LatencyKey:
        """The key of this layer's shape for a measured latency model, given the shape of a
        forward call's input (batch first; the batch is not part of the key)."""
        raise NotImplementedError

    # -- layout ---------------------------------------------------------------------------
    def set_channels_last_(self, flag: bool) -> None:
        """Run in NHWC when ``flag`` (a layer without a spatial layout ignores it)."""
