"""What every figure of the fit and report stages shares: headless figures, log-axis ticks,
file names, saving.

Figures are ``matplotlib.figure.Figure`` objects made here, never through pyplot: nothing
selects a backend or keeps a global list of open figures, and ``savefig`` renders PNG with Agg
wherever it runs (a laptop without a display, CI, a worker).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib.ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure

DPI = 110


def subplots(*grid: int, figsize: tuple[float, float], **kw: Any) -> tuple[Figure, Any]:
    """A new figure and its axes, as ``pyplot.subplots(*grid, figsize=..., **kw)`` would give
    (``layout=`` goes to the figure, everything else to ``Figure.subplots``)."""
    fig = Figure(figsize=figsize, layout=kw.pop("layout", None))
    return fig, fig.subplots(*grid, **kw)


def slug(name: str) -> str:
    """A file-name-safe form of an arch or target name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "x"


def plain_log_y(ax: Axes) -> None:
    """Loss ticks as plain numbers (3.5, not 3.5 x 10^0) on a log axis; no crowded minor labels
    on a log x axis."""
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
    if ax.get_xscale() == "log":
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def save(fig: Figure, path: Path, tight: bool = True) -> Path:
    """Write ``fig`` as a PNG (tight layout unless the figure has its own layout engine)."""
    if tight and fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path
