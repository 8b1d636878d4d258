"""Figures for the reports of ``danlu compare``: matplotlib with the non-interactive Agg backend,
imported only when a plot is drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["figure", "save_figure"]


def figure(width: float = 6.4, height: float = 4.2) -> tuple[Any, Any, Any]:
    """(pyplot, figure, axes) with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height))
    return plt, fig, ax


def save_figure(plt: Any, fig: Any, ax: Any, out: Path, name: str) -> str:
    """Legend (when there are labels), layout, write ``out/name`` as PNG, close; returns ``name``."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name
