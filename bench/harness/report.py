"""Tables, verdict words and plots of the bench sections."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .lib import atomic_path


def mean_std(vals: Iterable[float | None], digits: int = 1, scale: float = 1.0, suffix: str = "", g=False) -> str:
    """``mean ± std`` of the values that are not None (just the mean of one; — of none); ``g``: 3
    significant digits instead of ``digits`` decimals."""
    vals = [scale * v for v in vals if v is not None]
    if not vals:
        return "—"
    f = (lambda v: f"{v:.3g}") if g else (lambda v: f"{v:.{digits}f}")
    return f(statistics.fmean(vals)) + (f" ± {f(statistics.stdev(vals))}" if len(vals) > 1 else "") + suffix


def mean(vals: Iterable[float | None]) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.fmean(vals) if vals else None


def met(ok: bool) -> str:
    """A target's verdict word."""
    return f"**{'met' if ok else 'not met'}**"


def table(head: list[str], align: str, rows: Iterable[list[str]]) -> list[str]:
    """A Markdown table: ``align`` has one letter per column, l (left) or r (right)."""
    sep = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return ["| " + " | ".join(head) + " |", sep, *("| " + " | ".join(map(str, r)) + " |" for r in rows)]


@contextmanager
def figure(path: Path, figsize: tuple[float, float], dpi: int) -> Iterator:
    """A matplotlib Figure (no display needed), laid out and written to ``path`` atomically on exit."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    yield fig
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def pareto_plot(path: Path, points: list[dict], *, title: str, xlabel: str, ylabel="clean accuracy (%)") -> None:
    """Accuracy against a cost on a log axis, one marker per point (``x``, ``y``, ``label`` and
    matplotlib's ``marker``, ``color``, ``s``), the legend beside the axes so no point is hidden."""
    from matplotlib.ticker import ScalarFormatter

    with figure(path, (9.5, 4.5), 120) as fig:
        ax = fig.add_subplot()
        for p in points:
            ax.scatter(p["x"], p["y"], **{k: v for k, v in p.items() if k not in ("x", "y")})
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
