"""Turning a rank request (int, fraction) into a rank for one layer."""

from __future__ import annotations


def resolve_rank(rank: int | float | None, full: int, r_min: int, r_cap: int) -> int:
    """int → itself; float in (0, 1] → that fraction of ``full``; None → r_cap. Clipped to [r_min, r_cap]."""
    if rank is None:
        r = r_cap
    elif isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise ValueError(f"a fractional rank must be in (0, 1], got {rank}")
        r = max(1, round(rank * full))
    else:
        r = int(rank)
    return max(min(r_min, r_cap), min(r, r_cap, full))
