"""What the run-time services ask of a factorized layer, without importing ``compressor.layers``.

runtime/ is the bottom of the package: the cost model (:mod:`.costs`) and the process group
(:mod:`.distributed`) count and synchronize factorized layers, but the layers are built above
them. So they ask, through the members listed in :class:`FactorizedLayer`, which
:class:`compressor.layers.LowRankLayer` implements; a module is a factorized layer when its
class says so with ``factorized_layer = True``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from torch import Tensor, nn

if TYPE_CHECKING:
    from .costs import Cost


class FactorizedLayer(Protocol):
    """The members of a factorized layer that runtime/ reads (see compressor.layers.protocol)."""

    factorized_layer: bool
    trained_form: str
    """The form the layer's own forward computes (the key of :meth:`costs` it runs in)."""
    dense_type: type[nn.Module]
    """The dense module type the layer replaces (``nn.Linear``, ``nn.Conv2d``...)."""
    rank_state: Tensor

    @property
    def ranks(self) -> tuple[int, ...]: ...

    @property
    def core(self) -> nn.Parameter: ...

    def bases(self) -> list[nn.Parameter]: ...

    def set_ranks_(self, ranks: tuple[int, ...]) -> None: ...

    def num_parameters(self) -> int: ...

    def dense_num_parameters(self) -> int: ...

    def costs(
        self, ranks: tuple[int, ...] | None = None, *, out_px: int = 1, in_px: int | None = None
    ) -> dict[str, Cost]: ...

    def sample_counts(self, inputs: Tensor, output: Tensor) -> tuple[int, int]: ...


def is_factorized(module: nn.Module) -> bool:
    """Whether ``module`` is a factorized layer (its class sets ``factorized_layer = True``)."""
    return getattr(type(module), "factorized_layer", False) is True


def factorized_modules(model: nn.Module) -> dict[str, FactorizedLayer]:
    """Name → layer for every factorized layer in ``model`` (the same as
    ``compressor.layers.low_rank_layers``, for code that may not import layers/)."""
    return {n: m for n, m in model.named_modules() if is_factorized(m)}
